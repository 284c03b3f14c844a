"""Triton kernels for Dynamic mHC (nanochat/mhc.py): forward and backward, and their launchers.

Conventions are nanochat/mhc.py's, with the tokens flattened: N = B*T tokens, n streams of width C,
x [N, n, C] contiguous, M = n*n + 2n packed coefficients per token ([res (n*n) | pre (n) | post (n)]).

    coefficient logits   coeffs [N, M] = proj(rms_norm(x_flat)) computed as (x_flat @ W^T) * rstd
    coefficient mix      H_res = (1-g) I + g Sinkhorn((res_base + a0 coeffs_res) / tau),
                         H_pre = sigmoid(pre_base + a1 coeffs_pre), H_post = 2 sigmoid(post_base + ..)
    collapse             u[t] = sum_i H_pre[t, i] x[t, i]
    residual update      out[t, i] = sum_j H_res[t, i, j] x[t, j] + H_post[t, i] y[t]

All arithmetic is fp32 in registers; streams are read and written in their own dtype (fp32, bf16
or fp16). Importing this module imports triton: nanochat/kernels/mhc_ops.py imports it lazily.
Set TRITON_INTERPRET=1 before the first import to run the kernels on CPU tensors (tests).
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

# Padded Sinkhorn entries are pinned here: exp() of it is exactly 0, and unlike -inf it never
# produces inf - inf = nan in a fully padded row.
_NEG = tl.constexpr(-1.0e30)

# Tile sizes per kernel (powers of two; tl.dot needs every dimension >= 16). Tests shrink them so
# that tiny shapes still run several tiles with ragged tails.
KERNEL_CONFIGS = {
    "coeff_logits": dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "coeff_logits_bwd": dict(BLOCK_T=32, BLOCK_C=128, BLOCKS_PER_SPLIT=32, num_warps=8, num_stages=2),
    "coeff_mix": dict(BLOCK_T=64, num_warps=4),
    "collapse": dict(BLOCK_T=32, BLOCK_C=128, num_warps=4),
    "collapse_bwd": dict(BLOCK_T=16, BLOCK_C=64, num_warps=4),
    "residual": dict(BLOCK_T=16, BLOCK_C=128, num_warps=8),
    "residual_bwd": dict(BLOCK_T=16, BLOCK_C=64, num_warps=4),
    # sublayer-boundary kernels (mhc_boundary_triton.py): the fastest correct tiles of
    # scripts/tune_mhc_kernels.py at d12 shapes (C 768, 16,384 tokens) on an H100, 2026-12-06
    # (docs/benchmarks.md); bwd_cols went from 1.60 to 0.43 ms a call with 4 warps instead of 8.
    # The forward takes the runner-up (0.335 ms; the best, BLOCK_T 64 at 0.310 ms, spills registers
    # when the branch output is fp32 too, i.e. without autocast: test_kernels_compile_for_hopper)
    "boundary": dict(BLOCK_T=16, BLOCK_C=32, num_warps=4, num_stages=2),
    # decode (<= SMALL_N tokens): the forward split over channel blocks, one block per program
    # (not tuned; 12 programs a token block at C 768)
    "boundary_small": dict(BLOCK_T=16, BLOCK_C=64, num_warps=4, num_stages=1),
    "boundary_bwd_rows": dict(BLOCK_T=16, BLOCK_C=128, num_warps=8),
    "boundary_bwd_cols": dict(BLOCK_T=16, BLOCK_C=32, BLOCKS_PER_SPLIT=16, num_warps=4, num_stages=2),
}


def load_kernel_configs(path: str) -> dict:
    """Tile sizes from a JSON file ({kernel: {BLOCK_T: .., num_warps: .., ...}}, as written by
    scripts/tune_mhc_kernels.py --write_best) over the defaults above; checked before any kernel runs."""
    import json
    from pathlib import Path
    try:
        tuned = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"NANOCHAT_KERNEL_CONFIGS={path}: cannot read it as JSON ({e}); unset it to use "
                         f"the default tiles") from None
    for name, cfg in tuned.items():
        if name not in KERNEL_CONFIGS or not isinstance(cfg, dict) or set(cfg) != set(KERNEL_CONFIGS[name]):
            raise ValueError(f"NANOCHAT_KERNEL_CONFIGS={path}: entry {name!r} must be one of "
                             f"{sorted(KERNEL_CONFIGS)} with exactly the keys {sorted(KERNEL_CONFIGS.get(name, {}))}")
    return tuned


if os.environ.get("NANOCHAT_KERNEL_CONFIGS"):  # tiles tuned on this GPU (docs/kernels.md)
    KERNEL_CONFIGS.update(load_kernel_configs(os.environ["NANOCHAT_KERNEL_CONFIGS"]))

_POISON = False  # when True, outputs start as NaN so an element no kernel wrote cannot pass a test


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block every kernel output is allocated full of NaN instead of uninitialised."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def _new(shape, dtype, device):
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _padded_streams(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype, fast: bool = False) -> str:
    # fp32 streams get a true fp32 product (the reference's default); tf32 would add ~3e-4 error.
    # fast=True (callers pass it under bf16 autocast, where the reference's projection is a bf16
    # GEMM): tf32 tensor cores, still 8x finer than bf16, instead of fp32 FMA at ~1/8 the rate.
    return "ieee" if dtype == torch.float32 and not fast else "tf32"


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton 3.6's CPU interpreter multiplies bf16 as raw integers: go through fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# ----------------------------------------------------------------------------- coefficient logits
@triton.jit
def _coeff_logits_fwd_kernel(x_ptr, w_ptr, coeffs_ptr, rstd_ptr, N, eps, n: tl.constexpr,
                             C: tl.constexpr, M: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One pass over BLOCK_T tokens' n*C stream values: sum of squares and x @ W^T together."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    row = offs_t.to(tl.int64) * (n * C)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, n * C, BLOCK_K):  # the flattened n*C row: streams need no special care here
        cols = k0 + offs_k
        mask_k = cols < n * C
        x = tl.load(x_ptr + row[:, None] + cols[None, :], mask=mask_t[:, None] & mask_k[None, :],
                    other=0.0)
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        w = tl.load(w_ptr + offs_m[:, None] * (n * C) + cols[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(x, tl.trans(w.to(x.dtype)), acc, DOT_PRECISION, DOT_UPCAST)
    rstd = 1.0 / tl.sqrt(sumsq / (n * C) + eps)
    out = offs_t.to(tl.int64)[:, None] * M + offs_m[None, :]
    tl.store(coeffs_ptr + out, acc * rstd[:, None], mask=mask_t[:, None] & mask_m[None, :])
    tl.store(rstd_ptr + offs_t, rstd, mask=mask_t)


@triton.jit
def _coeff_logits_bwd_kernel(x_ptr, w_ptr, coeffs_ptr, rstd_ptr, d_coeffs_ptr, h_pre_ptr, du_ptr,
                             dx_ptr, dw_partial_ptr, N, n: tl.constexpr, C: tl.constexpr,
                             M: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
                             HAS_COLLAPSE: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """dx = rstd * (dcoeffs @ W) - rstd^2 (dcoeffs . coeffs) / (nC) * x  [+ H_pre[i] * du],
    and this token split's share of dW = sum_t (rstd dcoeffs)_t x_t^T, for one (stream, C block).

    c = rstd * (W x) with rstd = (|x|^2/K + eps)^-1/2 gives dx = rstd W^T dc - rstd^3 (dc . Wx) x / K
    and rstd^3 (dc . Wx) = rstd^2 (dc . c)."""
    num_cblocks = tl.cdiv(C, BLOCK_C)
    i = tl.program_id(0) // num_cblocks
    c_in = (tl.program_id(0) % num_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c_in < C
    cols = i * C + c_in
    K = n * C
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    w = tl.load(w_ptr + offs_m[:, None] * K + cols[None, :],
                mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(x_ptr.dtype.element_ty)
    dw = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    t_start = tl.program_id(1) * (BLOCKS_PER_SPLIT * BLOCK_T)
    for k in range(BLOCKS_PER_SPLIT):
        offs_t = t_start + k * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        t64 = offs_t.to(tl.int64)
        mask_tm = mask_t[:, None] & mask_m[None, :]
        dc = tl.load(d_coeffs_ptr + t64[:, None] * M + offs_m[None, :], mask=mask_tm, other=0.0)
        c = tl.load(coeffs_ptr + t64[:, None] * M + offs_m[None, :], mask=mask_tm, other=0.0)
        rstd = tl.load(rstd_ptr + offs_t, mask=mask_t, other=0.0)
        dc_scaled = (dc * rstd[:, None]).to(x_ptr.dtype.element_ty)
        x_coef = rstd * rstd * tl.sum(dc * c, axis=1) / K
        mask_tc = mask_t[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + t64[:, None] * K + cols[None, :], mask=mask_tc, other=0.0)
        dx = _dot(dc_scaled, w, None, DOT_PRECISION, DOT_UPCAST) - x_coef[:, None] * x.to(tl.float32)
        if HAS_COLLAPSE:
            h = tl.load(h_pre_ptr + t64 * n + i, mask=mask_t, other=0.0)
            du = tl.load(du_ptr + t64[:, None] * C + c_in[None, :], mask=mask_tc, other=0.0)
            dx += h[:, None] * du.to(tl.float32)
        tl.store(dx_ptr + t64[:, None] * K + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_tc)
        dw = _dot(tl.trans(dc_scaled), x, dw, DOT_PRECISION, DOT_UPCAST)
    part = tl.program_id(1).to(tl.int64) * M * K
    tl.store(dw_partial_ptr + part + offs_m[:, None] * K + cols[None, :], dw,
             mask=mask_m[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------- coefficient mix
@triton.jit
def _normalize_rows(z, valid):
    """One Sinkhorn row step z <- z - logsumexp(z, rows); also returns the subtracted [T, n]."""
    m = tl.max(z, axis=2)
    lse = m + tl.log(tl.sum(tl.exp(z - m[:, :, None]), axis=2))
    return tl.where(valid, z - lse[:, :, None], _NEG), lse


@triton.jit
def _normalize_cols(z, valid):
    m = tl.max(z, axis=1)
    lse = m + tl.log(tl.sum(tl.exp(z - m[:, None, :]), axis=1))
    return tl.where(valid, z - lse[:, None, :], _NEG), lse


@triton.jit
def _res_logits(coeffs_ptr, alpha_ptr, res_base_ptr, t64, mask_t, tau, n: tl.constexpr,
                M: tl.constexpr, NP: tl.constexpr):
    """The max-subtracted Sinkhorn input (res_base + a0 coeffs_res) / tau as [T, NP, NP], padded
    entries at _NEG, plus the raw coeffs_res (for dalpha) and the validity mask."""
    r = tl.arange(0, NP)
    ii = r[None, :, None]
    jj = r[None, None, :]
    valid = (ii < n) & (jj < n)
    c_res = tl.load(coeffs_ptr + t64[:, None, None] * M + ii * n + jj,
                    mask=mask_t[:, None, None] & valid, other=0.0)
    # the small parameters may be bf16 (a bf16 model): widened to fp32 as they are loaded
    base = tl.load(res_base_ptr + ii * n + jj, mask=valid, other=0.0).to(tl.float32)
    z = tl.where(valid, (base + tl.load(alpha_ptr).to(tl.float32) * c_res) / tau, _NEG)
    z_max = tl.max(tl.max(z, axis=2), axis=1)
    z = tl.where(valid, z - z_max[:, None, None], _NEG)
    return z, c_res, valid


@triton.jit
def _mix_tokens(coeffs_ptr, alpha_ptr, res_base_ptr, pre_base_ptr, post_base_ptr, gate_ptr,
                h_res_ptr, h_pre_ptr, h_post_ptr, offs_t, tokens_per_gate, tau, N,
                n: tl.constexpr, M: tl.constexpr, num_iters: tl.constexpr, NP: tl.constexpr):
    """H_res, H_pre, H_post of the tokens offs_t from their coefficient logits (stored), and H_pre
    as a [tokens, NP] fp32 value (0 in padded streams) for a caller that collapses next."""
    mask_t = offs_t < N
    t64 = offs_t.to(tl.int64)
    z, c_res, valid = _res_logits(coeffs_ptr, alpha_ptr, res_base_ptr, t64, mask_t, tau, n, M, NP)
    for _ in range(num_iters):
        z, _lse = _normalize_rows(z, valid)
        z, _lse = _normalize_cols(z, valid)
    r = tl.arange(0, NP)
    ii = r[None, :, None]
    jj = r[None, None, :]
    g = tl.load(gate_ptr + offs_t // tokens_per_gate, mask=mask_t, other=0.0)[:, None, None]
    h_res = (1.0 - g) * (ii == jj).to(tl.float32) + g * tl.exp(z)
    tl.store(h_res_ptr + t64[:, None, None] * (n * n) + ii * n + jj, h_res,
             mask=mask_t[:, None, None] & valid)

    i2 = r[None, :]
    mask2 = mask_t[:, None] & (i2 < n)
    c_pre = tl.load(coeffs_ptr + t64[:, None] * M + n * n + i2, mask=mask2, other=0.0)
    c_post = tl.load(coeffs_ptr + t64[:, None] * M + n * n + n + i2, mask=mask2, other=0.0)
    pre = (tl.load(pre_base_ptr + i2, mask=i2 < n, other=0.0).to(tl.float32)
           + tl.load(alpha_ptr + 1).to(tl.float32) * c_pre)
    post = (tl.load(post_base_ptr + i2, mask=i2 < n, other=0.0).to(tl.float32)
            + tl.load(alpha_ptr + 2).to(tl.float32) * c_post)
    h_pre = tl.where(mask2, tl.sigmoid(pre), 0.0)
    tl.store(h_pre_ptr + t64[:, None] * n + i2, h_pre, mask=mask2)
    tl.store(h_post_ptr + t64[:, None] * n + i2, 2.0 * tl.sigmoid(post), mask=mask2)
    return h_pre


@triton.jit
def _coeff_mix_fwd_kernel(coeffs_ptr, alpha_ptr, res_base_ptr, pre_base_ptr, post_base_ptr,
                          gate_ptr, h_res_ptr, h_pre_ptr, h_post_ptr, N, tokens_per_gate, tau,
                          n: tl.constexpr, M: tl.constexpr, num_iters: tl.constexpr,
                          BLOCK_T: tl.constexpr, NP: tl.constexpr):
    """Per token: Sinkhorn in registers (fp32, log domain), the gate blend, and the sigmoids."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _mix_tokens(coeffs_ptr, alpha_ptr, res_base_ptr, pre_base_ptr, post_base_ptr, gate_ptr,
                h_res_ptr, h_pre_ptr, h_post_ptr, offs_t, tokens_per_gate, tau, N, n, M, num_iters,
                NP)


