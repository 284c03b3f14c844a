"""Tile sizes of the sublayer-boundary kernels (docs/kernels.md), timed on the GPU at training shapes.

For each kernel (boundary forward, bwd_rows, bwd_cols) and each candidate tile configuration:
the median time of its launcher (triton.testing.do_bench) and its largest relative difference from
the current configuration's outputs (a tile changes only the summation order: a candidate that
differs by more than --tolerance is marked wrong, never chosen). The best is the fastest correct tile
that compiles for sm_90 without register spills in every dtype setting the model uses (bf16 and
fp32 streams, with and without autocast; a spilling tile can win at the timed setting and lose at
another, and test_kernels_compile_for_hopper refuses it). Prints one table per kernel,
fastest first, and the best configuration as a KERNEL_CONFIGS line for
nanochat/kernels/mhc_triton.py; --json writes everything; --write_best writes the best tiles as a
file that NANOCHAT_KERNEL_CONFIGS=FILE applies to every later run without editing the code.

    python scripts/tune_mhc_kernels.py                        # d12 shapes: 8 x 2048 tokens, C 768
    python scripts/tune_mhc_kernels.py --width 1280 --tokens 8192
    python scripts/tune_mhc_kernels.py --device cpu --width 32 --tokens 40 --max_configs 2   # CPU smoke
                                                                 # test (Triton interpreter, no timing)
"""

