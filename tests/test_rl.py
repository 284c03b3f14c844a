"""The RL gate environment, its batched VecEnv, the rewards, the PPO driver and its report.

Tiny byte-level models and short synthetic GSM8K-shaped problems keep every test fast on CPU."""

import json

import numpy as np
import pytest
import torch

from nanochat.checkpoint import save_model_checkpoint
from nanochat.engine import GenerationResult
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import get_tokenizer
from rl.report import COMPARISON_FIELDS, POLICY_FIELDS, mcnemar_exact, sign_test, wilson_interval
from rl.rollouts import (GSM8KGateScorer, actions_to_gates, compute_reward, gate_slots, load_gsm8k_splits,
                         solution_tokens)

gym = pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")


def problem(i: int) -> dict:
    a, b = i % 7 + 1, i % 5 + 2
    return {"question": f"Tom has {a} apples and gets {b} more. How many?",
            "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}", "target": str(a + b), "id": f"syn:{i}"}


PROBLEMS = [problem(i) for i in range(24)]


def tiny_model(n_layer=2, seed=0):
    tok = get_tokenizer("char")
    cfg = GPTConfig(sequence_len=160, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2,
                    n_embd=32, mhc_enabled=True, mhc_sinkhorn_iters=5)
    model = build_model(cfg, "cpu", seed=seed)
    # as after some training: nonzero output projections and head, a strong dynamic mHC term, so
    # every gate changes the output and greedy choices are not near-ties
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1, generator=g)
            block.mlp.c_proj.weight.normal_(0, 0.1, generator=g)
        model.lm_head.weight.normal_(0, 0.3, generator=g)
        for m in model.mhc_modules():
            m.alpha.fill_(0.5)
    return model.eval(), tok


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model()
    model.requires_grad_(False)
    return model, tok


@pytest.fixture(scope="module")
def scorer(model_tok):
    model, tok = model_tok
    sc = GSM8KGateScorer(model, tok, reward="mixed", max_new_tokens=6)
    sc.fit_observation_stats(PROBLEMS, sample_size=16)
    return sc


