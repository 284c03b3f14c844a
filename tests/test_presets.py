"""--preset in scripts/base_train.py (issue 11): preset values as defaults, explicit flags win, clear
errors, seed 002's random-window val_loss, early_stop_after, MoE logging, scaled-run notes."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.checkpoint import load_checkpoint
from nanochat.gpt import GPTConfig, build_model
from nanochat.loss_eval import evaluate_random_windows
from nanochat.presets import PRESETS, apply_preset, preset_config
from nanochat.report import read_metrics

from base_train_helpers import load_base_train, one_thread, tiny_flags, token_cache  # noqa: F401

TINY = tiny_flags()  # a dense model small enough for a few CPU steps in a test
# a preset shrunk by explicit flags: everything else (MoE, norms, lrs, eval_iters, ...) is the preset's
SHRINK = ["--n_embd", "32", "--n_head", "2", "--n_kv_head", "2", "--max_seq_len", "32", "--device_batch_size", "2",
          "--total_batch_size", "64", "--eval_tokens", "64", "--eval_iters", "3", "--eval_every", "1",
          "--sample_every", "-1", "--device", "cpu"]


base_train = load_base_train()


def evals(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "val_bpb" in r and "event" not in r]


# ----------------------------------------------------------------------------- flags

def test_preset_sets_model_and_trainer_values():
    args = base_train.parse_args(["--preset", "minigpt_modern"])
    model, trainer = apply_preset("minigpt_modern")
    assert args.depth == model["n_layer"] == 4
    for key, value in trainer.items():
        assert getattr(args, key) == value, key
    assert args.scale_adam_lr_by_width is False and args.eval_iters == 100 and args.adamw_matrix_lr == 9e-5
    cfg = base_train.model_config(args, vocab_size=257)
    assert (cfg.moe_num_experts, cfg.moe_top_k, cfg.mlp_activation, cfg.sequence_len) == (4, 1, "swiglu", 192)
    assert base_train.run_folder(args).name == "minigpt_modern"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_exactly_its_config(name):
    """The trainer's config from --preset equals the preset's own GPTConfig: no field is lost."""
    args = base_train.parse_args(["--preset", name])
    assert base_train.model_config(args, vocab_size=257) == preset_config(name, vocab_size=257)


def test_explicit_flags_override_the_preset():
    args = base_train.parse_args(["--preset", "minigpt_modern", "--dropout", "0.0", "--max_seq_len", "64",
                                  "--moe_num_experts", "2", "--eval_iters", "3", "--scale_adam_lr_by_width",
                                  "--depth", "2"])
    # 0.0 is the flag's own default: only a parse that knows what was typed keeps it over the preset's 0.24
    assert args.dropout == 0.0 and args.max_seq_len == 64 and args.eval_iters == 3
    assert args.scale_adam_lr_by_width is True and args.depth == 2
    cfg = base_train.model_config(args, vocab_size=257)
    assert (cfg.n_layer, cfg.moe_num_experts, cfg.sequence_len, cfg.dropout) == (2, 2, 64, 0.0)
    assert cfg.n_embd == 128 and cfg.norm_type == "rms"  # the rest stays the preset's
    toy = base_train.parse_args(["--preset", "toygpt", "--no-mhc_enabled"])
    assert toy.mhc_enabled is False and base_train.model_config(toy, 50257).depth_gating is True


def test_unknown_preset_is_one_clear_line_naming_the_presets():
    with pytest.raises(SystemExit) as info:
        base_train.main(["--preset", "minigpt", "--dry_run"])
    message = str(info.value)
    assert message.startswith("error: unknown --preset 'minigpt'") and "\n" not in message
    assert all(name in message for name in PRESETS)


def test_notes_say_when_a_preset_runs_scaled():
    args = base_train.parse_args(["--preset", "minigpt_classic", "--num_iterations", "500"])
    notes = base_train.preset_notes(args, total_steps=500)
    assert "explicit flags {'num_iterations': 500}" in notes[0]
    assert any("scaled run: 500 of the preset's 50000 steps" in n for n in notes)
    assert len(base_train.preset_notes(base_train.parse_args(["--preset", "minigpt_classic"]), 50_000)) == 1
    # a time budget that cannot cover the planned steps: say how many it covers
    args = base_train.parse_args(["--time_budget_s", "100"])
    note = base_train.budget_note(args, total_steps=1000, step=5, train_time_s=10.0, step_s=2.0)
    assert "covers about 50 of the 1000 steps" in note and "--num_iterations 50" in note
    assert base_train.budget_note(args, total_steps=40, step=5, train_time_s=10.0, step_s=2.0) is None


# ----------------------------------------------------------------------------- val_loss (seed 002's metric)

def test_random_window_loss_is_the_seeded_mean_over_random_windows():
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=1, n_head=2, n_kv_head=2, n_embd=32, vocab_size=50, sequence_len=16,
                                  dropout=0.5), "cpu", seed=0)
    stream = torch.randint(0, 50, (500,))
    rng_before = torch.get_rng_state()
    result = evaluate_random_windows(model, stream, num_batches=3, batch_size=4, seq_len=16, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training RNG is untouched (exact resume)
    assert model.training  # mode restored; dropout was off during the eval (else the repeat would differ)
    # the reference: the same seeded starts, plain cross-entropy, one mean over every target
    starts = torch.randint(0, 500 - 16, (3, 4), generator=torch.Generator().manual_seed(7))
    rows = stream[starts.reshape(-1)[:, None] + torch.arange(17)]
    model.eval()
    with torch.no_grad():
        logits = model(rows[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, 50), rows[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5) and result["tokens"] == 3 * 4 * 16
    again = evaluate_random_windows(model, stream, num_batches=3, batch_size=4, seq_len=16, seed=7)
    other = evaluate_random_windows(model, stream, num_batches=3, batch_size=4, seq_len=16, seed=8)
    assert again["loss"] == result["loss"] and other["loss"] != result["loss"]
    with pytest.raises(ValueError, match="needs 17"):
        evaluate_random_windows(model, stream[:16], num_batches=1, batch_size=1, seq_len=16)


def test_early_stop_after_and_val_loss_drive_early_stopping(tmp_path):
    """Frozen weights: every eval ties, so patience 2 would stop at step 2; early_stop_after 5 holds it to 5.
    val_loss is identical at every eval (the same seeded windows), and early stopping follows it."""
    frozen = ["--matrix_lr", "0", "--embedding_lr", "0", "--unembedding_lr", "0", "--mhc_lr", "0"]
    summary = base_train.main(TINY + ["--out_dir", str(tmp_path), "--num_iterations", "50", "--eval_every", "1",
                                      "--early_stop_patience", "2", "--early_stop_after", "5", "--eval_iters", "2",
                                      *frozen])
    assert summary["stop_reason"].startswith("early stop") and summary["steps"] == 5
    losses = [r["val_loss"] for r in evals(tmp_path)]
    assert len(losses) == 6 and len(set(losses)) == 1 and math.isfinite(losses[0])
    assert summary["best_step"] == 0 and summary["best_val_loss"] == losses[0]
    with pytest.raises(SystemExit, match="--eval_iters=2 needs evals"):
        base_train.main(TINY + ["--out_dir", str(tmp_path / "x"), "--eval_iters", "2", "--eval_tokens", "0"])


def test_best_checkpoint_follows_val_loss(tmp_path):
    summary = base_train.main(TINY + ["--out_dir", str(tmp_path), "--num_iterations", "6", "--eval_every", "2",
                                      "--save_every", "2", "--keep_last", "5", "--eval_iters", "2"])
    records = {r["step"]: r["val_loss"] for r in evals(tmp_path)}
    saved = {s: records[s] for s in (2, 4, 6)}
    best_step = min(saved, key=saved.get)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == best_step
    assert summary["best_val_loss"] == pytest.approx(min(records.values()))


# ----------------------------------------------------------------------------- a preset run (MoE)

def test_tiny_moe_preset_run_logs_aux_losses_stats_and_usage_plot(tmp_path):
    """minigpt_modern (MoE, 4 experts, top-1) shrunk by flags: aux losses every step, expert statistics
    and the usage plot at eval, val_loss, the preset's lrs as given (no width scaling), a scaled-run note."""
    summary = base_train.main(["--preset", "minigpt_modern", "--depth", "2", *SHRINK, "--num_iterations", "2",
                               "--out_dir", str(tmp_path)])
    assert summary["preset"] == "minigpt_modern" and summary["steps"] == 2
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    for record in steps:
        for key in ("moe_lb", "moe_z", "moe_entropy"):
            assert math.isfinite(record[key]), key
    assert steps[0]["moe_lb"] >= 1.0 - 1e-6  # E * sum f_e P_e >= 1, equality when balanced
    last = evals(tmp_path)[-1]
    assert math.isfinite(last["val_loss"]) and len(last["moe_tokens_per_expert"]) == 2  # 2 MoE layers
    assert all(len(row) == 4 for row in last["moe_tokens_per_expert"])
    assert sum(last["moe_tokens_per_expert"][0]) == 2 * 32  # top-1 over the last eval batch (2 x 32 tokens)
    assert last["moe_dropped"] == [0, 0]  # dropless
    assert (tmp_path / "expert_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (tmp_path / "train.log").read_text()
    assert "scaled run: 2 of the preset's 5000 steps" in log and "Seed 002, modern track" in log
    groups = {g["kind"]: g for g in load_checkpoint(tmp_path / "final.pt")["optimizer"][0]["param_groups"]}
    assert groups["embedding"]["base_lr"] == pytest.approx(50 * 9e-5)  # not x (32/768)^-0.5
    assert groups["matrix"]["base_lr"] == pytest.approx(9e-5)