import argparse
import itertools
import json
import os
import time
from pathlib import Path


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--width", type=int, default=768, help="C, the model width")
    p.add_argument("--num_streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8 * 2048, help="N, tokens per micro-batch")
    p.add_argument("--sinkhorn_iters", type=int, default=20)
    p.add_argument("--kernels", default="boundary_bwd_cols,boundary,boundary_bwd_rows")
    p.add_argument("--max_configs", type=int, default=0, help="> 0: only the first N candidates per kernel")
    p.add_argument("--tolerance", type=float, default=2e-3, help="largest relative difference allowed")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", default=None)
    p.add_argument("--write_best", default=None,
                   help="write the fastest correct tiles per kernel here, for NANOCHAT_KERNEL_CONFIGS")
    return p


CANDIDATES = {  # the grid per kernel; the current KERNEL_CONFIGS entry is always measured first
    "boundary_bwd_cols": dict(BLOCK_T=[16, 32], BLOCK_C=[16, 32, 64], BLOCKS_PER_SPLIT=[4, 16, 64],
                              num_warps=[4, 8], num_stages=[2]),
    "boundary": dict(BLOCK_T=[16, 32, 64], BLOCK_C=[32, 64], num_warps=[4, 8], num_stages=[2]),
    "boundary_bwd_rows": dict(BLOCK_T=[16, 32, 64], BLOCK_C=[32, 64, 128], num_warps=[4, 8]),
}


def candidates(name: str, current: dict) -> list[dict]:
    grid = CANDIDATES[name]
    configs = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [dict(current)] + [c for c in configs if c != current]


def make_inputs(args, device):
    import torch
    n, C, N = args.num_streams, args.width, args.tokens
    M = n * n + 2 * n
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
    h_res = torch.softmax(rand(N, n, n), -1)
    return dict(
        x=rand(N, n, C), h_res=h_res, h_post=2 * torch.sigmoid(rand(N, n)), y=rand(N, C, dtype=torch.bfloat16),
        weight=rand(M, n * C, scale=0.02), alpha=torch.full((3,), 0.01, device=device),
        res_base=3 * torch.eye(n, device=device), pre_base=rand(n), post_base=rand(n),
        gate=torch.full((1,), 0.5, device=device),
        hint=(rand(N, n, C), torch.softmax(rand(N, n, n), -1), 2 * torch.sigmoid(rand(N, n)),
              rand(N, C, dtype=torch.bfloat16)),
        d_coeffs=rand(N, M, scale=0.1), du=rand(N, C), dz=rand(N, n, C))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from nanochat.kernels import mhc_boundary_triton as kb
    from nanochat.kernels import mhc_triton
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --device cpu for a smoke test (no timing)")
    names = args.kernels.split(",")
    unknown = [k for k in names if k not in CANDIDATES]
    if unknown:
        raise SystemExit(f"error: unknown kernel(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    if args.tokens <= kb.SMALL_N and "boundary" in names:
        raise SystemExit(f"error: --tokens {args.tokens} <= {kb.SMALL_N} runs the decode tiles "
                         f"(boundary_small), not 'boundary'; use more tokens")
    device = torch.device(args.device)
    inp = make_inputs(args, device)
    from nanochat.kernels.mhc_ops import RMS_EPS

    def forward():
        return kb.boundary_forward(inp["x"], inp["h_res"], inp["h_post"], inp["y"], inp["weight"], inp["alpha"],
                                   inp["res_base"], inp["pre_base"], inp["post_base"], inp["gate"],
                                   args.sinkhorn_iters, 1.0, RMS_EPS, fast=True)
    _, _, _, h_pre_next, _, coeffs, rstd = forward()  # what the backward kernels read
    calls = {
        "boundary": forward,
        "boundary_bwd_rows": lambda: (kb.boundary_h_pre_grad(None, inp["hint"], inp["h_res"], inp["h_post"],
                                                             inp["y"], inp["du"]),),
        "boundary_bwd_cols": lambda: kb.boundary_backward(
            None, inp["hint"], inp["h_res"], inp["h_post"], inp["y"], inp["weight"], coeffs, rstd,
            inp["d_coeffs"], h_pre_next, inp["du"], inp["dz"], fast=True),
    }
    report = dict(args=vars(args), device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), kernels={})
    for name in names:
        current = dict(mhc_triton.KERNEL_CONFIGS[name])
        configs = candidates(name, current)
        if args.max_configs > 0:
            configs = configs[:args.max_configs]
        rows, reference = [], None
        for cfg in configs:
            mhc_triton.KERNEL_CONFIGS[name] = cfg
            try:
                outs = [o.float() for o in calls[name]()]
                if reference is None:
                    reference = outs
                diff = max(((o - r).norm() / r.norm().clamp_min(1e-30)).item() for o, r in zip(outs, reference))
                ms = None
                if args.device == "cuda":
                    import triton.testing
                    ms = triton.testing.do_bench(calls[name], warmup=10, rep=50)
                rows.append(dict(config=cfg, ms=ms, rel_diff=diff, ok=diff <= args.tolerance))
            except Exception as e:  # a tile that does not compile (registers, shared memory) is skipped
                rows.append(dict(config=cfg, ms=None, rel_diff=None, ok=False, error=f"{type(e).__name__}: {e}"[:200]))
            finally:
                mhc_triton.KERNEL_CONFIGS[name] = current
        report["kernels"][name] = rows
        if args.device == "cuda":
            mark_best(rows, lambda cfg: spills(name, cfg, args))
        print_table(name, rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.write_best:
        best = {name: chosen["config"] for name, rows in report["kernels"].items() if (chosen := best_row(rows))}
        Path(args.write_best).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_best).write_text(json.dumps(best, indent=2) + "\n")
    return report


def spills(name: str, cfg: dict, args) -> dict:
    """{kernel/dtype setting: stack bytes} where tile cfg spills registers on sm_90 (Triton's bundled
    ptxas, as test_kernels_compile_for_hopper checks); empty if it spills nowhere."""
    from nanochat.kernels import mhc_triton
    current = mhc_triton.KERNEL_CONFIGS[name]
    mhc_triton.KERNEL_CONFIGS[name] = cfg
    try:
        report = mhc_triton.compile_report(arch=90, n=args.num_streams, C=args.width, num_iters=args.sinkhorn_iters,
                                           only=(name,))
    finally:
        mhc_triton.KERNEL_CONFIGS[name] = current
    return {k: v["stack_bytes"] for k, v in report.items() if v["stack_bytes"] > 0}


def mark_best(rows: list[dict], spill_check) -> None:
    """Walk the correct timed tiles fastest first; the first that spills nowhere gets "best": True.
    Only the tiles walked past are compiled (each check is a few ptxas runs)."""
    for row in sorted((r for r in rows if r["ok"] and r["ms"] is not None), key=lambda r: r["ms"]):
        row["spills"] = spill_check(row["config"])
        if not row["spills"]:
            row["best"] = True
            return


def best_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r.get("best")), None)


def print_table(name: str, rows: list[dict]):
    timed = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
    others = [r for r in rows if r["ms"] is None]
    print(f"\n{name}: {len(rows)} configurations (the first row of the input order is the current one)")
    print("| config | ms | rel. diff vs current | status |\n|---|---|---|---|")
    for r in timed + others:
        ms = "-" if r["ms"] is None else f"{r['ms']:.4f}"
        diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        status = r.get("error") or ("ok" if r["ok"] else "DIFFERS")
        if r.get("spills"):
            status += ", spills registers: " + ", ".join(f"{k} {v} B" for k, v in r["spills"].items())
        print(f"| {r['config']} | {ms} | {diff} | {status} |")
    best = best_row(rows)
    if best:
        print(f'best: "{name}": dict({", ".join(f"{k}={v}" for k, v in best["config"].items())}),  '
              f"# {best['ms']:.4f} ms")


if __name__ == "__main__":
    main()
