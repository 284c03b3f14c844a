"""Does the fused mHC model train like the reference? (issue 8)

Trains the same small mHC model three times with scripts/base_train.py: the reference PyTorch
path (seed S), the fused Triton kernels (seed S: the same init and data order, so only the
arithmetic differs) and the reference again with seed S + 1 (how far two runs that should agree
in distribution drift apart: the noise). Compares the training loss in windows of --window
steps and the val bpb at every eval, and prints one table.

    python scripts/loss_curve_check.py --data_dir .carry/exp --out_dir /tmp/lcc        # one GPU
    python scripts/loss_curve_check.py --fused_args="--mhc_stream_dtype bfloat16" ...  # bf16 streams vs fp32
    python scripts/loss_curve_check.py --device cpu --depth 1 --steps 6 --window 2 --data tinyshakespeare \\
        --max_seq_len 32 --device_batch_size 2 --total_batch_size 64                    # CPU smoke test

Verdict: PASS when, after the first window, the largest windowed difference fused vs reference
is no larger than the largest reference vs reference-with-another-seed difference (and the same
for val bpb); FAIL otherwise. On a CPU the fused path falls back to the reference, so the
fused-vs-reference difference is 0 there: the CPU run tests this script, not the kernels.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from nanochat.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--window", type=int, default=25, help="steps per window of mean training loss")
    p.add_argument("--data", default="enwiki")
    p.add_argument("--tokenizer", default=None, help="base_train's default for --data when not given")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--max_shards", type=int, default=2)
    p.add_argument("--max_seq_len", type=int, default=2048)
    p.add_argument("--device_batch_size", type=int, default=16)
    p.add_argument("--total_batch_size", type=int, default=32768)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_tokens", type=int, default=262144)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 3),
                   help="3 runs the three trainings at once (one GPU has room for three small models)")
    p.add_argument("--fused_args", default="",
                   help="extra base_train flags for the fused run only, e.g. '--mhc_stream_dtype bfloat16' to check "
                        "that a cheaper setting still trains like the fp32 reference")
    p.add_argument("--out_dir", default="out/loss_curve_check")
    p.add_argument("--json", default=None, help="write the comparison here (default: OUT_DIR/report.json)")
    return p


def start_training(args, name: str, seed: int, fused: bool) -> tuple[subprocess.Popen, Path]:
    run_dir = Path(args.out_dir) / name
    cmd = [sys.executable, str(ROOT / "scripts" / "base_train.py"), "--mhc_enabled",
           "--depth", str(args.depth), "--num_iterations", str(args.steps), "--seed", str(seed),
           "--data", args.data, "--max_shards", str(args.max_shards), "--max_seq_len", str(args.max_seq_len),
           "--device_batch_size", str(args.device_batch_size), "--total_batch_size", str(args.total_batch_size),
           "--eval_every", str(args.eval_every), "--eval_tokens", str(args.eval_tokens),
           "--device", args.device, "--out_dir", str(run_dir), "--overwrite", "--save_every", "0",
           "--sample_every", "0", "--mhc_fused_kernels" if fused else "--no-mhc_fused_kernels"]
    if fused:
        cmd += shlex.split(args.fused_args)
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    print(f"[loss_curve_check] {name}: {' '.join(cmd[1:])}", flush=True)
    with open(log_of(run_dir), "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()), run_dir


def log_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")  # beside the run folder, which base_train owns


def wait_for(process: subprocess.Popen, run_dir: Path) -> Path:
    rc = process.wait()
    if rc != 0:
        log_path = log_of(run_dir)
        last = "\n".join(log_path.read_text().splitlines()[-5:])
        raise SystemExit(f"error: the {run_dir.name} run failed (exit {rc}); the end of {log_path}:\n{last}")
    return run_dir


def train_all(args) -> list[Path]:
    """reference, fused, reference with seed + 1: one after another, or all at once with --jobs 3."""
    runs = [("reference", args.seed, False), ("fused", args.seed, True), ("reference_other_seed", args.seed + 1, False)]
    if args.jobs == 1:
        return [wait_for(*start_training(args, *run)) for run in runs]
    started = [start_training(args, *run) for run in runs]
    try:
        return [wait_for(*s) for s in started]
    finally:  # one failed: stop the others rather than leave them on the GPU
        for process, _ in started:
            if process.poll() is None:
                process.kill()


def read_curves(run_dir: Path) -> tuple[dict, dict]:
    losses, bpbs = {}, {}
    for rec in read_metrics(run_dir):
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
        if "val_bpb" in rec:
            bpbs[rec["step"]] = rec["val_bpb"]
    return losses, bpbs


def window_means(losses: dict, window: int) -> list[float]:
    steps = sorted(losses)
    return [sum(losses[s] for s in steps[i:i + window]) / len(steps[i:i + window])
            for i in range(0, len(steps), window)]


def compare(ref: Path, fused: Path, other_seed: Path, window: int) -> dict:
    """The three runs' folders (each with its metrics.jsonl) compared window by window."""
    (loss_r, bpb_r), (loss_f, bpb_f), (loss_o, bpb_o) = map(read_curves, (ref, fused, other_seed))
    win_r, win_f, win_o = (window_means(c, window) for c in (loss_r, loss_f, loss_o))
    if len(win_r) < 2:
        raise SystemExit(f"error: {len(loss_r)} steps make fewer than 2 windows of {window}; lower --window")
    later = range(1, min(len(win_r), len(win_f), len(win_o)))  # the first window is the steep start
    evals = sorted(set(bpb_r) & set(bpb_f) & set(bpb_o) - {0})
    rows = [dict(window=i, steps=f"{i * window + 1}-{(i + 1) * window}", ref=win_r[i], fused=win_f[i],
                 other_seed=win_o[i]) for i in range(len(win_r))]
    result = dict(
        window=window, windows=rows,
        loss_fused_vs_ref=max(abs(win_f[i] - win_r[i]) for i in later),
        loss_seed_vs_ref=max(abs(win_o[i] - win_r[i]) for i in later),
        evals=[dict(step=s, ref=bpb_r[s], fused=bpb_f[s], other_seed=bpb_o[s]) for s in evals],
        bpb_fused_vs_ref=max((abs(bpb_f[s] - bpb_r[s]) for s in evals), default=None),
        bpb_seed_vs_ref=max((abs(bpb_o[s] - bpb_r[s]) for s in evals), default=None))
    ok = result["loss_fused_vs_ref"] <= result["loss_seed_vs_ref"]
    if evals:
        ok = ok and result["bpb_fused_vs_ref"] <= result["bpb_seed_vs_ref"]
    result["verdict"] = "PASS" if ok else "FAIL"
    return result


