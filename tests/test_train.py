"""scripts/base_train.py end to end on CPU: exact resume, early stopping, bad input, DDP (gloo), bpb."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import load_checkpoint
from nanochat.gpt import GPTConfig, build_model
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import read_metrics
from nanochat.tokenizer import get_tokenizer

from base_train_helpers import (BASE_TRAIN, TINY_SETTINGS, load_base_train, one_thread, tiny_flags,  # noqa: F401
                               token_cache)

SCRIPT = BASE_TRAIN
TINY = tiny_flags()
base_train = load_base_train()


def train(out_dir, *extra):
    return base_train.main(TINY + ["--out_dir", str(out_dir), *extra])


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# ----------------------------------------------------------------------------- flags

def test_help_lists_every_required_flag():
    help_text = base_train.build_parser().format_help()
    required = ["--depth", "--max_seq_len", "--device_batch_size", "--total_batch_size", "--num_iterations",
                "--eval_every", "--eval_tokens", "--sample_every", "--save_every", "--out_dir", "--data",
                "--tokenizer", "--device", "--compile", "--seed", "--resume", "--wandb", "--mhc_enabled",
                "--mhc_num_streams", "--mhc_sinkhorn_iters", "--mhc_sinkhorn_tau", "--mhc_preset",
                "--target_tokens", "--time_budget_s", "--optimizer", "--lr_schedule", "--weight_decay",
                "--grad_clip", "--dtype", "--activation_checkpointing", "--early_stop_patience", "--run_name"]
    missing = [f for f in required if f not in help_text]
    assert not missing, missing
    assert "(default: 2048)" in help_text  # defaults are shown
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--mhc_sinkhorn_tau" in out.stdout


def test_dash_spellings_and_presets():
    args = base_train.build_parser().parse_args(
        ["--mhc-enabled", "--max-seq-len", "128", "--mhc_preset", "paper", "--mhc-sinkhorn-iters", "7"])
    assert args.mhc_enabled and args.max_seq_len == 128
    cfg = base_train.model_config(args, vocab_size=257)
    assert cfg.mhc_sinkhorn_iters == 7  # an explicit flag beats the preset
    assert cfg.mhc_gate_init == 1.0  # the rest comes from the 'paper' preset
    assert cfg.sequence_len == 128 and cfg.n_embd == 64 * 12


def test_mhc_fused_kernels_default_to_on_for_cuda_only():
    parse = base_train.build_parser().parse_args
    assert base_train.model_config(parse(["--mhc_enabled"]), 257, "cuda").mhc_fused_kernels is True
    assert base_train.model_config(parse(["--mhc_enabled"]), 257, "cpu").mhc_fused_kernels is False
    assert base_train.model_config(parse(["--mhc_enabled", "--no-mhc_fused_kernels"]), 257, "cuda").mhc_fused_kernels is False
    assert base_train.model_config(parse(["--mhc_enabled", "--mhc_fused_kernels"]), 257, "cpu").mhc_fused_kernels is True
    assert base_train.model_config(parse([]), 257, "cuda").mhc_fused_kernels is False  # no mHC: nothing to fuse
    assert "on when training on CUDA" in " ".join(base_train.build_parser().format_help().split())


def test_resume_keeps_the_runs_own_kernel_choice(tmp_path):
    """A run saved with the kernels on resumes without the flag (it would default to off on a CPU)
    instead of stopping at 'trained with other settings'; the flag given explicitly still must match."""
    run = tmp_path / "run"
    train(run, "--mhc_enabled", "--mhc_fused_kernels", "--num_iterations", "2", "--save_every", "2")
    summary = train(run, "--mhc_enabled", "--num_iterations", "3", "--save_every", "3", "--resume")
    assert summary["steps"] == 3
    assert load_checkpoint(run / "ckpt_000003.pt")["config"]["mhc_fused_kernels"] is True
    with pytest.raises(SystemExit, match="mhc_fused_kernels: checkpoint True, now False"):
        train(run, "--mhc_enabled", "--no-mhc_fused_kernels", "--num_iterations", "4", "--resume")


def test_batch_plan_derives_accumulation_and_rejects_non_dividing_sizes():
    args = base_train.build_parser().parse_args(["--device_batch_size", "4", "--max_seq_len", "256",
                                                 "--total_batch_size", "8192"])
    assert base_train.batch_plan(args, world_size=2) == (8192, 4)
    args.total_batch_size = -1
    assert base_train.batch_plan(args, world_size=2) == (2048, 1)
    args.total_batch_size = 3000
    with pytest.raises(ValueError, match="not a multiple of"):
        base_train.batch_plan(args, world_size=2)


# ----------------------------------------------------------------------------- bpb

def test_evaluate_bpb_of_a_uniform_model_is_log2_vocab():
    tok = get_tokenizer("char")
    model = build_model(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=16, logit_softcap=0.0), "cpu", 0)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits 0: every token has probability 1/257
    x = torch.randint(0, 256, (3, 16))
    y = torch.randint(0, 256, (3, 16))
    y[0, :4] = tok.bos_id  # special tokens carry no bytes: excluded from both sums
    y[1, :2] = -1  # ignored targets too
    result = evaluate_bpb(model, [(x, y)], tok.token_bytes())
    assert result["tokens"] == 3 * 16 - 6 and result["bytes"] == 3 * 16 - 6
    assert result["bpb"] == pytest.approx(math.log2(tok.vocab_size), rel=1e-6)
    assert model.training  # mode restored


# ----------------------------------------------------------------------------- resume

def test_resume_continues_exactly(tmp_path):
    """N steps, stop, resume, N more steps == 2N uninterrupted steps, bit for bit (CPU).
    Dropout and mHC gate noise are on, so the RNG state must be restored too."""
    common = ["--num_iterations", "6", "--keep_last", "5", "--mhc_enabled", "--mhc_gate_noise", "0.2",
              "--dropout", "0.1", "--lr_schedule", "cosine", "--warmup_ratio", "0.2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full, *common, "--save_every", "3")
    resumed.mkdir()
    shutil.copy(full / "ckpt_000003.pt", resumed / "ckpt_000003.pt")  # as if killed after step 3
    summary = train(resumed, *common, "--save_every", "3", "--resume")
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3
    a, b = step_losses(full), step_losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    wa, wb = load_checkpoint(full / "final.pt")["model"], load_checkpoint(resumed / "final.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_ends_the_run_after_patience_evals(tmp_path):
    frozen = ["--matrix_lr", "0", "--embedding_lr", "0", "--unembedding_lr", "0", "--mhc_lr", "0"]
    summary = train(tmp_path, "--num_iterations", "50", "--eval_every", "1", "--early_stop_patience", "2", *frozen)
    assert summary["stop_reason"].startswith("early stop") and summary["steps"] == 2
    assert load_checkpoint(tmp_path / "final.pt")["step"] == 2
    evals = [r["val_bpb"] for r in read_metrics(tmp_path) if "val_bpb" in r and "event" not in r]
    assert len(evals) == 3 and evals[0] == evals[1] == evals[2]  # frozen weights: no new best


# ----------------------------------------------------------------------------- stopping rules and logging

def test_planned_steps_follow_the_first_rule_given():
    parser = base_train.build_parser()
    with torch.device("meta"):
        model = base_train.GPT(GPTConfig.from_depth(2, vocab_size=257, sequence_len=32))
    counts = model.num_params()
    args = parser.parse_args(["--target_tokens", "1000"])
    assert base_train.planned_steps(args, model, total_batch=128) == 8  # ceil(1000 / 128)
    args = parser.parse_args(["--num_iterations", "5", "--target_tokens", "1000"])
    assert base_train.planned_steps(args, model, total_batch=128) == 5
    args = parser.parse_args(["--time_budget_s", "60"])
    assert base_train.planned_steps(args, model, total_batch=128) is None  # the clock decides
    args = parser.parse_args(["--target_param_data_ratio", "20"])
    expected = round(20 * (counts["matrix"] + counts["lm_head"]) / 128)
    assert base_train.planned_steps(args, model, total_batch=128) == expected


def test_time_budget_stops_the_run_and_drives_the_schedule(tmp_path):
    summary = train(tmp_path, "--time_budget_s", "1.5", "--eval_every", "0", "--save_every", "0")
    assert summary["stop_reason"] == "time budget" and summary["steps"] >= 2
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert steps[0]["lr_mult"] == 1.0 and steps[-1]["lr_mult"] < 1.0  # warmdown over the last 20% of 1.5 s
    assert load_checkpoint(tmp_path / "final.pt")["step"] == summary["steps"]


def test_metrics_jsonl_and_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    summary = train(tmp_path, "--num_iterations", "2", "--mhc_enabled", "--wandb", "offline")
    records = read_metrics(tmp_path)
    step = next(r for r in records if "loss" in r)
    for key in ("loss", "lr_mult", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mib", "eta_s"):
        assert math.isfinite(step[key]), key
    evals = [r for r in records if "val_bpb" in r and "event" not in r]
    assert len(evals[0]["mhc_gates"]) == 4 and len(evals[0]["mhc_stream_sim"]) == 2  # 2L sublayers, L blocks
    assert max(evals[-1]["mhc_row_err"]) < 1e-2  # H_res stays doubly stochastic
    assert records[-1]["event"] == "done" and summary["steps"] == 2
    log_lines = (tmp_path / "train.log").read_text().splitlines()
    assert sum(line.startswith("step ") and "val bpb" in line for line in log_lines) == 2  # steps 0 and 2
    assert (tmp_path / "wandb").is_dir()


def test_overwrite_starts_afresh(tmp_path):
    train(tmp_path, "--num_iterations", "2")
    summary = train(tmp_path, "--num_iterations", "1", "--overwrite")
    assert summary["steps"] == 1 and [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1]


# ----------------------------------------------------------------------------- bad input

def test_bad_input_fails_before_any_work_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="not a multiple of"):
        train(run, "--total_batch_size", "100")
    with pytest.raises(SystemExit, match="does not exist"):
        train(run, "--data_dir", str(tmp_path / "no_such_data"))
    with pytest.raises(SystemExit, match="less than one row"):
        train(run, "--eval_tokens", "10")
    with pytest.raises(SystemExit, match="n_embd=65 is not divisible"):
        train(run, "--n_embd", "65", "--n_head", "2")
    with pytest.raises(SystemExit, match="holds no ckpt"):
        train(run, "--resume")
    assert not run.exists()

    train(run, "--num_iterations", "2", "--save_every", "1")
    before = snapshot(run)
    with pytest.raises(SystemExit, match="already holds a run"):
        train(run, "--num_iterations", "4")
    with pytest.raises(SystemExit, match=r"other settings \(n_layer: checkpoint 2, now 3"):
        base_train.main([*TINY, "--out_dir", str(run), "--num_iterations", "4", "--resume", "--depth", "3"])
    latest = run / "ckpt_000002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    truncated = snapshot(run)
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        train(run, "--num_iterations", "4", "--resume")
    assert snapshot(run) == truncated  # nothing overwritten, nothing added
    assert {k: v for k, v in before.items() if k != latest.name} == \
        {k: v for k, v in truncated.items() if k != latest.name}


# ----------------------------------------------------------------------------- distributed

@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 8])
def test_torchrun_ranks_match_single_process(tmp_path, token_cache, world_size):
    """world_size gloo ranks (8: the design's headline launch, `torchrun --nproc_per_node=8 ... --mhc_enabled`,
    on CPU) vs 1 process accumulating world_size micro-steps of the same size (one micro-batch a rank).
    Ranks read different documents than the single process, so the curves agree statistically."""
    tokens_per_rank = TINY_SETTINGS["device_batch_size"] * TINY_SETTINGS["max_seq_len"]
    common = [*TINY, "--num_iterations", "12", "--eval_every", "6", "--save_every", "0", "--mhc_enabled",
              "--total_batch_size", str(tokens_per_rank * world_size)]
    env = {**os.environ, "NANOCHAT_CACHE_DIR": str(token_cache), "OMP_NUM_THREADS": "1"}
    single = base_train.main(common + ["--out_dir", str(tmp_path / "single")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           str(SCRIPT), *common, "--out_dir", str(tmp_path / "ddp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")[-1]
    assert ddp["event"] == "done" and ddp["world_size"] == world_size and ddp["grad_accum"] == 1
    assert single["grad_accum"] == world_size
    assert ddp["rank_weight_max_diff"] == 0.0  # every rank holds identical weights
    a, b = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a[1] == pytest.approx(b[1], abs=0.01)  # same init: the first losses agree closely
    # small batches of different documents: single steps differ by up to ~25%, the curve does not
    diffs = [abs(a[s] - b[s]) / a[s] for s in a]
    assert sum(diffs) / len(diffs) < 0.06, diffs
    assert b[12] < 0.6 * b[1] and a[12] < 0.6 * a[1]  # both learn
    # the same val tokens: the final val bpb of the two runs agree closely (measured: 0.02% apart)
    assert ddp["val_bpb"] == pytest.approx(single["val_bpb"], rel=0.02)