def make_env(scorer, gate_mode="global"):
    from rl.gate_env import GSM8KMHCEnv

    return GSM8KMHCEnv(None, None, PROBLEMS, gate_mode=gate_mode, scorer=scorer)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder with a small GSM8K train/test of the synthetic problems."""
    root = tmp_path_factory.mktemp("data")
    (root / "gsm8k").mkdir()
    for split, rng in (("train", range(0, 48)), ("test", range(100, 112))):
        rows = [{"question": problem(i)["question"], "answer": problem(i)["answer"]} for i in rng]
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ----------------------------------------------------------------------------- spaces and checkers


def test_actions_map_to_gates_in_unit_interval():
    a = np.array([[-1.0, 0.0, 1.0, -3.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(actions_to_gates(a), [[0.0, 0.5, 1.0, 0.0, 1.0]])
    cfg = GPTConfig(n_layer=3, n_embd=32, n_head=1, n_kv_head=1, mhc_enabled=True)
    assert [gate_slots(cfg, m) for m in ("global", "per_layer", "per_sublayer")] == [1, 3, 6]
    with pytest.raises(ValueError, match="gate_mode"):
        gate_slots(cfg, "per_head")


@pytest.mark.parametrize("gate_mode", ["global", "per_sublayer"])
def test_env_passes_gymnasium_and_sb3_checkers(scorer, gate_mode):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = make_env(scorer, gate_mode)
    assert env.action_space.shape == (gate_slots(scorer.model.config, gate_mode),)
    assert env.observation_space.shape == (32,)
    gym_check(env, skip_render_check=True)
    sb3_check(env, warn=True)


def test_env_requires_an_mhc_model():
    from rl.gate_env import GSM8KMHCEnv

    tok = get_tokenizer("char")
    plain = build_model(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                                  n_embd=32), "cpu", seed=0)
    with pytest.raises(ValueError, match="no mHC"):
        GSM8KMHCEnv(plain, tok, PROBLEMS, max_new_tokens=4)


def test_seeding_makes_episodes_repeatable(scorer):
    env_a, env_b = make_env(scorer, "per_layer"), make_env(scorer, "per_layer")
    action = np.array([0.3, -0.6], dtype=np.float32)
    for seed in (0, 7):
        obs_a, info_a = env_a.reset(seed=seed)
        obs_b, info_b = env_b.reset(seed=seed)
        assert info_a["problem_index"] == info_b["problem_index"]
        np.testing.assert_array_equal(obs_a, obs_b)
        out_a, out_b = env_a.step(action), env_b.step(action)
        assert out_a[1] == out_b[1] and out_a[2] is True and out_a[4]["completion"] == out_b[4]["completion"]
    def draws(seed):
        env = make_env(scorer)
        first = env.reset(seed=seed)[1]["problem_index"]
        return [first] + [env.reset()[1]["problem_index"] for _ in range(5)]

    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_step_info_has_grading_gates_and_reward_parts(scorer):
    env = make_env(scorer, "per_layer")
    env.reset(seed=0, options={"problem_index": 3})
    _, reward, terminated, truncated, info = env.step(np.array([-1.0, 1.0], dtype=np.float32))
    assert terminated and not truncated
    np.testing.assert_allclose(info["gates"], [0.0, 1.0])
    for key in ("correct", "correct_strict", "correct_flexible", "reward_exact", "reward_logprob", "reward_mixed",
                "completion", "target", "problem_id"):
        assert key in info
    assert info["problem_id"] == "syn:3"
    assert reward == pytest.approx(info["reward_mixed"])  # the scorer's reward is 'mixed'
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, dtype=np.float32))  # the episode is over


# ----------------------------------------------------------------------------- gates reach the model


def test_per_sample_gates_reach_the_model(scorer, model_tok):
    model, tok = model_tok
    idx = torch.tensor([tok.encode("Question: 2+2?", prepend_bos=True)] * 3)
    h = model.hidden_states(idx, mhc_gates=torch.tensor([[0.0], [1.0], [0.0]]))
    assert not torch.allclose(h[0], h[1], atol=1e-4)  # different gates, different rows
    torch.testing.assert_close(h[0], h[2])  # same gate, same row
    # and through the scorer's dense reward: one batch, the same problem under two gates
    lp = scorer.solution_logprobs([PROBLEMS[0]] * 2, torch.tensor([[0.0], [1.0]]))
    assert abs(lp[0] - lp[1]) > 1e-4


# ----------------------------------------------------------------------------- rewards


def test_reward_definitions():
    assert compute_reward("exact", True, -2.0) == 1.0 and compute_reward("exact", False, -2.0) == 0.0
    assert compute_reward("logprob", True, -2.0) == -2.0
    assert compute_reward("mixed", True, -2.0, 0.1) == pytest.approx(0.8)
    assert compute_reward("mixed", False, -2.0, 0.5) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="reward"):
        compute_reward("bleu", True, 0.0)


def test_exact_reward_on_known_completions(model_tok, monkeypatch):
    model, tok = model_tok
    texts = ["3+4=7\n#### 7", "#### 8", "so the answer is 7.", "#### 1,234"]
    probs = [dict(PROBLEMS[0], target="7"), dict(PROBLEMS[0], target="7"), dict(PROBLEMS[0], target="7"),
             dict(PROBLEMS[0], target="1234")]
    expected = {"strict": [1, 0, 0, 1], "flexible": [1, 0, 1, 1]}
    for match in ("strict", "flexible"):
        sc = GSM8KGateScorer(model, tok, reward="exact", match=match, max_new_tokens=4)
        monkeypatch.setattr(sc.engine, "generate", lambda prompts, **kw: [
            GenerationResult(tokens=tok.encode(t), text=t, finish_reason="stop") for t in texts[:len(prompts)]])
        eps = sc.score(probs, np.full((4, 1), 0.5, dtype=np.float32))
        assert [e["reward"] for e in eps] == expected[match]
        assert [e["correct_strict"] for e in eps] == [True, False, False, True]
        assert [e["correct_flexible"] for e in eps] == [True, False, True, True]


def test_logprob_reward_is_teacher_forced_mean_logprob_of_gold_solution(scorer, model_tok):
    model, tok = model_tok
    probs = [PROBLEMS[0], PROBLEMS[5], PROBLEMS[11]]  # different lengths: padding must not leak
    gates = torch.tensor([[0.2], [0.9], [0.5]])
    batched = scorer.solution_logprobs(probs, gates)
    for k, p in enumerate(probs):
        prompt = scorer.prompt_tokens([p])[0]
        sol = solution_tokens(tok, p["answer"])
        assert sol[-1] == tok.eos_id and tok.decode(sol[:-1]) == " " + p["answer"]
        full = torch.tensor([prompt + sol])
        with torch.no_grad():
            logp = torch.log_softmax(model(full[:, :-1], mhc_gates=gates[k:k + 1]), dim=-1)[0]
        positions = range(len(prompt) - 1, full.shape[1] - 1)
        manual = float(np.mean([logp[t, full[0, t + 1]].item() for t in positions]))
        assert batched[k] == pytest.approx(manual, abs=1e-5)


# ----------------------------------------------------------------------------- batched VecEnv


def test_vecenv_batched_step_equals_single_env_steps(scorer, monkeypatch):
    from rl.gate_env import BatchedGSM8KMHCVecEnv

    n, seed = 4, 11
    venv = BatchedGSM8KMHCVecEnv(scorer, PROBLEMS, n, gate_mode="per_sublayer", seed=seed)
    obs = venv.reset()
    actions = np.random.default_rng(0).uniform(-1, 1, size=(n, 4)).astype(np.float32)
    calls = []
    real_generate = scorer.engine.generate

    def counting_generate(prompts, **kw):
        calls.append(len(prompts))
        return real_generate(prompts, **kw)

    monkeypatch.setattr(scorer.engine, "generate", counting_generate)
    _, rewards, dones, infos = venv.step(actions)
    assert calls == [n]  # ONE batched generation for all sub-environments
    assert dones.all()
    for i in range(n):
        env = make_env(scorer, "per_sublayer")
        o, _ = env.reset(seed=seed + i)  # sub-env i seeded s + i (SB3's convention)
        np.testing.assert_allclose(o, obs[i], atol=1e-5)
        _, r, _, _, info = env.step(actions[i])
        assert info["problem_id"] == infos[i]["problem_id"]
        assert info["completion"] == infos[i]["completion"]
        assert r == pytest.approx(float(rewards[i]), abs=1e-5)
        np.testing.assert_allclose(infos[i]["terminal_observation"], obs[i], atol=1e-6)


def test_ppo_updates_leave_the_frozen_model_unchanged(model_tok):
    from stable_baselines3 import PPO

    from rl.gate_env import BatchedGSM8KMHCVecEnv
    from rl.train_gate_ppo import freeze, weights_sha256

    model, tok = tiny_model(n_layer=1, seed=3)
    before = freeze(model)
    sc = GSM8KGateScorer(model, tok, reward="logprob", max_new_tokens=2)
    sc.fit_observation_stats(PROBLEMS, sample_size=8)
    venv = BatchedGSM8KMHCVecEnv(sc, PROBLEMS, 16, gate_mode="per_layer", seed=0)
    ppo = PPO("MlpPolicy", venv, n_steps=8, batch_size=32, n_epochs=2, seed=0, device="cpu", verbose=0)
    policy_before = [p.detach().clone() for p in ppo.policy.parameters()]
    ppo.learn(total_timesteps=256)  # two rollouts of 128 episodes, two PPO updates
    assert ppo.num_timesteps == 256
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, ppo.policy.parameters()))  # PPO learned
    assert weights_sha256(model) == before
    assert not any(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- data, driver, report


def test_scorer_completions_equal_the_gsm8k_eval(model_tok, data_dir):
    from evals.gsm8k import evaluate

    model, tok = model_tok
    test = load_gsm8k_splits(dev_size=8, data_dir=data_dir)["test"][:6]
    eps = GSM8KGateScorer(model, tok, max_new_tokens=6).score(test, None)
    res = evaluate(model, tok, "cpu", shots=0, limit=6, data_dir=data_dir, max_new_tokens=6)
    assert [e["completion"] for e in eps] == [r["completion"] for r in res.records]
    assert [e["correct_strict"] for e in eps] == [r["strict_correct"] for r in res.records]


def test_dev_slice_is_the_held_out_end_of_train(data_dir):
    parts = load_gsm8k_splits(dev_size=8, data_dir=data_dir)
    assert len(parts["train"]) == 40 and len(parts["dev"]) == 8 and len(parts["test"]) == 12
    assert [p["id"] for p in parts["dev"]] == [f"train:{i}" for i in range(40, 48)]
    assert not {p["id"] for p in parts["train"]} & {p["id"] for p in parts["dev"]}
    with pytest.raises(ValueError, match="dev_size"):
        load_gsm8k_splits(dev_size=48, data_dir=data_dir)


@pytest.mark.parametrize("flags, message", [
    (["--rollout_size", "100", "--n_envs", "16"], "not a multiple of --n_envs"),
    (["--rollout_size", "128", "--n_envs", "16", "--batch_size", "48"], "must divide --rollout_size"),
    (["--rollout_size", "128", "--n_envs", "16", "--total_timesteps", "64"], "less than one rollout"),
    (["--grid", "0,1.5"], "grid"),
])
def test_driver_rejects_bad_settings_before_work(flags, message):
    from rl.train_gate_ppo import parse_args, validate_args

    with pytest.raises(ValueError, match=message):
        validate_args(parse_args(["--ckpt", "missing.pt", *flags]))


def test_statistics_on_known_cases():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    for n in (200, 400, 1319):  # computed, these bounds came out 1e-18 inside (a negative error bar)
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    m = mcnemar_exact([0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1])  # 5 discordant, all for b
    assert (m["a_only"], m["b_only"]) == (0, 5) and m["p_value"] == pytest.approx(2 / 32)
    assert mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0
    s = sign_test([1.0, 2.0, 3.0, 0.0], [0.0, 1.0, 2.0, 0.0])
    assert (s["a_higher"], s["b_higher"], s["ties"]) == (3, 0, 1) and s["p_value"] == pytest.approx(0.25)
    assert s["difference"] == pytest.approx(0.75)


def test_tiny_run_writes_a_report_with_every_field(tmp_path, data_dir):
    from rl.train_gate_ppo import main

    model, tok = tiny_model(n_layer=1, seed=5)
    ckpt = save_model_checkpoint(tmp_path / "tiny.pt", model, tok, {})
    out = tmp_path / "rl"
    args = ["--ckpt", str(ckpt), "--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu",
            "--gate_mode", "per_layer", "--reward", "mixed", "--total_timesteps", "64", "--rollout_size", "32",
            "--batch_size", "16", "--n_envs", "16", "--n_epochs", "2", "--max_new_tokens", "4",
            "--dev_size", "8", "--eval_limit", "10", "--grid", "0,0.5,1", "--no_progress"]
    report = main(args)
    assert set(report["policies"]) == {"rl", "learned_default", "gate_0", "gate_1", "best_constant"}
    for p in report["policies"].values():
        assert set(POLICY_FIELDS) <= set(p) and p["n"] == 10
        for metric in ("strict", "flexible"):
            assert {"accuracy", "ci_low", "ci_high"} <= set(p[metric])
        assert {"mean", "ci_low", "ci_high"} <= set(p["dense"])
    assert [(c["a"], c["b"]) for c in report["comparisons"]] == [("rl", "learned_default"), ("rl", "best_constant")]
    for c in report["comparisons"]:
        assert set(COMPARISON_FIELDS) <= set(c)
        assert {"p_value", "a_only", "b_only"} <= set(c["strict"]) and {"p_value", "difference"} <= set(c["dense"])
    assert report["best_constant_gate"] in (0.0, 0.5, 1.0) and len(report["grid_search"]) == 3
    assert report["weights_unchanged"] and report["total_timesteps"] == 64
    assert len(report["policies"]["rl"]["gate_mean"]) == 1 and len(report["learned_default_gates"]) == 2
    assert report["train_episodes_per_s"] > 0 and len(report["training_curve"]) == 2
    for f in ("policy.zip", "report.json", "report.md", "metrics.jsonl", "test_episodes.jsonl", "obs_stats.npz",
              "plots/training_reward.png", "plots/rl_gates.png", "plots/accuracy.png"):
        assert (out / f).is_file(), f
    assert any((out / "tb").rglob("events.out.tfevents*"))
    assert json.loads((out / "report.json").read_text())["policies"].keys() == report["policies"].keys()
    with pytest.raises(FileExistsError):
        main(args)  # never overwrites a finished run


def test_accuracy_plot_of_a_model_that_solves_nothing(tmp_path):
    """The d4 models of docs/results.md score 0 on GSM8K: the plot of such a report must still draw
    (its first GPU run failed here on a negative error bar)."""
    from rl.report import plot_policy_accuracy

    lo, hi = wilson_interval(0, 400)
    zero = {"accuracy": 0.0, "correct": 0, "ci_low": lo, "ci_high": hi}
    report = {"n_eval": 400, "policies": {name: {"strict": zero, "flexible": zero} for name in ("rl", "gate_0")}}
    path = plot_policy_accuracy(report, tmp_path / "acc.png")
    assert path.stat().st_size > 1000
