"""Training-step benchmark (issue 8): the plain GPT, Dynamic mHC (reference PyTorch and fused
kernels) and two peers, at one depth and micro-batch, one table printed last.

    python scripts/bench_train.py --depth 12 --json out/bench_train_d12.json      # one GPU
    python scripts/bench_train.py --depth 20 --variants baseline,mhc_fused --jobs 1
    python scripts/bench_train.py --device cpu --depth 1 --seq_len 32 --batch_size 2 \\
        --steps 2 --warmup 1 --no-compile                                        # smoke test
    python scripts/bench_train.py --count_saved --depth 12     # activations kept for backward (CPU)

Variants (--variants, comma-separated):
  baseline            GPT without mHC (nanochat/gpt.py)
  mhc_ref             + Dynamic mHC, n = 4, reference PyTorch (DynamicMHC.forward)
  mhc_ref_einsum      the same with the stream arithmetic as einsums (the reference before issue 8)
  mhc_fused           + Dynamic mHC on the fused kernels (mhc_fused_kernels: sublayer boundaries fused)
  mhc_fused_sublayer  the fused kernels one sublayer at a time (the issue-7 path, for comparison)
  mhc_fused_bf16      mhc_fused with the streams in bf16 (mhc_stream_dtype): half the stream bytes
  hf_gpt2             Hugging Face GPT2LMHeadModel of the same size (skipped without transformers)
  hc_mhc              lucidrains' hyper-connections mHCv2 (4 streams, its Triton Sinkhorn on CUDA)
                      around this GPT's blocks (skipped without hyper_connections)

One step = forward and backward of one micro-batch of --batch_size x --seq_len synthetic tokens
(GPT-2 vocabulary), bf16 autocast on CUDA, the model compiled whole, gradients set to None
first; no optimizer (the same for every variant, and amortised over gradient accumulation).
Each variant runs in its own process under a time limit, so a failure or a slow compile costs only
its row; with --jobs 2 two variants compile at once while a lock keeps their timed steps apart.
Per variant: median ms per step over --steps timed steps after --warmup (CUDA events), tokens/s,
MFU on the baseline model's FLOPs (so mHC's cost shows as lower MFU), peak memory of a step,
compile time (first step - median step) and the step time relative to the baseline.

--count_saved runs no step: it counts the bytes autograd keeps for backward in one step at the
full size (bf16 autocast, eager autograd, fake activations: no compute, any machine, seconds), for
the variants of this repository; the memory side of the fused kernels' recompute, without a GPU.
"""

import argparse
import datetime
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import autodetect_device, git_commit, peak_flops
from nanochat.gpt import GPT, GPTConfig, build_model, padded_vocab_size
from nanochat.mhc import bound_inductor_operator_str

VARIANTS = ("baseline", "mhc_ref", "mhc_ref_einsum", "mhc_fused", "mhc_fused_sublayer", "mhc_fused_bf16",
            "hf_gpt2", "hc_mhc")
# this project's GPT with mHC, built from GPTConfig alone (mhc_ref_einsum also patches the stream arithmetic)
GPT_MHC_VARIANTS = ("mhc_ref", "mhc_fused", "mhc_fused_sublayer", "mhc_fused_bf16")
DEFAULT_VARIANTS = "baseline,mhc_ref,mhc_fused,hf_gpt2,hc_mhc"
SKIPPED_EXIT = 3  # a worker exits with this when its library is missing
MIN_START_S = 30  # a variant is not started with less time than this left before --deadline_s