@triton.jit
def _coeff_mix_bwd_kernel(coeffs_ptr, alpha_ptr, res_base_ptr, pre_base_ptr, post_base_ptr,
                          gate_ptr, d_h_res_ptr, d_h_pre_ptr, d_h_post_ptr, d_coeffs_ptr,
                          d_gate_ptr, partials_ptr, lse_ptr, N, tokens_per_gate, tau,
                          n: tl.constexpr, M: tl.constexpr, num_iters: tl.constexpr,
                          BLOCK_T: tl.constexpr, NP: tl.constexpr):
    """Gradients of the mix: d coeffs [N, M] (already times alpha), d gate per token, and this
    block's partial sums for d res/pre/post_base (columns 0..M-1) and d alpha (columns M..M+2).

    Sinkhorn backward recomputes the iterations. A step z' = z - lse(z, dim) has the VJP
    g <- g - softmax(z, dim) * sum(g, dim), and softmax(z, dim) = exp(z'), so walking back needs
    only the current z and the step's lse (n floats, parked in lse_ptr) to rebuild z = z' + lse."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    t64 = offs_t.to(tl.int64)
    r = tl.arange(0, NP)
    ii = r[None, :, None]
    jj = r[None, None, :]
    z, c_res, valid = _res_logits(coeffs_ptr, alpha_ptr, res_base_ptr, t64, mask_t, tau, n, M, NP)
    lse_row = lse_ptr + t64[:, None] * (2 * num_iters * NP) + r[None, :]
    for it in range(num_iters):
        z, lse = _normalize_rows(z, valid)
        tl.store(lse_row + (2 * it) * NP, lse, mask=mask_t[:, None])
        z, lse = _normalize_cols(z, valid)
        tl.store(lse_row + (2 * it + 1) * NP, lse, mask=mask_t[:, None])
    tl.debug_barrier()  # the loads below may map an lse entry to another thread than its store

    mask3 = mask_t[:, None, None] & valid
    d_h_res = tl.load(d_h_res_ptr + t64[:, None, None] * (n * n) + ii * n + jj, mask=mask3, other=0.0)
    g = tl.load(gate_ptr + offs_t // tokens_per_gate, mask=mask_t, other=0.0)
    s = tl.exp(z)
    d_gate = tl.sum(tl.sum(d_h_res * (s - (ii == jj).to(tl.float32)), axis=2), axis=1)
    tl.store(d_gate_ptr + offs_t, d_gate, mask=mask_t)
    grad = g[:, None, None] * d_h_res * s  # through H_res = (1-g) I + g exp(z)
    for k in range(num_iters):
        it = num_iters - 1 - k
        grad = grad - tl.exp(z) * tl.sum(grad, axis=1)[:, None, :]  # undo the column step
        lse = tl.load(lse_row + (2 * it + 1) * NP, mask=mask_t[:, None], other=0.0)
        z = tl.where(valid, z + lse[:, None, :], _NEG)
        grad = grad - tl.exp(z) * tl.sum(grad, axis=2)[:, :, None]  # undo the row step
        lse = tl.load(lse_row + (2 * it) * NP, mask=mask_t[:, None], other=0.0)
        z = tl.where(valid, z + lse[:, :, None], _NEG)
    # The initial max subtraction adds nothing: after a row-step VJP every row of grad sums to 0.
    d_res = tl.where(valid, grad / tau, 0.0)

    i2 = r[None, :]
    mask2 = mask_t[:, None] & (i2 < n)
    c_pre = tl.load(coeffs_ptr + t64[:, None] * M + n * n + i2, mask=mask2, other=0.0)
    c_post = tl.load(coeffs_ptr + t64[:, None] * M + n * n + n + i2, mask=mask2, other=0.0)
    a_res = tl.load(alpha_ptr).to(tl.float32)
    a_pre = tl.load(alpha_ptr + 1).to(tl.float32)
    a_post = tl.load(alpha_ptr + 2).to(tl.float32)
    h_pre = tl.sigmoid(tl.load(pre_base_ptr + i2, mask=i2 < n, other=0.0).to(tl.float32) + a_pre * c_pre)
    s_post = tl.sigmoid(tl.load(post_base_ptr + i2, mask=i2 < n, other=0.0).to(tl.float32) + a_post * c_post)
    d_pre = tl.load(d_h_pre_ptr + t64[:, None] * n + i2, mask=mask2, other=0.0)
    d_pre = d_pre * h_pre * (1.0 - h_pre)
    d_post = tl.load(d_h_post_ptr + t64[:, None] * n + i2, mask=mask2, other=0.0)
    d_post = d_post * 2.0 * s_post * (1.0 - s_post)

    tl.store(d_coeffs_ptr + t64[:, None, None] * M + ii * n + jj, a_res * d_res, mask=mask3)
    tl.store(d_coeffs_ptr + t64[:, None] * M + n * n + i2, a_pre * d_pre, mask=mask2)
    tl.store(d_coeffs_ptr + t64[:, None] * M + n * n + n + i2, a_post * d_post, mask=mask2)

    part = partials_ptr + tl.program_id(0).to(tl.int64) * (M + 3)
    tl.store(part + r[:, None] * n + r[None, :], tl.sum(d_res, axis=0),
             mask=(r[:, None] < n) & (r[None, :] < n))
    tl.store(part + n * n + r, tl.sum(d_pre, axis=0), mask=r < n)
    tl.store(part + n * n + n + r, tl.sum(d_post, axis=0), mask=r < n)
    tl.store(part + M, tl.sum(tl.sum(tl.sum(d_res * c_res, axis=2), axis=1), axis=0))
    tl.store(part + M + 1, tl.sum(tl.sum(d_pre * c_pre, axis=1), axis=0))
    tl.store(part + M + 2, tl.sum(tl.sum(d_post * c_post, axis=1), axis=0))


# ----------------------------------------------------------------------------- collapse
@triton.jit
def _collapse_fwd_kernel(x_ptr, h_pre_ptr, u_ptr, N, n: tl.constexpr, C: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_in = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < N
    mask = mask_t[:, None] & (c_in < C)[None, :]
    t64 = offs_t.to(tl.int64)
    u = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for i in range(n):
        h = tl.load(h_pre_ptr + t64 * n + i, mask=mask_t, other=0.0)
        x = tl.load(x_ptr + t64[:, None] * (n * C) + i * C + c_in[None, :], mask=mask, other=0.0)
        u += h[:, None] * x.to(tl.float32)
    tl.store(u_ptr + t64[:, None] * C + c_in[None, :], u.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _collapse_bwd_kernel(x_ptr, h_pre_ptr, du_ptr, dx_ptr, d_h_pre_ptr, N, n: tl.constexpr,
                         C: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr, NP: tl.constexpr):
    """d H_pre[t, i] = du[t] . x[t, i] over whole rows, and (WRITE_DX) dx[t, i] = H_pre[t, i] du[t]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t3 = offs_t.to(tl.int64)[:, None, None]
    i3 = tl.arange(0, NP)[None, :, None]
    mask_ti = (offs_t < N)[:, None, None] & (i3 < n)  # [T, NP, 1]
    h = tl.load(h_pre_ptr + t3 * n + i3, mask=mask_ti, other=0.0)
    acc = tl.zeros([BLOCK_T, NP, 1], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c3 = c0 + tl.arange(0, BLOCK_C)[None, None, :]
        du = tl.load(du_ptr + t3 * C + c3, mask=(offs_t < N)[:, None, None] & (c3 < C),
                     other=0.0).to(tl.float32)  # [T, 1, BLOCK_C]
        ptrs = t3 * (n * C) + i3 * C + c3
        x = tl.load(x_ptr + ptrs, mask=mask_ti & (c3 < C), other=0.0).to(tl.float32)
        acc += tl.sum(x * du, axis=2, keep_dims=True)
        if WRITE_DX:
            tl.store(dx_ptr + ptrs, (h * du).to(dx_ptr.dtype.element_ty), mask=mask_ti & (c3 < C))
    tl.store(d_h_pre_ptr + t3 * n + i3, acc, mask=mask_ti)


# ----------------------------------------------------------------------------- residual update
# These kernels build 3D [tokens, streams, channels] pointer blocks directly, with size-1 axes
# where a value is shared: expanding 2D blocks instead made the compiler shuffle every tile through
# shared memory and issue one scalar load per (token, stream) pair (seen in the sm_90 SASS).
@triton.jit
def _residual_fwd_kernel(x_ptr, h_res_ptr, h_post_ptr, y_ptr, out_ptr, N, n: tl.constexpr,
                         C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                         NP: tl.constexpr):
    """out[t, :, c] for all n output streams from one read of x[t, :, c] and y[t, c]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t3 = offs_t.to(tl.int64)[:, None, None]
    i3 = tl.arange(0, NP)[None, :, None]
    c3 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, None, :]
    mask_tc = (offs_t < N)[:, None, None] & (c3 < C)  # [T, 1, BLOCK_C]
    mask_ti = (offs_t < N)[:, None, None] & (i3 < n)  # [T, NP, 1]
    y = tl.load(y_ptr + t3 * C + c3, mask=mask_tc, other=0.0).to(tl.float32)
    out = tl.load(h_post_ptr + t3 * n + i3, mask=mask_ti, other=0.0) * y
    for j in range(n):
        x = tl.load(x_ptr + t3 * (n * C) + j * C + c3, mask=mask_tc, other=0.0).to(tl.float32)
        out += tl.load(h_res_ptr + t3 * (n * n) + i3 * n + j, mask=mask_ti, other=0.0) * x
    tl.store(out_ptr + t3 * (n * C) + i3 * C + c3, out.to(out_ptr.dtype.element_ty),
             mask=mask_ti & (c3 < C))


@triton.jit
def _residual_bwd_kernel(d_out_ptr, x_ptr, h_res_ptr, h_post_ptr, y_ptr, dx_ptr, d_h_res_ptr,
                         d_h_post_ptr, dy_ptr, N, n: tl.constexpr, C: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr):
    """Over whole rows: dx[j] = sum_i H_res[i, j] dout[i], dy = sum_i H_post[i] dout[i],
    d H_res[i, j] = dout[i] . x[j], d H_post[i] = dout[i] . y."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t3 = offs_t.to(tl.int64)[:, None, None]
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    mask_ti = (offs_t < N)[:, None, None] & (i3 < n)  # [T, NP, 1]
    h_post = tl.load(h_post_ptr + t3 * n + i3, mask=mask_ti, other=0.0)
    d_h_res = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
    d_h_post = tl.zeros([BLOCK_T, NP, 1], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c3 = c0 + tl.arange(0, BLOCK_C)[None, None, :]
        mask_tc = (offs_t < N)[:, None, None] & (c3 < C)
        d_out = tl.load(d_out_ptr + t3 * (n * C) + i3 * C + c3, mask=mask_ti & (c3 < C),
                        other=0.0).to(tl.float32)  # [T, NP, BLOCK_C]
        y = tl.load(y_ptr + t3 * C + c3, mask=mask_tc, other=0.0).to(tl.float32)
        dy = tl.sum(h_post * d_out, axis=1, keep_dims=True)
        tl.store(dy_ptr + t3 * C + c3, dy.to(dy_ptr.dtype.element_ty), mask=mask_tc)
        d_h_post += tl.sum(d_out * y, axis=2, keep_dims=True)
        for j in range(n):
            x_ptrs = t3 * (n * C) + j * C + c3
            x = tl.load(x_ptr + x_ptrs, mask=mask_tc, other=0.0).to(tl.float32)
            h_col = tl.load(h_res_ptr + t3 * (n * n) + i3 * n + j, mask=mask_ti, other=0.0)
            dx = tl.sum(h_col * d_out, axis=1, keep_dims=True)
            tl.store(dx_ptr + x_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask_tc)
            d_col = tl.sum(d_out * x, axis=2, keep_dims=True)  # d H_res[t, :, j], this C block
            d_h_res += tl.where(j3 == j, d_col, 0.0)
    tl.store(d_h_res_ptr + t3 * (n * n) + i3 * n + j3, d_h_res, mask=mask_ti & (j3 < n))
    tl.store(d_h_post_ptr + t3 * n + i3, d_h_post, mask=mask_ti)


# ============================================================================= launchers
_INTERPRETED = type(_residual_fwd_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1
# Shapes: x [N, n, C] contiguous; h_res [N, n, n], h_pre/h_post [N, n], coeffs [N, M] all fp32.
# n, C, M and the Sinkhorn iteration count are compile-time constants: one compile per model.

def _block_m(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


def coeff_logits(x, weight, eps, fast=False):
    """coeffs [N, M] fp32 = proj(rms_norm(x_flat)), and rstd [N] fp32 (saved for backward)."""
    N, n, C = x.shape
    M = weight.shape[0]
    cfg = KERNEL_CONFIGS["coeff_logits"]
    coeffs = _new((N, M), torch.float32, x.device)
    rstd = _new((N,), torch.float32, x.device)
    _coeff_logits_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]),)](
        x, weight, coeffs, rstd, N, eps, n=n, C=C, M=M, BLOCK_T=cfg["BLOCK_T"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_M=_block_m(M), DOT_PRECISION=_dot_precision(x.dtype, fast),
        DOT_UPCAST=_INTERPRETED, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return coeffs, rstd


def coeff_logits_backward(x, weight, coeffs, rstd, d_coeffs, h_pre=None, du=None, fast=False):
    """(dx, dW) of coeff_logits; with h_pre and du also adds the collapse term H_pre[i] du to dx,
    so that the whole pre-branch gradient of x is written once.

    Grid: (stream x C block) x token splits of BLOCKS_PER_SPLIT blocks; each program keeps its
    split's share of dW in registers and the shares are summed afterwards (deterministic)."""
    N, n, C = x.shape
    M = weight.shape[0]
    cfg = KERNEL_CONFIGS["coeff_logits_bwd"]
    kblocks = n * triton.cdiv(C, cfg["BLOCK_C"])
    splits = triton.cdiv(N, cfg["BLOCKS_PER_SPLIT"] * cfg["BLOCK_T"])
    dx = _new(x.shape, x.dtype, x.device)
    dw_partial = _new((splits, M, n * C), torch.float32, x.device)
    has_collapse = du is not None
    _coeff_logits_bwd_kernel[(kblocks, splits)](
        x, weight, coeffs, rstd, d_coeffs, h_pre if has_collapse else rstd,
        du if has_collapse else x, dx, dw_partial, N, n=n, C=C, M=M,
        BLOCKS_PER_SPLIT=cfg["BLOCKS_PER_SPLIT"], HAS_COLLAPSE=has_collapse,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], BLOCK_M=_block_m(M),
        DOT_PRECISION=_dot_precision(x.dtype, fast), DOT_UPCAST=_INTERPRETED, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return dx, dw_partial.sum(0).to(weight.dtype)


def coeff_mix(coeffs, alpha, res_base, pre_base, post_base, gate, num_iters, tau):
    """(H_res [N, n, n], H_pre [N, n], H_post [N, n]) from the logits; gate is [1] or [B] fp32."""
    N, M = coeffs.shape
    n = res_base.shape[0]
    cfg = KERNEL_CONFIGS["coeff_mix"]
    dev = coeffs.device
    h_res = _new((N, n, n), torch.float32, dev)
    h_pre = _new((N, n), torch.float32, dev)
    h_post = _new((N, n), torch.float32, dev)
    _coeff_mix_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]),)](
        coeffs, alpha, res_base, pre_base, post_base, gate, h_res, h_pre, h_post, N,
        N // gate.numel(), tau, n=n, M=M, num_iters=num_iters, BLOCK_T=cfg["BLOCK_T"],
        NP=_padded_streams(n), num_warps=cfg["num_warps"])
    return h_res, h_pre, h_post


