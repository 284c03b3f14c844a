"""Pretrain a GPT (optionally with Dynamic mHC) on one CPU, one GPU, or many GPUs with torchrun.

    python scripts/base_train.py --depth 12                                      # one GPU
    torchrun --nproc_per_node=8 scripts/base_train.py --depth 12 --mhc_enabled    # one node
    python scripts/base_train.py --depth 12 --resume                             # continue a run
    python scripts/base_train.py --preset minigpt_modern --device cpu             # a seed system (docs/presets.md)
    python scripts/base_train.py --help                                           # every flag
    python scripts/base_train.py --device cpu --depth 2 --max_seq_len 128 --device_batch_size 8 \
        --total_batch_size 1024 --tokenizer char --max_shards 1 --num_iterations 300   # laptop CPU

One dial: --depth sets the width (64 * depth), the heads and, unless a stopping rule is given,
the token budget (--target_param_data_ratio tokens per parameter). The global batch is
--total_batch_size tokens per optimizer step; each rank runs --device_batch_size rows of
--max_seq_len tokens per micro-step and gradient accumulation makes up the rest.

The run folder (--out_dir, default out/base/<run_name>) gets checkpoints (nanochat/checkpoint.py),
metrics.jsonl (one JSON object per step / eval), train.log (plain lines) and summary.json.
docs/training.md describes the flags that matter, MFU, the checkpoint format and resume;
docs/reliability.md what a kill, SIGTERM/SIGUSR1 (save, exit 0), a NaN step or a full disk does.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.checkpoint import (capture_rng_state, check_checkpoint_space, check_weights_fit,
                                 complete_interrupted_copies, estimate_checkpoint_bytes, latest_checkpoint,
                                 list_checkpoints, load_checkpoint, remove_stale_temp_files, restore_rng_state,
                                 save_checkpoint)
from nanochat.common import (autodetect_device, cleanup_distributed, dist_info, git_commit, init_distributed,
                             peak_flops, resolve_data_dir, resolve_out_dir)
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.loss_eval import evaluate_bpb, evaluate_random_windows
from nanochat.mhc import apply_mhc_preset, bound_inductor_operator_str
from nanochat.optim import build_optimizers, lr_multiplier, muon_momentum_at, set_learning_rates
from nanochat.presets import PRESETS, apply_preset, preset_summary
from nanochat.report import DummyLogger, MetricsLogger, mhc_diagnostics

SAMPLE_PROMPTS = ["The history of", "In 1905, the", "The capital of France is"]
# GPTConfig fields with a flag of their own below; every other field gets a generated flag whose
# unset value (None) keeps GPTConfig's default (or the --mhc_preset's), so the CLI never lags the model.
EXPLICIT_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio",
                   "dropout", "logit_softcap", "mhc_enabled"}
OPTION_FIELDS = [f for f in dataclasses.fields(GPTConfig) if f.name not in EXPLICIT_FIELDS]
RUN_FILES = ("best.pt", "final.pt", "metrics.jsonl", "train.log", "summary.json", "expert_usage.png")
PRESET_FLAG_NAMES = {"n_layer": "depth"}  # preset (GPTConfig) names whose flag is spelled otherwise
FLAG_DEFAULTS = {"mhc_fused_kernels": "Triton kernels for the mHC bookkeeping (default: on when training on CUDA; "
                                      "a resumed run keeps its own)"}  # generated flags whose default is not GPTConfig's


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(group, name, **kwargs):  # underscore spelling as the PRD writes it, dash spelling too
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*flags, dest=name, **kwargs)

    g = parser.add_argument_group("preset")
    add(g, "preset", default=None,
        help=f"a seed system's settings as the defaults ({', '.join(PRESETS)}; docs/presets.md); "
             f"flags given on the command line win")
    g = parser.add_argument_group("model")
    add(g, "depth", type=int, default=12, help="layers; width = 64 * depth")
    add(g, "n_embd", type=int, default=None, help="width override (default: 64 * depth)")
    add(g, "n_head", type=int, default=None, help="heads override (default: width / 128, or / 64)")
    add(g, "n_kv_head", type=int, default=None, help="key/value heads (GQA); default: n_head")
    add(g, "mlp_ratio", type=float, default=4.0, help="MLP hidden = mlp_ratio * width")
    add(g, "dropout", type=float, default=0.0, help="dropout on each branch output")
    add(g, "logit_softcap", type=float, default=15.0, help="tanh soft cap of the logits (0: off)")
    add(g, "max_seq_len", type=int, default=2048, help="training context in tokens")
    mhc = parser.add_argument_group("mHC (unset flags keep the preset's value, else GPTConfig's)")
    add(mhc, "mhc_enabled", action=argparse.BooleanOptionalAction, default=False,
        help="wrap every sublayer in Dynamic mHC")
    add(mhc, "mhc_preset", default="default", choices=["default", "prd", "paper"],
        help="mHC settings preset (docs/mhc.md)")
    options = parser.add_argument_group("model options (docs/presets.md; unset flags keep GPTConfig's default)")
    for f in OPTION_FIELDS:
        kind = {bool: argparse.BooleanOptionalAction}.get(type(f.default))
        extra = dict(action=kind) if kind else dict(type=type(f.default))
        add(mhc if f.name.startswith("mhc_") else options, f.name, default=argparse.SUPPRESS,
            help=FLAG_DEFAULTS.get(f.name, f"(default: {f.default!r})"), **extra)
    g = parser.add_argument_group("data")
    add(g, "data", default="enwiki", help="enwiki, tinyshakespeare, fineweb-edu, or a file/folder path")
    add(g, "data_dir", default=None, help="bundled data folder (default: $NANOCHAT_DATA_DIR or ../shared/data)")
    add(g, "tokenizer", default="gpt2", help="gpt2, char, or a trained tokenizer folder")
    add(g, "max_shards", type=int, default=-1, help="train shards to use (-1: all)")
    g = parser.add_argument_group("batch and stopping (the first rule given wins; time budget also caps)")
    add(g, "device_batch_size", type=int, default=16, help="rows per rank per micro-step")
    add(g, "total_batch_size", type=int, default=524288,
        help="tokens per optimizer step over all ranks (-1: device_batch_size * max_seq_len * world)")
    add(g, "num_iterations", type=int, default=-1, help="optimizer steps (-1: from the rules below)")
    add(g, "target_tokens", type=int, default=-1, help="train tokens (-1: unused)")
    add(g, "time_budget_s", type=float, default=-1, help="wall-clock seconds; alone it also drives the LR schedule")
    add(g, "target_param_data_ratio", type=float, default=20.0,
        help="tokens per (non-embedding, non-mHC) parameter when no other rule is given (Chinchilla: 20)")
    g = parser.add_argument_group("optimizer and schedule")
    add(g, "optimizer", default="muon", choices=["muon", "adamw"], help="Muon for matrices + AdamW, or AdamW only")
    add(g, "matrix_lr", type=float, default=0.02, help="Muon learning rate of the block matrices")
    add(g, "adamw_matrix_lr", type=float, default=1e-3, help="block matrices' lr with --optimizer adamw")
    add(g, "embedding_lr", type=float, default=0.2, help="AdamW lr of the token embedding (x (width/768)^-0.5)")
    add(g, "unembedding_lr", type=float, default=0.004, help="AdamW lr of the lm_head (x (width/768)^-0.5)")
    add(g, "mhc_lr", type=float, default=0.004, help="AdamW lr of the mHC parameters (x (width/768)^-0.5)")
    add(g, "scalar_lr", type=float, default=0.004, help="AdamW lr of norm gains / biases of model options")
    add(g, "scale_adam_lr_by_width", action=argparse.BooleanOptionalAction, default=True,
        help="multiply the embedding, lm_head and mHC AdamW lrs by (width/768)^-0.5 (nanochat's rule)")
    add(g, "weight_decay", type=float, default=0.0, help="decoupled decay of matrices and lm_head only")
    add(g, "adam_beta1", type=float, default=0.8, help="AdamW beta1")
    add(g, "adam_beta2", type=float, default=0.95, help="AdamW beta2")
    add(g, "grad_clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    add(g, "lr_schedule", default="warmdown", choices=["constant", "warmdown", "cosine"],
        help="after warmup: constant, linear warmdown at the end, or cosine, to --final_lr_frac")
    add(g, "warmup_ratio", type=float, default=0.0, help="fraction of the run spent warming up from 0")
    add(g, "warmdown_ratio", type=float, default=0.2, help="final fraction decayed linearly (warmdown)")
    add(g, "final_lr_frac", type=float, default=0.0, help="LR floor as a fraction of the peak")
    g = parser.add_argument_group("system")
    add(g, "device", default="auto", help="cuda, cpu, mps, or auto")
    add(g, "dtype", default="auto", choices=["auto", "bfloat16", "float32"],
        help="autocast dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    add(g, "compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile (default: on for CUDA, off otherwise)")
    add(g, "compile_scope", default="model", choices=["model", "blocks"],
        help="compile the whole model (fastest) or each block (much shorter compile)")
    add(g, "activation_checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    add(g, "seed", type=int, default=42, help="model init, data order and dropout seed")
    g = parser.add_argument_group("evaluation, output and logging")
    add(g, "eval_every", type=int, default=250, help="val bpb every N steps (<= 0: only at saves and the end)")
    add(g, "eval_tokens", type=int, default=262144, help="val tokens per eval, the same each time (0: no eval)")
    add(g, "sample_every", type=int, default=1000, help="text samples every N steps and at the end (-1: never)")
    add(g, "sample_tokens", type=int, default=32, help="new tokens per greedy sample")
    add(g, "early_stop_patience", type=int, default=0, help="stop after N evals without a new best (0: off)")
    add(g, "early_stop_min_delta", type=float, default=0.0,
        help="improvement (val bpb, or val_loss in nats with --eval_iters) that counts as new best")
    add(g, "early_stop_after", type=int, default=0, help="early stopping cannot fire before this step")
    add(g, "eval_iters", type=int, default=0,
        help="> 0: also val_loss = mean CE (nats/token) over this many batches of random val windows "
             "(seeded, the same each eval); early stopping and best.pt then follow val_loss")
    add(g, "out_dir", default=None, help="the run folder (default: $NANOCHAT_OUT_DIR or out/, + base/<run_name>)")
    add(g, "run_name", default=None, help="run name (default: d<depth>, + _mhc)")
    add(g, "save_every", type=int, default=1000, help="checkpoint every N steps (0: only final, -1: never)")
    add(g, "keep_last", type=int, default=2, help="training checkpoints kept (plus best.pt and final.pt)")
    add(g, "resume", nargs="?", const="latest", default=None, choices=["latest", "auto"],
        help="continue from the run folder's latest checkpoint ('auto': if there is one, else start)")
    add(g, "overwrite", action="store_true", help="delete the run folder's checkpoints and logs first")
    add(g, "log_every", type=int, default=10, help="plain log line every N steps")
    add(g, "wandb", default="disabled", choices=["disabled", "offline", "online"],
        help="also log to wandb ('offline' needs no network)")
    add(g, "wandb_project", default="nanochat-mhc", help="wandb project name")
    add(g, "dry_run", action="store_true", help="check the flags and print the plan; train nothing")
    g = parser.add_argument_group("faults (docs/reliability.md)")
    add(g, "max_nonfinite_steps", type=int, default=5,
        help="stop after this many steps in a row with a NaN/Inf loss or gradient (each is skipped: no update)")
    add(g, "debug_inject_nan_steps", default="", help="tests only: comma-separated steps whose loss is made NaN")
    add(g, "deterministic", action="store_true",
        help="torch.use_deterministic_algorithms: bit-identical repeats on GPU (kill/resume tests); slower")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with --preset's settings (nanochat/presets.py) as the defaults: parsed once to find
    the preset, then again with parser.set_defaults, so that flags given explicitly win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is None:
        return args
    defaults = preset_defaults(args.preset)
    missing = sorted(set(defaults) - {action.dest for action in parser._actions})
    if missing:
        raise ValueError(f"preset {args.preset!r} sets {missing}, which scripts/base_train.py has no flags for; "
                         f"add them to build_parser or fix nanochat/presets.py")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def preset_defaults(name: str) -> dict:
    """{flag dest: value} of a preset; a clear ValueError naming the presets for an unknown name."""
    model, trainer = apply_preset(name)
    return {PRESET_FLAG_NAMES.get(k, k): v for k, v in {**model, **trainer}.items()}


def preset_notes(args, total_steps: int | None) -> list[str]:
    """What a --preset run takes from the command line and what it scales (printed and logged)."""
    defaults = preset_defaults(args.preset)
    explicit = {k: getattr(args, k) for k, v in defaults.items() if getattr(args, k) != v}
    notes = [f"preset {args.preset}" + (f" with explicit flags {explicit}" if explicit else "") +
             "; what it reproduces and what differs: train.log, docs/presets.md"]
    full = defaults["num_iterations"]
    if total_steps is None:
        notes.append(f"note: scaled run: the time budget decides the steps (the preset's full run is {full})")
    elif total_steps < full:
        notes.append(f"note: scaled run: {total_steps} of the preset's {full} steps (the LR schedule spans "
                     f"{total_steps})")
    return notes


def budget_note(args, total_steps: int | None, step: int, train_time_s: float, step_s: float) -> str | None:
    """A note when --time_budget_s cannot cover the planned steps at the measured step time."""
    if args.time_budget_s <= 0 or total_steps is None or step_s <= 0:
        return None
    reachable = step + int(max(0.0, args.time_budget_s - train_time_s) / step_s)
    if reachable >= total_steps:
        return None
    return (f"note: at {step_s:.2f} s/step the time budget of {args.time_budget_s:.0f} s covers about "
            f"{reachable} of the {total_steps} steps, so the run will stop with its LR schedule unfinished; "
            f"for a complete scaled run pass --num_iterations {max(1, reachable)}")


# ----------------------------------------------------------------------------- plan (no side effects)

def model_config(args, vocab_size: int, device_type: str = "cpu") -> GPTConfig:
    options = apply_mhc_preset({}, args.mhc_preset)
    options.update({f.name: getattr(args, f.name) for f in OPTION_FIELDS if hasattr(args, f.name)})
    if args.mhc_enabled and "mhc_fused_kernels" not in options:
        # unset: the Triton kernels on CUDA, where they train like the reference at a third of its
        # step time (docs/benchmarks.md); elsewhere the reference, which is what they run there anyway
        options["mhc_fused_kernels"] = device_type == "cuda"
    return GPTConfig.from_depth(args.depth, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                                sequence_len=args.max_seq_len, vocab_size=vocab_size, mlp_ratio=args.mlp_ratio,
                                dropout=args.dropout, logit_softcap=args.logit_softcap,
                                mhc_enabled=args.mhc_enabled, **options)


def batch_plan(args, world_size: int) -> tuple[int, int]:
    """(total_batch_size, grad_accum_steps); a clear error when the sizes do not divide."""
    for name in ("device_batch_size", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    total = per_micro_step if args.total_batch_size == -1 else args.total_batch_size
    if total < 1 or total % per_micro_step:
        raise ValueError(
            f"--total_batch_size={args.total_batch_size} is not a multiple of device_batch_size * max_seq_len "
            f"* world_size = {args.device_batch_size} * {args.max_seq_len} * {world_size} = {per_micro_step}; "
            f"use a multiple such as {max(1, round(total / per_micro_step)) * per_micro_step} (or -1)")
    return total, total // per_micro_step


def planned_steps(args, model: GPT, total_batch: int) -> int | None:
    """Optimizer steps of the run, or None when only --time_budget_s bounds it."""
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_tokens > 0:
        return math.ceil(args.target_tokens / total_batch)
    if args.time_budget_s > 0:
        return None
    counts = model.num_params()  # the baseline's count, so mHC and baseline get the same budget
    return max(1, round(args.target_param_data_ratio * (counts["matrix"] + counts["lm_head"]) / total_batch))


def run_folder(args) -> Path:
    if args.out_dir:
        return Path(args.out_dir).resolve()
    name = args.run_name or (args.preset or f"d{args.depth}") + ("_mhc" if args.mhc_enabled else "")
    return resolve_out_dir() / "base" / name


def check_resume(ckpt: dict, path: Path, config: GPTConfig, tokenizer, args):
    """A resumed run must be the same model, tokenizer and data; other changed flags only warn."""
    saved = ckpt["config"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in config.to_dict().items() if saved.get(k) != v]
    if ckpt.get("tokenizer") and ckpt["tokenizer"] != tokenizer.to_state():
        diffs.append(f"tokenizer: checkpoint {ckpt['tokenizer'].get('kind')!r}, now {args.tokenizer!r}")
    old_args = (ckpt.get("meta") or {}).get("args", {})
    if old_args.get("data", args.data) != args.data:
        diffs.append(f"data: checkpoint {old_args['data']!r}, now {args.data!r}")
    if diffs:
        raise ValueError(f"--resume: {path} was trained with other settings ({'; '.join(diffs)}). Rerun with the "
                         f"checkpoint's flags, or start a new run with another --out_dir")
    changed = [k for k, v in old_args.items() if k not in ("resume", "dry_run", "overwrite") and vars(args).get(k, v) != v]
    return changed


LR_FLAGS = ("matrix_lr", "adamw_matrix_lr", "embedding_lr", "unembedding_lr", "mhc_lr", "scalar_lr")
UNIT_INTERVAL_FLAGS = ("warmup_ratio", "warmdown_ratio", "final_lr_frac")


def check_optimizer_and_fault_flags(args):
    """Values argparse's types let through but training cannot use (a negative LR trains backwards)."""
    for name in LR_FLAGS + ("weight_decay", "grad_clip"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name}={value} must be a finite number >= 0")
    for name in UNIT_INTERVAL_FLAGS:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name}={getattr(args, name)} must be in [0, 1]")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name}={getattr(args, name)} must be in [0, 1)")
    if args.max_nonfinite_steps < 1:
        raise ValueError(f"--max_nonfinite_steps={args.max_nonfinite_steps} must be >= 1 (1: stop at the first one)")
    debug_nan_steps(args)