def format_report(result: dict) -> str:
    lines = ["| steps | reference loss | fused loss | reference, seed + 1 |", "|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['ref']:.4f} | {r['fused']:.4f} | {r['other_seed']:.4f} |" for r in result["windows"]]
    if result["evals"]:
        lines += ["", "| step | reference val bpb | fused val bpb | reference, seed + 1 |", "|---|---|---|---|"]
        lines += [f"| {e['step']} | {e['ref']:.4f} | {e['fused']:.4f} | {e['other_seed']:.4f} |" for e in result["evals"]]
    bpb = ("" if result["bpb_fused_vs_ref"] is None else
           f"; val bpb {result['bpb_fused_vs_ref']:.4f} vs {result['bpb_seed_vs_ref']:.4f}")
    lines += ["", f"{result['verdict']}: largest difference after the first window, fused vs reference "
                  f"against reference vs another seed: training loss {result['loss_fused_vs_ref']:.4f} "
                  f"vs {result['loss_seed_vs_ref']:.4f}{bpb}"]
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("depth", "steps", "window"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} {getattr(args, name)} must be >= 1")
    if args.steps < 2 * args.window:
        raise SystemExit(f"error: --steps {args.steps} must be at least 2 x --window {args.window}")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    ref, fused, other = train_all(args)
    result = compare(ref, fused, other, args.window)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    out = Path(args.json or Path(args.out_dir) / "report.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