def coeff_mix_backward(coeffs, alpha, res_base, pre_base, post_base, gate, d_h_res, d_h_pre,
                       d_h_post, num_iters, tau):
    """(d_coeffs [N, M], d_alpha [3], d_res_base [n, n], d_pre_base [n], d_post_base [n], d_gate)."""
    N, M = coeffs.shape
    n = res_base.shape[0]
    cfg = KERNEL_CONFIGS["coeff_mix"]
    NP = _padded_streams(n)
    grid = (triton.cdiv(N, cfg["BLOCK_T"]),)
    dev = coeffs.device
    d_coeffs = _new((N, M), torch.float32, dev)
    d_gate_tokens = _new((N,), torch.float32, dev)
    partials = _new((grid[0], M + 3), torch.float32, dev)
    lse_scratch = torch.empty((N, 2 * num_iters, NP), dtype=torch.float32, device=dev)
    _coeff_mix_bwd_kernel[grid](
        coeffs, alpha, res_base, pre_base, post_base, gate, d_h_res, d_h_pre, d_h_post,
        d_coeffs, d_gate_tokens, partials, lse_scratch, N, N // gate.numel(), tau, n=n, M=M,
        num_iters=num_iters, BLOCK_T=cfg["BLOCK_T"], NP=NP, num_warps=cfg["num_warps"])
    sums = partials.sum(0)
    nn_ = n * n
    return (d_coeffs, sums[M:], sums[:nn_].view(n, n), sums[nn_:nn_ + n], sums[nn_ + n:M],
            d_gate_tokens.view(gate.numel(), -1).sum(1))