def debug_nan_steps(args) -> set[int]:
    """--debug_inject_nan_steps '3,4' -> {3, 4}: the steps (as logged, from 1) whose loss is poisoned."""
    try:
        steps = {int(v) for v in args.debug_inject_nan_steps.split(",") if v.strip()}
    except ValueError:
        raise ValueError(f"--debug_inject_nan_steps={args.debug_inject_nan_steps!r} must be comma-separated step "
                         f"numbers, e.g. 3,4") from None
    if any(v < 1 for v in steps):
        raise ValueError(f"--debug_inject_nan_steps={args.debug_inject_nan_steps!r}: steps count from 1")
    return steps


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM sends before it preempts a job or at --signal time) ask the run to
    stop: the handler only records the signal's name; the training loop finishes the step in flight,
    saves a checkpoint and exits with status 0 (docs/reliability.md). A context manager, so that the
    previous handlers come back (main() also runs inside tests)."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- helpers

def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rank0_value(value: float, device) -> float:
    """Rank 0's value on every rank (wall-clock decisions must agree across ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def weights_in_sync(model, device) -> float:
    """Max over parameters of (max - min across ranks) of float64 checksums (sum and sum of
    squares of each parameter): 0 when the ranks hold the same weights."""
    sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                        for p in model.parameters()]).to(device)
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the prompts, batched through the KV-cache Engine."""
    from nanochat.engine import Engine

    tokens = [tokenizer.encode(p, prepend_bos=True) for p in prompts]
    results = Engine(model, tokenizer).generate(tokens, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    return [p + r.text for p, r in zip(prompts, results)]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    with StopSignals() as stop_signals:  # from the start: a SIGTERM during startup must not kill the run
        return run(argv, stop_signals)


def run(argv, stop_signals: StopSignals):
    try:
        args = parse_args(argv)
        plan = check_inputs(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None  # bad input: one clear line, not a traceback
    if args.dry_run:
        print(json.dumps({k: v for k, v in plan.items() if k not in ("tokenizer", "ckpt", "config", "data_dir")}
                         | {"config": plan["config"].to_dict()}, indent=2, default=str))
        return None
    ckpt, total_steps = plan["ckpt"], plan["total_steps"]
    if ckpt is not None and total_steps is not None and ckpt["step"] >= total_steps:
        if dist_info()[1] == 0:  # a kill after the last save may have cut its best.pt / final.pt copy short
            complete_interrupted_copies(plan["run_dir"], plan["resume_path"], ckpt)
        print(f"{plan['run_dir']} already finished ({ckpt['step']} of {total_steps} steps); nothing to do")
        return None
    if args.deterministic:  # before CUDA starts: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    is_dist, rank, local_rank, world_size, device = init_distributed(plan["device_type"])
    try:
        summary = train(args, device, rank, stop_signals=stop_signals, **plan)
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    cleanup_distributed()
    return summary


def check_inputs(args) -> dict:
    """Everything that can be wrong with the input, checked before any work or write."""
    from nanochat.dataset import corpus_sources
    from nanochat.tokenizer import get_tokenizer

    _, _, _, world_size = dist_info()
    device_type = autodetect_device(args.device)
    total_batch, grad_accum = batch_plan(args, world_size)
    check_optimizer_and_fault_flags(args)
    # eval rows per rank per batch: the device batch, or fewer when --eval_tokens is small
    eval_batch = min(args.device_batch_size, max(args.eval_tokens, 0) // (args.max_seq_len * world_size))
    if args.eval_iters > 0 and args.eval_tokens <= 0:
        raise ValueError(f"--eval_iters={args.eval_iters} needs evals: set --eval_tokens > 0 (or --eval_iters 0)")
    if args.early_stop_after < 0 or args.eval_iters < 0:
        raise ValueError("--early_stop_after and --eval_iters must be >= 0")
    if args.eval_tokens > 0 and eval_batch < 1:
        raise ValueError(f"--eval_tokens={args.eval_tokens} is less than one row of max_seq_len={args.max_seq_len} "
                         f"per rank ({world_size} ranks); use at least {args.max_seq_len * world_size}, or 0 for no eval")
    data_dir = resolve_data_dir(args.data_dir) if (args.data in ("enwiki", "tinyshakespeare")
                                                   or args.tokenizer == "gpt2" or args.data_dir) else None
    if args.max_shards == 0 or args.max_shards < -1:
        raise ValueError(f"--max_shards={args.max_shards}: use a positive number of shards, or -1 for all")
    max_shards = args.max_shards if args.max_shards > 0 else None
    corpus_sources(args.data, "train", data_dir, max_shards)  # the files exist (no tokenizing yet)
    tokenizer = get_tokenizer(args.tokenizer, data_dir)
    config = model_config(args, tokenizer.vocab_size, device_type)
    run_dir = run_folder(args)
    existing = list_checkpoints(run_dir) + [run_dir / f for f in RUN_FILES if (run_dir / f).exists()]
    resume_path = latest_checkpoint(run_dir) if args.resume else None
    if args.resume == "latest" and resume_path is None:
        raise FileNotFoundError(f"--resume: {run_dir} holds no ckpt_*.pt to continue from (use --resume auto to "
                                f"start afresh when there is none)")
    if existing and not args.resume and not args.overwrite:
        raise ValueError(f"run folder {run_dir} already holds a run ({existing[0].name}); pass --resume to continue "
                         f"it, --overwrite to delete it and start again, or choose another --out_dir")
    ckpt, changed = None, []
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if not hasattr(args, "mhc_fused_kernels") and "mhc_fused_kernels" in ckpt["config"]:
            # unset on resume: keep the run's own choice (the same weights either way; a run started
            # before the CUDA default changed resumes as it was)
            config = dataclasses.replace(config, mhc_fused_kernels=ckpt["config"]["mhc_fused_kernels"])
        changed = check_resume(ckpt, resume_path, config, tokenizer, args)
    with torch.device("meta"):
        meta_model = GPT(config)
    if ckpt is not None:
        check_weights_fit(ckpt["model"], meta_model, resume_path)
        if not ckpt.get("optimizer"):
            raise ValueError(f"--resume: {resume_path} holds no optimizer state (a model-only checkpoint, e.g. "
                             f"from scripts/sft.py); resuming needs a training checkpoint (ckpt_*.pt)")
    # room for the kept checkpoints + the one being written + best.pt + final.pt (keep_last <= 0 keeps
    # them all: at least 3); no checkpoints at all with --save_every -1, but the logs need a writable folder
    copies = 0 if args.save_every < 0 else (args.keep_last + 1 if args.keep_last > 0 else 3) + 2
    check_checkpoint_space(run_dir, estimate_checkpoint_bytes(meta_model), copies)
    return dict(device_type=device_type, world_size=world_size, total_batch=total_batch, grad_accum=grad_accum,
                total_steps=planned_steps(args, meta_model, total_batch), params=meta_model.num_params(),
                flops_per_token=meta_model.estimate_flops_per_token(include_mhc=False), run_dir=run_dir,
                resume_path=resume_path, changed=changed, data_dir=data_dir, max_shards=max_shards, eval_batch=eval_batch,
                tokenizer=tokenizer, config=config, ckpt=ckpt)


class RunLog:
    """Rank 0's plain lines: stdout (through the tqdm bar on a terminal) and run_dir/train.log."""

    def __init__(self, run_dir: Path, master: bool):
        self.master = master
        self.file = open(run_dir / "train.log", "a", encoding="utf-8") if master else None
        self.bar = None

    def __call__(self, msg: str, console: bool = True):
        if not self.master:
            return
        self.file.write(msg + "\n")
        self.file.flush()
        if console:
            (self.bar.write if self.bar is not None else lambda m: print(m, flush=True))(msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


@dataclasses.dataclass
class RunState:
    """Counters that a checkpoint carries in its meta, so that a resumed run continues them."""
    step: int = 0
    train_time_s: float = 0.0  # time inside optimizer steps (the time budget counts this)
    best_val_bpb: float = math.inf  # over all evals: early stopping
    best_saved_val_bpb: float = math.inf  # over evals at saves: best.pt
    bad_evals: int = 0
    val_bpb: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None  # --eval_iters: mean CE over random val windows (nats/token)
    best_val_loss: float = math.inf  # over all evals; with --eval_iters early stopping follows it
    best_saved_val_loss: float = math.inf  # over evals at saves: best.pt with --eval_iters
    best_step: int | None = None  # the eval step of the best watched metric (val_loss, else val bpb)
    nonfinite_steps: int = 0  # steps skipped (no update) for a NaN/Inf loss or gradient
    nonfinite_in_a_row: int = 0  # --max_nonfinite_steps stops the run when this reaches it

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        meta = ckpt.get("meta") or {}
        return cls(step=ckpt["step"], **{f.name: meta[f.name] for f in dataclasses.fields(cls)
                                         if f.name != "step" and f.name in meta})


def track_eval(state: RunState, record: dict, step: int, args):
    """Bests and the early-stopping counter after an eval. With --eval_iters the watched metric is
    val_loss (seed 002's best_val), else val bpb; a new best must beat the old by the min delta."""
    state.val_bpb = record["val_bpb"]
    if args.eval_iters > 0:
        state.val_loss = record["val_loss"]
        state.best_val_bpb = min(state.best_val_bpb, state.val_bpb)
        improved = state.val_loss < state.best_val_loss - args.early_stop_min_delta
        if improved:
            state.best_val_loss = state.val_loss
        record["best_val_loss"] = state.best_val_loss
    else:
        improved = state.val_bpb < state.best_val_bpb - args.early_stop_min_delta
        if improved:
            state.best_val_bpb = state.val_bpb
    state.bad_evals = 0 if improved else state.bad_evals + 1
    state.best_step = step if improved else state.best_step
    record["best_val_bpb"] = state.best_val_bpb


def restore_training_state(ckpt, model, optimizers, loader, make_loader, rank, world_size, device, log):
    """Model, optimizers (keeping this command's LRs), loader position and RNG from a checkpoint."""
    model.load_state_dict(ckpt["model"])
    for opt, saved in zip(optimizers, ckpt["optimizer"]):
        base_lrs = [g["base_lr"] for g in opt.param_groups]
        opt.load_state_dict(saved)
        for group, lr in zip(opt.param_groups, base_lrs):
            group["base_lr"] = lr  # this command's LR flags win over the saved ones
    loader_states = ckpt.get("loader") or []
    if len(loader_states) == world_size:
        loader.load_state_dict(loader_states[rank])
    else:
        log(f"warning: the checkpoint has loader states for {len(loader_states)} ranks, this run has "
            f"{world_size}: the data order restarts (seeded by the step)")
        loader = make_loader(seed_offset=ckpt["step"])
    if ckpt.get("rng"):
        restore_rng_state(ckpt["rng"], rank, device)
    return loader


def optimizer_step(train_model, model, optimizers, loader, no_sync, autocast, grad_accum, grad_clip, is_moe,
                   stop_requested=lambda: False, poison_loss=False):
    """grad_accum micro-steps (DDP all-reduces on the last only), clip, then step unless the loss or the
    gradient is NaN/Inf on some rank. Returns (loss averaged over ranks, grad norm, updated, stop):
    one all-reduce carries the loss and two flags (non-finite here, stop_requested() here, asked
    after the backward so that a signal during this step stops the run after it), so every rank
    skips the same steps and stops at the same step."""
    loss_sum = 0.0
    for micro in range(grad_accum):
        x, y = loader.next_batch()
        with no_sync() if micro < grad_accum - 1 else contextlib.nullcontext():
            with autocast():
                loss = train_model(x, y)
                if poison_loss:  # --debug_inject_nan_steps: NaN gradients too, as a real blow-up gives
                    loss = loss * float("nan")
                total = loss + model.aux_loss() if is_moe else loss  # MoE load balancing etc.
            (total / grad_accum).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    loss = (loss_sum / grad_accum).double()
    flags = torch.stack([loss, (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).double(),
                         torch.tensor(float(stop_requested()), dtype=torch.float64, device=loss.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    # the one host sync of the step, before the update: skipping a bad step needs the flag's value
    loss_sum_ranks, bad_ranks, stop_ranks = flags.tolist()
    updated = bad_ranks == 0
    if updated:
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return loss_sum_ranks / world, grad_norm, updated, stop_ranks > 0


def moe_eval_stats(model) -> dict:
    """Per MoE layer, from the last forward: routed assignments per expert, dropped assignments
    (capacity), mean router entropy (nats)."""
    stats = model.moe_stats()
    return dict(moe_tokens_per_expert=[s["tokens_per_expert"].tolist() for s in stats],
                moe_dropped=[int(s["dropped"]) for s in stats],
                moe_router_entropy=[s["router_entropy"].item() for s in stats])


def save_expert_usage_plot(model, path: Path, step: int, log):
    """Heatmap of the fraction of assignments per expert and layer (seed 003's usage analysis)."""
    from nanochat.moe import expert_usage, plot_expert_usage

    try:
        plot_expert_usage(expert_usage(model.moe_layers()), path, title=f"expert usage, step {step}")
    except Exception as e:  # a plot is a courtesy: it must never end a training run
        log(f"warning: expert usage plot failed ({type(e).__name__}: {e})")


def step_summary(step_times, total_batch, flops_per_token, peak, world_size) -> dict:
    """Steady-state speed: medians over the steps after the first three (compile, warm-up)."""
    if len(step_times) < 2:
        return dict(tokens_per_s=None, mfu=None, median_step_s=None, compile_s=None,
                    first_step_s=step_times[0] if step_times else None)
    median = statistics.median(step_times[min(3, len(step_times) - 1):])
    return dict(tokens_per_s=total_batch / median, mfu=flops_per_token * total_batch / median / (peak * world_size),
                median_step_s=median, first_step_s=step_times[0], compile_s=step_times[0] - median)


def matrix_lr(optimizers) -> float:
    return next(g["lr"] for opt in optimizers for g in opt.param_groups if g.get("kind") == "matrix")


def finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None


def skip_nonfinite_step(state: RunState, grad_norm, args, run_dir: Path, log):
    """Count a step whose update was skipped for a NaN/Inf loss or gradient; after
    --max_nonfinite_steps in a row, stop without saving (the last checkpoint stays as it was)."""
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    log(f"warning: step {state.step}: loss {state.train_loss} / grad norm {grad_norm.item()} is not finite; update "
        f"skipped ({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in all)")
    if state.nonfinite_in_a_row >= args.max_nonfinite_steps:
        first, latest = state.step - state.nonfinite_in_a_row + 1, latest_checkpoint(run_dir)
        message = (f"error: steps {first}..{state.step} all had a non-finite loss or gradient "
                   f"(--max_nonfinite_steps {args.max_nonfinite_steps}): stopped at step {state.step} without saving; "
                   f"{f'the last checkpoint {latest.name} is untouched' if latest else 'no checkpoint was saved'}. "
                   f"Lower the learning rates or check the data, then rerun with --resume")
        log(message, console=False)  # the console gets it once, from SystemExit
        raise SystemExit(message)


def train(args, device, rank, *, world_size, tokenizer, data_dir, max_shards, config, run_dir, ckpt, resume_path,
          changed, total_batch, grad_accum, total_steps, flops_per_token, eval_batch, stop_signals=None, **_):
    from nanochat.dataloader import TokenLoader, val_batches
    from nanochat.dataset import load_shard, prepare_corpus

    master = rank == 0
    try:  # a corpus that is empty or shorter than a batch ends the run here, before it writes anything
        train_shards = prepare_corpus(args.data, tokenizer, "train", data_dir, max_shards)
        val_shards = prepare_corpus(args.data, tokenizer, "val", data_dir) if args.eval_tokens > 0 else []

        def make_loader(seed_offset=0):
            return TokenLoader(train_shards, args.device_batch_size, args.max_seq_len, rank=rank,
                               world_size=world_size, seed=args.seed + seed_offset, device=device)

        loader = make_loader()
        if val_shards:
            next(val_batches(val_shards, eval_batch, args.max_seq_len, args.eval_tokens, rank, world_size))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if master:
        if args.overwrite and not args.resume:
            for path in list_checkpoints(run_dir) + [run_dir / f for f in RUN_FILES]:
                path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, master)
    if master:  # what a kill during a save leaves behind (nanochat/checkpoint.py)
        for path in remove_stale_temp_files(run_dir):
            log(f"removed {path.name}: a save that a killed run did not finish")
        for name in complete_interrupted_copies(run_dir, resume_path, ckpt) if ckpt is not None else []:
            log(f"made {name} from {resume_path.name}: the run was killed before copying it")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bfloat16": torch.bfloat16,
             "float32": None}[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    # --eval_iters: random windows anywhere in the val split, so the whole split as one stream
    val_stream = (torch.from_numpy(np.concatenate([load_shard(p)[0] for p in val_shards]).astype(np.int64))
                  if args.eval_iters > 0 else None)

    model = build_model(config, device, seed=args.seed)
    model.activation_checkpointing = args.activation_checkpointing
    torch.manual_seed(args.seed + 1 + rank)  # per-rank stream for dropout / gate noise, apart from the init
    optimizers = build_optimizers(
        model, args.optimizer, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr, mhc_lr=args.mhc_lr, scalar_lr=args.scalar_lr,
        adamw_matrix_lr=args.adamw_matrix_lr, weight_decay=args.weight_decay,
        adam_betas=(args.adam_beta1, args.adam_beta2), scale_adam_lr_by_width=args.scale_adam_lr_by_width)

    state = RunState()
    if ckpt is not None:
        loader = restore_training_state(ckpt, model, optimizers, loader, make_loader, rank, world_size, device, log)
        state = RunState.from_checkpoint(ckpt)
        del ckpt

    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    if compile_on:
        bound_inductor_operator_str()  # else compiling the fused mHC stack can hang (torch 2.11)
    if compile_on and args.compile_scope == "blocks":
        for block in model.transformer.h:
            block.compile()  # in place: state_dict names stay those of the bare model
    fwd_model = torch.compile(model) if compile_on and args.compile_scope == "model" else model
    # Compile first, then DDP: the graph is the single-GPU one (same compile time, inductor cache
    # hits), and DDP's all-reduce, which runs once per optimizer step (no_sync on the other
    # micro-steps), starts after the last backward instead of overlapping it: a few ms a step.
    # broadcast_buffers=False: the only buffers (rotary tables, fixed mHC alphas) are computed
    # identically on every rank; re-sending them from rank 0 every forward would be waste.
    train_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True, broadcast_buffers=False) if world_size > 1 else fwd_model
    no_sync = train_model.no_sync if world_size > 1 else contextlib.nullcontext
    # evals, samples and diagnostics run the bare model eagerly: no recompiles for eval mode or
    # for the growing shapes of generation
    eager = (lambda: torch.compiler.set_stance("force_eager")) if compile_on else contextlib.nullcontext

    peak, peak_name = peak_flops(device)
    token_bytes = tokenizer.token_bytes()
    logger = (MetricsLogger(run_dir, args.wandb, args.wandb_project, run_dir.name, vars(args)) if master
              else DummyLogger())
    nparams = model.num_params()
    is_moe = bool(model.moe_layers())
    log(f"run {run_dir} | world {world_size} | device {device} ({peak_name}, peak {peak / 1e12:.0f} TFLOP/s) | "
        f"params {nparams} | {flops_per_token / 1e6:.1f} MFLOP/token (baseline) | batch {total_batch} tokens = "
        f"{world_size} x {grad_accum} x {args.device_batch_size} x {args.max_seq_len} | steps "
        f"{total_steps if total_steps else f'until {args.time_budget_s:.0f} s'} | compile {compile_on}")
    if args.preset:
        for note in preset_notes(args, total_steps):
            log(note)
        log(preset_summary(args.preset).replace("\n", "\n    "), console=False)
        train_tokens = sum(load_shard(p)[2]["num_tokens"] for p in train_shards)
        if total_steps:
            log(f"{total_steps} steps x {total_batch:,} tokens = {total_steps * total_batch / train_tokens:.1f} epochs "
                f"of the train split ({train_tokens:,} tokens)")
    if resume_path is not None:
        log(f"resumed from {resume_path} at step {state.step}" + (f"; changed flags: {changed}" if changed else ""))
        logger.log({"event": "resume", "from": str(resume_path)}, state.step)
    if master and sys.stdout.isatty():
        from tqdm import tqdm
        log.bar = tqdm(total=total_steps, initial=state.step, dynamic_ncols=True)

    def evaluate() -> dict:
        batches = val_batches(val_shards, eval_batch, args.max_seq_len, args.eval_tokens,
                              rank=rank, world_size=world_size, device=device)
        t0 = time.time()
        with autocast(), eager():
            record = {"val_bpb": evaluate_bpb(model, batches, token_bytes)["bpb"]}
            if args.eval_iters > 0:
                record["val_loss"] = evaluate_random_windows(
                    model, val_stream, args.eval_iters, args.device_batch_size, args.max_seq_len, seed=args.seed,
                    rank=rank, world_size=world_size, device=device)["loss"]
            record["eval_s"] = time.time() - t0
            if is_moe:  # routing of the last eval batch (before the mHC probe below runs another forward)
                record.update(moe_eval_stats(model))
                if master:
                    save_expert_usage_plot(model, run_dir / "expert_usage.png", state.step, log)
            if config.mhc_enabled:  # rank 0's first val rows are enough to see what mHC does
                rows = min(2, args.device_batch_size)
                x, _ = next(iter(val_batches(val_shards, rows, args.max_seq_len, rows * args.max_seq_len,
                                             device=device)))
                record.update(mhc_diagnostics(model, x))
        return record

    def save(final: bool):
        if args.eval_iters > 0:  # best.pt follows the metric that early stopping watches
            best = state.val_loss is not None and state.val_loss < state.best_saved_val_loss
            if best:
                state.best_saved_val_loss = state.val_loss
        else:
            best = state.val_bpb is not None and state.val_bpb < state.best_saved_val_bpb
            if best:
                state.best_saved_val_bpb = state.val_bpb
        if world_size > 1:  # every rank takes part in the gathers
            loader_states = [None] * world_size
            dist.all_gather_object(loader_states, loader.state_dict())
        else:
            loader_states = [loader.state_dict()]
        rng = capture_rng_state(device)
        if master:
            meta = dict(dataclasses.asdict(state), commit=git_commit(), world_size=world_size,
                        tokens=state.step * total_batch,
                        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
            try:
                path = save_checkpoint(run_dir, state.step, model, optimizers, meta, loader_states, rng,
                                       args.keep_last, tokenizer=tokenizer, best=best, final=final)
            except OSError as e:  # full disk, lost permissions: the earlier checkpoints stay as they were
                latest = latest_checkpoint(run_dir)
                raise SystemExit(f"error: saving the step {state.step} checkpoint in {run_dir} failed "
                                 f"({e.strerror or e}); {f'{latest.name} is intact' if latest else 'nothing was saved'}"
                                 f". Free disk space or fix the folder, then rerun with --resume") from None
            log(f"saved {path.name}" + (" (best)" if best else "") + (" (final)" if final else ""))

    def samples():
        model.eval()  # no dropout / gate noise
        try:
            with autocast(), eager():
                new_tokens = min(args.sample_tokens, config.sequence_len // 2)
                for text in greedy_samples(model, tokenizer, SAMPLE_PROMPTS, new_tokens):
                    log(f"sample: {text!r}")
        except Exception as e:  # a sample is a courtesy: it must never end a training run
            log(f"warning: sampling failed ({type(e).__name__}: {e})")
        model.train()

    step_times, stop_reason, start_step, run_start = [], None, state.step, time.time()
    stop_signals = stop_signals or StopSignals()
    stop_signal, nan_steps = None, debug_nan_steps(args)  # stop_signal: seen by some rank, agreed by all
    while True:
        # ---- stop? evaluate, sample, save (each rank takes the same decisions)
        elapsed = rank0_value(state.train_time_s, device) if args.time_budget_s > 0 else state.train_time_s
        if stop_signal is not None:  # preempted: the usual eval and save, but not final
            stop_reason = f"signal {stop_signal}"
        elif total_steps is not None and state.step >= total_steps:
            stop_reason = "steps"
        elif args.time_budget_s > 0 and elapsed >= args.time_budget_s:
            stop_reason = "time budget"
        step, last, ran = state.step, stop_reason is not None, state.step > start_step
        # no periodic save inside a run of non-finite steps: if the model itself has gone bad, the saves
        # before it must not be pushed out by --keep_last (the last save of a run still happens)
        save_due = args.save_every >= 0 and ran and (last or (args.save_every > 0 and step % args.save_every == 0
                                                              and state.nonfinite_in_a_row == 0))
        if args.eval_tokens > 0 and (save_due or last or (args.eval_every > 0 and step % args.eval_every == 0)):
            record = evaluate()
            track_eval(state, record, step, args)
            logger.log(record, step)
            mhc = (f" | mHC gate {record['mhc_gate_mean']:.3f} H_res diag {record['mhc_hres_diag_mean']:.3f} "
                   f"sinkhorn err {max(record['mhc_row_err_max'], record['mhc_col_err_max']):.1e} stream sim "
                   f"{record['mhc_stream_sim_mean']:.3f}") if config.mhc_enabled else ""
            loss = (f" | val loss {state.val_loss:.4f} (best {state.best_val_loss:.4f} at step {state.best_step})"
                    if args.eval_iters > 0 else "")
            log(f"step {step} | val bpb {state.val_bpb:.4f} (best {state.best_val_bpb:.4f}){loss}{mhc}")
            if (args.early_stop_patience > 0 and state.bad_evals >= args.early_stop_patience and not last
                    and step >= args.early_stop_after):
                stop_reason, last = f"early stop ({state.bad_evals} evals without a new best)", True
                save_due = args.save_every >= 0 and ran
        if master and args.sample_every > 0 and ran and (last or step % args.sample_every == 0):
            samples()
        if save_due:
            save(final=last and stop_signal is None)
        if last:
            break

        # ---- one optimizer step
        t0 = time.time()
        # the schedule at the middle of the step: neither the first warmup step nor the last
        # warmdown step gets a zero learning rate
        progress = (step + 0.5) / total_steps if total_steps else elapsed / args.time_budget_s
        lrm = lr_multiplier(progress, args.lr_schedule, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_learning_rates(optimizers, lrm)
        for opt in optimizers[1:]:  # Muon
            for group in opt.param_groups:
                group["momentum"] = muon_momentum_at(step)
        state.train_loss, grad_norm, updated, signalled = optimizer_step(
            train_model, model, optimizers, loader, no_sync, autocast, grad_accum, args.grad_clip, is_moe,
            stop_requested=lambda: stop_signals.received is not None, poison_loss=step + 1 in nan_steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.time() - t0
        state.train_time_s += dt
        state.step += 1
        step_times.append(dt)
        if signalled:
            stop_signal = stop_signals.received or "from another rank"
        if not updated:
            skip_nonfinite_step(state, grad_norm, args, run_dir, log)
        else:
            state.nonfinite_in_a_row = 0

        # ---- log it
        tokens_per_s = total_batch / dt
        mfu = flops_per_token * tokens_per_s / (peak * world_size)
        eta = ((total_steps - state.step) * statistics.median(step_times[-20:]) if total_steps
               else max(0.0, args.time_budget_s - state.train_time_s))
        metrics = dict(loss=state.train_loss, lr=matrix_lr(optimizers), lr_mult=lrm, grad_norm=grad_norm.item(), step_s=dt,
                       tokens_per_s=tokens_per_s, mfu=mfu, peak_mem_mib=peak_memory_mib(device), eta_s=eta,
                       tokens=state.step * total_batch)
        if is_moe:  # the last micro-step's auxiliary losses (unweighted), rank 0's view
            metrics.update({k: v.item() for k, v in model.aux_losses().items()})
        logger.log(metrics, state.step)
        if len(step_times) == 6:  # the first steps' median (the first one compiles): can the budget cover the run?
            note = budget_note(args, total_steps, state.step, state.train_time_s, statistics.median(step_times[1:]))
            if note:
                log(note)
        if log.bar is not None:
            log.bar.update(1)
            log.bar.set_postfix(loss=f"{state.train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
        if state.step % args.log_every == 0 or state.step == start_step + 1:
            log(f"step {state.step}{f'/{total_steps}' if total_steps else ''} | loss {state.train_loss:.4f} | "
                f"lr x{lrm:.3f} | grad norm {metrics['grad_norm']:.3f} | {dt * 1000:.0f} ms | "
                f"{tokens_per_s:,.0f} tok/s | MFU {mfu:.1%} | mem {metrics['peak_mem_mib']:,.0f} MiB | "
                f"ETA {eta / 60:.1f} min", console=log.bar is None)

    summary = dict(stop_reason=stop_reason, steps=state.step, steps_this_run=state.step - start_step,
                   world_size=world_size, device=peak_name, peak_flops=peak, total_batch_size=total_batch,
                   **step_summary(step_times, total_batch, flops_per_token, peak, world_size),
                   peak_mem_mib=peak_memory_mib(device), val_bpb=state.val_bpb,
                   best_val_bpb=finite_or_none(state.best_val_bpb), final_loss=state.train_loss,
                   wall_s=time.time() - run_start, mhc_enabled=config.mhc_enabled, compile=compile_on,
                   compile_scope=args.compile_scope if compile_on else None,
                   rank_weight_max_diff=weights_in_sync(model, device), commit=git_commit(), params=nparams,
                   torch=torch.__version__, grad_accum=grad_accum, device_batch_size=args.device_batch_size,
                   max_seq_len=args.max_seq_len, depth=config.n_layer, preset=args.preset, val_loss=state.val_loss,
                   best_val_loss=finite_or_none(state.best_val_loss), best_step=state.best_step)
    summary.update(final_loss=finite_or_none(state.train_loss), nonfinite_steps=state.nonfinite_steps)
    if stop_signal is not None:
        log(f"stopped by signal {stop_signal} at step {state.step}" + (" after saving a checkpoint" if
            args.save_every >= 0 else " (--save_every -1: nothing saved)") + "; continue with the same command "
            "plus --resume")
    if master:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        bpb = "none" if state.val_bpb is None else f"{state.val_bpb:.4f}"
        if args.eval_iters > 0 and state.val_loss is not None:
            bpb += f" | val loss {state.val_loss:.4f} (best {state.best_val_loss:.4f} at step {state.best_step})"
        log(f"done ({stop_reason}) at step {state.step}: val bpb {bpb} | {summary['tokens_per_s'] or 0:,.0f} tok/s "
            f"| MFU {summary['mfu'] or 0:.1%} | peak mem {summary['peak_mem_mib']:,.0f} MiB | "
            f"wall {summary['wall_s']:.0f} s")
        logger.log({"event": "done", **{k: v for k, v in summary.items() if k != "params"}}, state.step)
        logger.close()
    log.close()
    return summary


if __name__ == "__main__":
    main()