class Skip(Exception):
    """The variant cannot run here (a library is missing); its row says why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=12, help="layers; width 64 * depth (GPTConfig.from_depth)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off on CPU)")
    p.add_argument("--jobs", type=int, default=1, help="variants compiling at once (timed steps never overlap)")
    p.add_argument("--timeout_s", type=float, default=420.0, help="limit per variant (compile included)")
    p.add_argument("--deadline_s", type=float, default=0.0,
                   help="> 0: the whole call's budget; variants that cannot start in time are skipped")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", type=int, default=0,
                   help="> 0: also profile this many steps per variant and print the top kernels")
    p.add_argument("--count_saved", action="store_true",
                   help="no timing: count activations kept for backward with fake tensors (CPU)")
    # internal: one variant in a worker process
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result_file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gpu_lock", default=None, help=argparse.SUPPRESS)
    return p


def model_config(args, **overrides) -> GPTConfig:
    return GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, **overrides)


def baseline_flops_per_token(args) -> float:
    with torch.device("meta"):
        return GPT(model_config(args)).estimate_flops_per_token(include_mhc=False)


# ----------------------------------------------------------------------------- variants
class LossOf(nn.Module):
    """model(idx, targets) -> mean cross-entropy, for models whose forward returns logits."""

    def __init__(self, model: nn.Module, logits_fn):
        super().__init__()
        self.model, self.logits_fn = model, logits_fn

    def forward(self, idx, targets):
        logits = self.logits_fn(self.model, idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def build_hf_gpt2(args, device) -> nn.Module:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise Skip(f"transformers is not importable ({e})")
    cfg = model_config(args)
    hf_cfg = GPT2Config(vocab_size=padded_vocab_size(cfg.vocab_size), n_positions=cfg.sequence_len,
                        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_inner=int(cfg.mlp_ratio * cfg.n_embd), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, use_cache=False)
    try:  # SDPA attention, as the GPT here (older versions pick it themselves)
        model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    except (TypeError, ValueError, AttributeError):
        model = GPT2LMHeadModel(hf_cfg)
    return LossOf(model.to(device), lambda m, idx: m(input_ids=idx).logits)


class HyperConnectionsGPT(nn.Module):
    """This repository's baseline GPT blocks with every sublayer wrapped in lucidrains' mHCv2
    (hyper_connections.mHCv2: expand with stream embeddings, sum reduce), our embedding and head."""

    def __init__(self, gpt: GPT, num_streams: int, use_triton_sinkhorn: bool):
        super().__init__()
        from hyper_connections.mHCv2 import get_init_and_expand_reduce_stream_functions
        init_hc, self.expand, self.reduce = get_init_and_expand_reduce_stream_functions(
            num_streams, dim=gpt.config.n_embd, add_stream_embed=True,
            use_triton_sinkhorn=use_triton_sinkhorn)
        self.gpt = gpt
        self.hcs = nn.ModuleList([init_hc(layer_index=i) for i in range(2 * gpt.config.n_layer)])

    def forward(self, idx, targets):
        gpt = self.gpt
        B, T = idx.shape
        cos, sin = gpt._rotary(B, T, None)
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
            cos, sin = cos.to(dtype), sin.to(dtype)
        x = self.expand(gpt._embed(idx, None))
        for i, block in enumerate(gpt.transformer.h):
            for hc, branch in zip(self.hcs[2 * i: 2 * i + 2], block.branch_fns((cos, sin))):
                branch_input, add_residual = hc(x)
                x = add_residual(branch(branch_input))
        logits = gpt.logits_from_hidden(gpt.norm_final(self.reduce(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def use_einsum_stream_arithmetic():
    """DynamicMHC's stream arithmetic as the einsums it used before issue 8 (bmm of B*T tiny
    matrices; autocast rounds them to bf16), for an A/B against the broadcast form in one run."""
    import nanochat.mhc as mhc

    def collapse_streams(h_pre, x):
        return torch.einsum("btn,btnc->btc", h_pre.to(x.dtype), x)

    def residual_streams(x, h_res, h_post, y):
        mixed = torch.einsum("btij,btjc->btic", h_res.to(x.dtype), x)
        return mixed + h_post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2)
    mhc.collapse_streams, mhc.residual_streams = collapse_streams, residual_streams


def build_variant(name: str, args, device) -> nn.Module:
    if name == "baseline":
        return build_model(model_config(args), device, seed=0)
    if name == "mhc_ref_einsum":
        use_einsum_stream_arithmetic()
        return build_model(model_config(args, mhc_enabled=True), device, seed=0)
    if name in GPT_MHC_VARIANTS:
        if name == "mhc_fused_sublayer":
            from nanochat.kernels import mhc_stack
            mhc_stack.FUSE_ACROSS_SUBLAYERS = False
        cfg = model_config(args, mhc_enabled=True, mhc_fused_kernels=name != "mhc_ref",
                           mhc_stream_dtype="bfloat16" if name == "mhc_fused_bf16" else "float32")
        model = build_model(cfg, device, seed=0)
        if cfg.mhc_fused_kernels:
            from nanochat.kernels import mhc_fused_available
            if not mhc_fused_available(device):
                raise RuntimeError(f"the fused kernels cannot run on {device} here (triton missing, or "
                                   f"CPU without TRITON_INTERPRET=1): the row would time the reference")
        return model
    if name == "hf_gpt2":
        return build_hf_gpt2(args, device)
    if name == "hc_mhc":
        try:
            import hyper_connections.mHCv2  # noqa: F401
        except ImportError as e:
            raise Skip(f"hyper_connections is not importable ({e}); carry its wheel and "
                       f"torch-einops-utils' and pip install them")
        gpt = build_model(model_config(args), device, seed=0)
        return HyperConnectionsGPT(gpt, 4, use_triton_sinkhorn=device.type == "cuda").to(device)
    raise ValueError(f"unknown variant {name!r}")


# ----------------------------------------------------------------------------- one variant
class GpuLock:
    """An exclusive file lock around the timed steps, so that parallel workers never overlap them."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        if self.path:
            self.f = open(self.path, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        if self.path:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


def run_worker(args) -> dict:
    device = torch.device(autodetect_device(args.device))
    cuda = device.type == "cuda"
    compile_on = args.compile if args.compile is not None else cuda
    torch.manual_seed(0)
    model = build_variant(args.worker, args, device)
    model.train()
    vocab = model_config(args).vocab_size
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
    idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if compile_on:
        bound_inductor_operator_str()  # else compiling the fused mHC stack can hang (torch 2.11)
    fwd = torch.compile(model) if compile_on else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = fwd(idx, targets)
        loss.backward()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    loss = step()
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
        step()
    sync()
    with GpuLock(args.gpu_lock):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(args.steps)]
            for start, end in events:
                start.record()
                step()
                end.record()
            sync()
            times_ms = [start.elapsed_time(end) for start, end in events]
            peak = torch.cuda.max_memory_allocated()
        else:
            times_ms = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times_ms.append(1e3 * (time.perf_counter() - t))
            peak = None
        profile = profile_steps(step, sync, args.profile, cuda) if args.profile > 0 else None
    median_ms = statistics.median(times_ms)
    return dict(variant=args.worker, status="ok", ms_per_step=median_ms, profile=profile,
                ms_p20=sorted(times_ms)[len(times_ms) // 5], ms_p80=sorted(times_ms)[(4 * len(times_ms)) // 5],
                first_step_s=first_s, compile_s=max(0.0, first_s - median_ms / 1e3) if compile_on else None,
                peak_gib=None if peak is None else peak / 2**30, loss=float(loss.detach()),
                params=sum(p.numel() for p in model.parameters()), compile=compile_on)


def profile_steps(step, sync, steps: int, cuda: bool, top: int = 12) -> list[dict]:
    """The kernels (CUDA) or ops (CPU) that take the most time over `steps` steps: name, ms per
    step, share of the total, calls per step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if own(e) > 0]
    total = sum(own(e) for e in events) or 1.0
    events.sort(key=own, reverse=True)
    return [dict(name=e.key[:90], ms_per_step=own(e) / 1e3 / steps, share=own(e) / total, calls_per_step=e.count / steps)
            for e in events[:top]]


def format_profiles(rows) -> str:
    lines = []
    for r in rows:
        if r.get("profile"):
            lines += ["", f"{r['variant']}: where a step's time goes (torch.profiler, self time)",
                      "| kernel | ms/step | share | calls/step |", "|---|---|---|---|"]
            lines += [f"| {k['name']} | {k['ms_per_step']:.2f} | {100 * k['share']:.1f}% | {k['calls_per_step']:g} |"
                      for k in r["profile"]]
    return "\n".join(lines)


def worker_main(args):
    try:
        result = run_worker(args)
        code = 0
    except Skip as e:
        result, code = dict(variant=args.worker, status=f"skipped: {e}"), SKIPPED_EXIT
    Path(args.result_file).write_text(json.dumps(result))
    sys.exit(code)


# ----------------------------------------------------------------------------- the table
def worker_command(args, name, result_file, lock) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--result_file", result_file,
           "--depth", str(args.depth), "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--profile", str(args.profile)]
    if args.compile is not None:
        cmd.append("--compile" if args.compile else "--no-compile")
    if lock:
        cmd += ["--gpu_lock", lock]
    return cmd


def worker_env(args, name, device_type) -> dict:
    env = dict(os.environ)
    if device_type == "cpu" and name.startswith("mhc_fused"):
        env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on CPU tensors
    else:
        env.pop("TRITON_INTERPRET", None)
    # parallel workers share the cores between their inductor compile pools
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, args.jobs))))
    return env


def run_all(args, variants, device_type) -> list[dict]:
    """Run the variants as worker processes, at most --jobs at a time; rows in the order given."""
    start = time.monotonic()
    results, running, pending = {}, {}, list(variants)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    lock = os.path.join(tmp, "gpu.lock") if args.jobs > 1 else None
    while pending or running:
        left = args.deadline_s - (time.monotonic() - start) if args.deadline_s > 0 else float("inf")
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            if left < MIN_START_S:
                results[name] = dict(variant=name, status=f"skipped: --deadline_s {args.deadline_s:.0f} reached")
                continue
            result_file = os.path.join(tmp, f"{name}.json")
            log = open(os.path.join(tmp, f"{name}.log"), "w+")
            proc = subprocess.Popen(worker_command(args, name, result_file, lock), stdout=log,
                                    stderr=subprocess.STDOUT, env=worker_env(args, name, device_type),
                                    start_new_session=True)  # its own group: a timeout kills its compile workers too
            running[name] = (proc, time.monotonic(), min(args.timeout_s, left), result_file, log)
            print(f"[bench_train] started {name}", flush=True)
        for name, (proc, t0, limit, result_file, log) in list(running.items()):
            elapsed = time.monotonic() - t0
            if proc.poll() is None and elapsed < limit:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                results[name] = dict(variant=name, status=f"timeout after {limit:.0f} s")
            elif os.path.exists(result_file):
                results[name] = json.loads(Path(result_file).read_text())
            else:
                log.seek(0)
                lines = [ln for ln in log.read().splitlines() if ln.strip()]
                results[name] = dict(variant=name, status=f"failed (exit {proc.returncode}): "
                                     f"{lines[-1][:200] if lines else 'no output'}", log_tail=lines[-30:])
            results[name]["wall_s"] = round(elapsed, 1)
            log.close()
            del running[name]
            print(f"[bench_train] {name}: {results[name]['status']} ({elapsed:.0f} s)", flush=True)
        time.sleep(0.2)
    return [results[name] for name in variants]


def add_derived(rows, tokens_per_step, flops_per_token, peak):
    base = next((r for r in rows if r["variant"] == "baseline" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["tokens_per_s"] = tokens_per_step / (r["ms_per_step"] / 1e3)
        r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
        r["vs_baseline"] = r["ms_per_step"] / base["ms_per_step"] if base else None
        r["memory_vs_baseline"] = (r["peak_gib"] / base["peak_gib"]
                                   if base and r["peak_gib"] and base["peak_gib"] else None)


def format_table(rows) -> str:
    def fmt(r, key, spec, scale=1.0, unit=""):
        v = r.get(key)
        return "-" if v is None else format(v * scale, spec) + unit
    header = ["variant", "ms/step", "tokens/s", "MFU", "vs baseline", "peak GiB", "memory vs baseline",
              "compile s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["variant"], fmt(r, "ms_per_step", ".1f"), fmt(r, "tokens_per_s", ",.0f"),
                 fmt(r, "mfu", ".1f", 100, "%"), fmt(r, "vs_baseline", ".3f", unit="x"),
                 fmt(r, "peak_gib", ".1f"), fmt(r, "memory_vs_baseline", ".2f", unit="x"),
                 fmt(r, "compile_s", ".0f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def count_saved_gib(args, name) -> float:
    """GiB of activations autograd keeps for backward in one step of this variant (parameters
    real, activations fake; each storage counted once; parameters and buffers not counted)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    from nanochat.kernels import mhc_ops, mhc_stack
    previous = mhc_stack.FUSE_ACROSS_SUBLAYERS, dict(mhc_ops._AVAILABLE)
    mhc_ops._AVAILABLE["cpu"] = True  # the fused path is chosen on CPU; fake tensors run no kernel
    try:
        if name == "mhc_fused_sublayer":
            mhc_stack.FUSE_ACROSS_SUBLAYERS = False
        model = build_variant(name.replace("_sublayer", ""), args, torch.device("cpu"))
        owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            storage = t.untyped_storage()
            key = StorageWeakRef(storage).cdata
            if key not in seen and (t.device.type == "meta" or hasattr(t, "fake_mode")
                                    or storage.data_ptr() not in owned):
                seen.add(key)
                total += storage.nbytes()
            return t
        with FakeTensorMode(allow_non_fake_inputs=True):
            idx = torch.randint(0, model_config(args).vocab_size, (args.batch_size, args.seq_len))
            with torch.autocast("cpu", dtype=torch.bfloat16), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(idx, idx)
        return total / 2**30
    finally:
        mhc_stack.FUSE_ACROSS_SUBLAYERS = previous[0]
        mhc_ops._AVAILABLE.clear()
        mhc_ops._AVAILABLE.update(previous[1])


def count_saved_main(args, variants):
    ours = [v for v in variants if v in ("baseline", *GPT_MHC_VARIANTS)]
    rows = [dict(variant=v, saved_gib=count_saved_gib(args, v)) for v in ours]
    base = next((r["saved_gib"] for r in rows if r["variant"] == "baseline"), None)
    print(f"\nactivations kept for backward, d{args.depth}, {args.batch_size} x {args.seq_len} tokens, "
          f"bf16 autocast, eager autograd (fake tensors)")
    print("| variant | GiB | vs baseline |\n|---|---|---|")
    for r in rows:
        r["vs_baseline"] = r["saved_gib"] / base if base else None
        ratio = f"{r['vs_baseline']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['saved_gib']:.2f} | {ratio} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(depth=args.depth, batch_size=args.batch_size,
                                                   seq_len=args.seq_len, rows=rows), indent=2))
    return rows


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants {args.variants!r}: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    for name in ("steps", "batch_size", "seq_len", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 1")
    model_config(args)  # a bad --depth / --seq_len fails here, before any worker starts
    if args.count_saved:
        return count_saved_main(args, variants)
    device_type = autodetect_device(args.device)
    flops = baseline_flops_per_token(args)
    peak, device_name = peak_flops(device_type)
    tokens_per_step = args.batch_size * args.seq_len
    t0 = time.time()
    rows = run_all(args, variants, device_type)
    add_derived(rows, tokens_per_step, flops, peak)
    meta = dict(command="python scripts/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv),
                device=device_name, torch=torch.__version__, commit=git_commit(),
                date=datetime.date.today().isoformat(), depth=args.depth, batch_size=args.batch_size,
                seq_len=args.seq_len, tokens_per_step=tokens_per_step, steps=args.steps, warmup=args.warmup,
                baseline_flops_per_token=flops, peak_flops=peak, jobs=args.jobs,
                wall_s=round(time.time() - t0, 1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    profiles = format_profiles(rows)
    if profiles:
        print(profiles)  # before the table, which stays the last thing printed
    print(f"\n{device_name}, torch {torch.__version__}, commit {meta['commit']}, {meta['date']}: d{args.depth}, "
          f"{args.batch_size} x {args.seq_len} tokens per step, median of {args.steps} steps after "
          f"{args.warmup}; MFU on {flops / 1e6:.1f} MFLOP/token (the baseline's)")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