def collapse(x, h_pre):
    """u [N, C] in x's dtype."""
    N, n, C = x.shape
    cfg = KERNEL_CONFIGS["collapse"]
    u = _new((N, C), x.dtype, x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_T"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _collapse_fwd_kernel[grid](x, h_pre, u, N, n=n, C=C, BLOCK_T=cfg["BLOCK_T"],
                               BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return u


def collapse_backward(x, h_pre, du, write_dx=True):
    """(dx or None, d_h_pre [N, n] fp32)."""
    N, n, C = x.shape
    cfg = KERNEL_CONFIGS["collapse_bwd"]
    dx = _new(x.shape, x.dtype, x.device) if write_dx else None
    d_h_pre = _new((N, n), torch.float32, x.device)
    _collapse_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]),)](
        x, h_pre, du, dx if write_dx else x, d_h_pre, N, n=n, C=C, WRITE_DX=write_dx,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], NP=_padded_streams(n),
        num_warps=cfg["num_warps"])
    return dx, d_h_pre


def residual(x, h_res, h_post, y):
    """out [N, n, C] in x's dtype."""
    N, n, C = x.shape
    cfg = KERNEL_CONFIGS["residual"]
    out = _new(x.shape, x.dtype, x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_T"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _residual_fwd_kernel[grid](x, h_res, h_post, y, out, N, n=n, C=C, BLOCK_T=cfg["BLOCK_T"],
                               BLOCK_C=cfg["BLOCK_C"], NP=_padded_streams(n),
                               num_warps=cfg["num_warps"])
    return out


def residual_backward(d_out, x, h_res, h_post, y):
    """(dx, d_h_res, d_h_post, dy)."""
    N, n, C = x.shape
    cfg = KERNEL_CONFIGS["residual_bwd"]
    dx = _new(x.shape, x.dtype, x.device)
    dy = _new(y.shape, y.dtype, y.device)
    d_h_res = _new((N, n, n), torch.float32, x.device)
    d_h_post = _new((N, n), torch.float32, x.device)
    _residual_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]),)](
        d_out, x, h_res, h_post, y, dx, d_h_res, d_h_post, dy, N, n=n, C=C,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], NP=_padded_streams(n),
        num_warps=cfg["num_warps"])
    return dx, d_h_res, d_h_post, dy


# ============================================================================= ahead-of-time check
_STREAM_PTRS = {"x_ptr", "du_ptr", "dx_ptr", "u_ptr", "y_ptr", "out_ptr", "d_out_ptr", "dy_ptr",
                "hint_x_ptr", "hint_y_ptr", "z_ptr", "dz_ptr"}
_BRANCH_PTRS = {"y_ptr", "hint_y_ptr", "dy_ptr"}  # branch outputs: bf16 under autocast


def compile_report(arch: int = 90, n: int = 4, C: int = 768, num_iters: int = 20,
                   only: tuple[str, ...] | None = None) -> dict:
    """Compile every kernel for CUDA sm_<arch> with Triton's bundled ptxas (no GPU needed) at one
    model shape, for bf16 and fp32 streams, and read registers and stack (spill) bytes per thread
    off the cubin. Run without TRITON_INTERPRET. {name: {registers, stack_bytes, shared_bytes}};
    only: compile just these kernel names (e.g. ("boundary",) while trying tile sizes)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanochat.kernels import mhc_boundary_triton as bt  # imports this module

    M = n * n + 2 * n
    NP = _padded_streams(n)
    cfg = KERNEL_CONFIGS
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    report = {}
    # "fp32+bf16": the training setting, fp32 streams and bf16 branch outputs under autocast
    # (tf32 projections); only the boundary kernels, which read branch outputs, differ there
    for dtype in ("bf16", "fp32", "fp32+bf16"):
        stream_dtype, branch_dtype = dtype.split("+") if "+" in dtype else (dtype, dtype)
        prec = "ieee" if dtype == "fp32" else "tf32"
        boundary = dict(n=n, C=C, M=M, BLOCK_M=_block_m(M), NP=NP, DOT_PRECISION=prec,
                        DOT_UPCAST=False)
        kernels = {
            "coeff_logits": (_coeff_logits_fwd_kernel, cfg["coeff_logits"],
                             dict(n=n, C=C, M=M, BLOCK_M=_block_m(M), DOT_PRECISION=prec,
                                  DOT_UPCAST=False)),
            "coeff_logits_bwd": (_coeff_logits_bwd_kernel, cfg["coeff_logits_bwd"],
                                 dict(n=n, C=C, M=M, HAS_COLLAPSE=True, BLOCK_M=_block_m(M),
                                      DOT_PRECISION=prec, DOT_UPCAST=False)),
            "collapse": (_collapse_fwd_kernel, cfg["collapse"], dict(n=n, C=C)),
            "collapse_bwd": (_collapse_bwd_kernel, cfg["collapse_bwd"],
                             dict(n=n, C=C, WRITE_DX=True, NP=NP)),
            "residual": (_residual_fwd_kernel, cfg["residual"], dict(n=n, C=C, NP=NP)),
            "residual_bwd": (_residual_bwd_kernel, cfg["residual_bwd"], dict(n=n, C=C, NP=NP)),
        }
        if dtype == "bf16":  # these read and write fp32 only
            mix = dict(n=n, M=M, num_iters=num_iters, NP=NP)
            kernels["coeff_mix"] = (_coeff_mix_fwd_kernel, cfg["coeff_mix"], mix)
            kernels["coeff_mix_bwd"] = (_coeff_mix_bwd_kernel, cfg["coeff_mix"], mix)
        if dtype == "fp32+bf16":
            kernels = {}
        kernels["boundary"] = (bt._boundary_fwd_kernel, cfg["boundary"],
                               dict(boundary, num_iters=num_iters))
        kernels["boundary_small"] = (bt._boundary_fwd_split_kernel, cfg["boundary_small"], boundary)
        if dtype == "bf16":  # fp32 in and out
            kernels["boundary_small_mix"] = (bt._boundary_mix_split_kernel, cfg["boundary_small"],
                                             dict(n=n, C=C, M=M, num_iters=num_iters, NP=NP,
                                                  BLOCK_M=_block_m(M)))
        kernels["boundary_bwd_rows"] = (bt._boundary_bwd_rows_kernel, cfg["boundary_bwd_rows"],
                                        dict(n=n, C=C, NP=NP, FROM_HINT=True, HAS_D_H_PRE=False))
        kernels["boundary_bwd_cols"] = (bt._boundary_bwd_cols_kernel, cfg["boundary_bwd_cols"],
                                        dict(boundary, FROM_HINT=True, HAS_DZ=True))
        for name, (kernel, config, constexprs) in kernels.items():
            if only is not None and name not in only:
                continue
            constexprs = {**{k: v for k, v in config.items() if k in kernel.arg_names}, **constexprs}
            signature = {}
            for arg in kernel.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg.endswith("_ptr"):
                    kind = branch_dtype if arg in _BRANCH_PTRS else stream_dtype
                    signature[arg] = f"*{kind}" if arg in _STREAM_PTRS else "*fp32"
                else:
                    signature[arg] = "fp32" if arg in ("eps", "tau") else "i32"
            # as at run time: torch's allocations are 16-byte aligned, and so is N = B*T here
            aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                       if arg.endswith("_ptr") or arg == "N"}
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=config["num_warps"], num_stages=config.get("num_stages", 3)))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                                       text=True, check=True).stdout
            regs, stack = re.findall(r"REG:(\d+) STACK:(\d+)", usage)[-1]
            report[f"{name}/{dtype}"] = dict(registers=int(regs), stack_bytes=int(stack),
                                             shared_bytes=compiled.metadata.shared)
    return report
