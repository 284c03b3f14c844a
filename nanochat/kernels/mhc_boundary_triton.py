"""Triton kernels at a sublayer boundary: the residual update of sublayer s fused with the
coefficients and the collapse of sublayer s+1, forward and backward.

Conventions are nanochat/kernels/mhc_triton.py's: N tokens, x [N, n, C] contiguous, M = n*n + 2n
packed coefficients. With z the streams after sublayer s (x_{s+1} of the model):

    z[t, i]      = sum_j H_res[t, i, j] x[t, j] + H_post[t, i] y[t]          (sublayer s's update)
    coeffs[t]    = proj'(rms_norm(z[t]))          H'_res, H'_pre, H'_post     (sublayer s+1)
    u'[t]        = sum_i H'_pre[t, i] z[t, i]                                 (its branch input)

Forward, per block of tokens: pass 1 over the channels writes z and accumulates the sum of squares
and z @ W'^T (one read of x and y, one write of z); the mix (Sinkhorn etc.) runs in registers;
pass 2 re-reads the block's own z (just written, often still in L2) for u'.

Decode steps (at most SMALL_N tokens) would give that kernel a program or four, each walking
all the channels in turn, so there the same forward runs as three wider launches instead: the
update and each channel block's share of the sum of squares and of z @ W'^T (a program per token
block x channel block), the shares summed and the mix (a program per token block), then the
collapse (mhc_triton's kernel).

Backward never loads z: it recomputes it from x, y and the matrices on the fly, so z need not be
kept for backward. Nor x, when it is given as a hint: x = H_res_h x_h + H_post_h y_h from the
sublayer before (FROM_HINT), so the model keeps only the streams at block inputs (docs/kernels.md).
Two kernels: `rows` (whole token rows: dH'_pre = du' . z, needed before anything else) and, after
the mix backward of mhc_triton, `cols` (a channel block over a split of tokens: the gradient of z,
then through the update to x, y, H_res, H_post, and this split's share of dW').
"""

import torch
import triton
import triton.language as tl

from nanochat.kernels.mhc_triton import (_INTERPRETED, KERNEL_CONFIGS, _block_m, _dot,
                                         _dot_precision, _mix_tokens, _new, _padded_streams,
                                         collapse)

SMALL_N = 512  # tokens; up to here (decode steps) the forward runs split (KERNEL_CONFIGS["boundary_small"])


@triton.jit
def _load_streams(x_ptr, t3, i3, c3, mask_t3, n: tl.constexpr, C: tl.constexpr):
    """x[t, i, c] as an fp32 [tokens, NP, channels] tile, 0 outside the n streams / C / N."""
    return tl.load(x_ptr + t3 * (n * C) + i3 * C + c3, mask=mask_t3 & (i3 < n) & (c3 < C),
                   other=0.0).to(tl.float32)


@triton.jit
def _update_streams(x, h_res_ptr, h_post_ptr, y_ptr, t3, i3, c3, mask_t3, n: tl.constexpr,
                    C: tl.constexpr):
    """sum_j H_res[t, i, j] x[t, j, c] + H_post[t, i] y[t, c] on a register tile x (fp32)."""
    mask_ti = mask_t3 & (i3 < n)
    y = tl.load(y_ptr + t3 * C + c3, mask=mask_t3 & (c3 < C), other=0.0).to(tl.float32)
    z = tl.load(h_post_ptr + t3 * n + i3, mask=mask_ti, other=0.0) * y
    for j in range(n):
        x_j = tl.sum(tl.where(i3 == j, x, 0.0), axis=1, keep_dims=True)  # [T, 1, C] in registers
        z += tl.load(h_res_ptr + t3 * (n * n) + i3 * n + j, mask=mask_ti, other=0.0) * x_j
    return z


@triton.jit
def _input_streams(x_ptr, hint_x_ptr, hint_h_res_ptr, hint_h_post_ptr, hint_y_ptr, t3, i3, c3,
                   mask_t3, n: tl.constexpr, C: tl.constexpr, FROM_HINT: tl.constexpr):
    """The op's input x as an fp32 tile: loaded, or recomputed from the sublayer before and
    rounded to the stream dtype exactly as the forward pass stored it."""
    if FROM_HINT:
        x = _update_streams(_load_streams(hint_x_ptr, t3, i3, c3, mask_t3, n, C), hint_h_res_ptr,
                            hint_h_post_ptr, hint_y_ptr, t3, i3, c3, mask_t3, n, C)
        x = x.to(hint_x_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = _load_streams(x_ptr, t3, i3, c3, mask_t3, n, C)
    return x


@triton.jit
def _update_and_project(x_ptr, h_res_ptr, h_post_ptr, y_ptr, w_ptr, z_ptr, t3, i3, c3, m3, mask_t3,
                        sumsq, acc, n: tl.constexpr, C: tl.constexpr, M: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                        NP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One channel block of z = H_res x + H_post y, stored; returns sumsq + its sum of squares
    per token and acc + its share of z @ W'^T. W' tiles are [BLOCK_M, NP, BLOCK_C]."""
    z = _update_streams(_load_streams(x_ptr, t3, i3, c3, mask_t3, n, C), h_res_ptr, h_post_ptr,
                        y_ptr, t3, i3, c3, mask_t3, n, C)
    z = z.to(z_ptr.dtype.element_ty)  # the stored value: the next sublayer's coefficients see it
    tl.store(z_ptr + t3 * (n * C) + i3 * C + c3, z, mask=mask_t3 & (i3 < n) & (c3 < C))
    zf = z.to(tl.float32)
    sumsq += tl.sum(tl.sum(zf * zf, axis=2), axis=1)
    w = tl.load(w_ptr + m3 * (n * C) + i3 * C + c3, mask=(m3 < M) & (i3 < n) & (c3 < C),
                other=0.0).to(z.dtype)
    acc = _dot(tl.reshape(z, [BLOCK_T, NP * BLOCK_C]),
               tl.trans(tl.reshape(w, [BLOCK_M, NP * BLOCK_C])), acc, DOT_PRECISION, DOT_UPCAST)
    return sumsq, acc


@triton.jit
def _coeffs_and_mix(acc, sumsq, coeffs_ptr, rstd_ptr, alpha_ptr, res_base_ptr, pre_base_ptr,
                    post_base_ptr, gate_ptr, h_res_next_ptr, h_pre_next_ptr, h_post_next_ptr,
                    offs_t, N, tokens_per_gate, eps, tau, n: tl.constexpr, C: tl.constexpr,
                    M: tl.constexpr, num_iters: tl.constexpr, BLOCK_M: tl.constexpr,
                    NP: tl.constexpr):
    """coeffs = (z @ W'^T) * rstd and rstd stored, then sublayer s+1's mix; returns its H_pre."""
    mask_t = offs_t < N
    rstd = 1.0 / tl.sqrt(sumsq / (n * C) + eps)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(coeffs_ptr + offs_t.to(tl.int64)[:, None] * M + offs_m[None, :], acc * rstd[:, None],
             mask=mask_t[:, None] & (offs_m[None, :] < M))
    tl.store(rstd_ptr + offs_t, rstd, mask=mask_t)
    tl.debug_barrier()  # the mix reads the coefficients back, possibly in other threads
    return _mix_tokens(coeffs_ptr, alpha_ptr, res_base_ptr, pre_base_ptr, post_base_ptr, gate_ptr,
                       h_res_next_ptr, h_pre_next_ptr, h_post_next_ptr, offs_t, tokens_per_gate,
                       tau, N, n, M, num_iters, NP)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _boundary_fwd_kernel(x_ptr, h_res_ptr, h_post_ptr, y_ptr, w_ptr, alpha_ptr, res_base_ptr,
                         pre_base_ptr, post_base_ptr, gate_ptr, z_ptr, u_ptr, coeffs_ptr, rstd_ptr,
                         h_res_next_ptr, h_pre_next_ptr, h_post_next_ptr, N, tokens_per_gate, eps,
                         tau, n: tl.constexpr, C: tl.constexpr, M: tl.constexpr,
                         num_iters: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_M: tl.constexpr, NP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         DOT_UPCAST: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    t64 = offs_t.to(tl.int64)
    t3 = t64[:, None, None]
    mask_t3 = mask_t[:, None, None]
    i3 = tl.arange(0, NP)[None, :, None]
    m3 = tl.arange(0, BLOCK_M)[:, None, None]  # W' tiles are [BLOCK_M, NP, BLOCK_C]
    acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c3 = c0 + tl.arange(0, BLOCK_C)[None, None, :]
        sumsq, acc = _update_and_project(x_ptr, h_res_ptr, h_post_ptr, y_ptr, w_ptr, z_ptr, t3,
                                         i3, c3, m3, mask_t3, sumsq, acc, n, C, M, BLOCK_T,
                                         BLOCK_C, BLOCK_M, NP, DOT_PRECISION, DOT_UPCAST)
    h_pre = _coeffs_and_mix(acc, sumsq, coeffs_ptr, rstd_ptr, alpha_ptr, res_base_ptr,
                            pre_base_ptr, post_base_ptr, gate_ptr, h_res_next_ptr, h_pre_next_ptr,
                            h_post_next_ptr, offs_t, N, tokens_per_gate, eps, tau, n, C, M,
                            num_iters, BLOCK_M, NP)
    tl.debug_barrier()  # z of this block was written by other threads of the block
    h3 = tl.expand_dims(h_pre, 2)
    for c0 in range(0, C, BLOCK_C):
        c_in = c0 + tl.arange(0, BLOCK_C)
        z = _load_streams(z_ptr, t3, i3, c_in[None, None, :], mask_t3, n, C)
        u = tl.sum(h3 * z, axis=1)
        tl.store(u_ptr + t64[:, None] * C + c_in[None, :], u.to(u_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & (c_in < C)[None, :])


# ----------------------------------------------------------------------------- forward, decode
@triton.jit
def _boundary_fwd_split_kernel(x_ptr, h_res_ptr, h_post_ptr, y_ptr, w_ptr, z_ptr, dot_part_ptr,
                               sumsq_part_ptr, N, n: tl.constexpr, C: tl.constexpr,
                               M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_M: tl.constexpr, NP: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One (token block, channel block) tile: z = H_res x + H_post y (stored), and this channel
    block's share of sum(z^2) and of z @ W'^T, as [channel blocks, N] and [channel blocks, N, BLOCK_M]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cb = tl.program_id(1)
    mask_t = offs_t < N
    t64 = offs_t.to(tl.int64)
    t3 = t64[:, None, None]
    mask_t3 = mask_t[:, None, None]
    i3 = tl.arange(0, NP)[None, :, None]
    m3 = tl.arange(0, BLOCK_M)[:, None, None]
    c3 = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, None, :]
    sumsq, acc = _update_and_project(x_ptr, h_res_ptr, h_post_ptr, y_ptr, w_ptr, z_ptr, t3, i3, c3,
                                     m3, mask_t3, tl.zeros([BLOCK_T], dtype=tl.float32),
                                     tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32), n, C, M,
                                     BLOCK_T, BLOCK_C, BLOCK_M, NP, DOT_PRECISION, DOT_UPCAST)
    part = cb.to(tl.int64) * N + t64
    tl.store(sumsq_part_ptr + part, sumsq, mask=mask_t)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(dot_part_ptr + part[:, None] * BLOCK_M + offs_m[None, :], acc, mask=mask_t[:, None])


@triton.jit
def _boundary_mix_split_kernel(dot_part_ptr, sumsq_part_ptr, alpha_ptr, res_base_ptr, pre_base_ptr,
                               post_base_ptr, gate_ptr, coeffs_ptr, rstd_ptr, h_res_next_ptr,
                               h_pre_next_ptr, h_post_next_ptr, N, tokens_per_gate, eps, tau,
                               n: tl.constexpr, C: tl.constexpr, M: tl.constexpr,
                               num_iters: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, NP: tl.constexpr):
    """The shares of _boundary_fwd_split_kernel's channel blocks (BLOCK_C wide) summed in a fixed
    order (deterministic) into coeffs and rstd, then sublayer s+1's mix, as in _boundary_fwd_kernel."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    t64 = offs_t.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for cb in range((C + BLOCK_C - 1) // BLOCK_C):
        part = cb * N + t64
        acc += tl.load(dot_part_ptr + part[:, None] * BLOCK_M + offs_m[None, :],
                       mask=mask_t[:, None], other=0.0)
        sumsq += tl.load(sumsq_part_ptr + part, mask=mask_t, other=0.0)
    _coeffs_and_mix(acc, sumsq, coeffs_ptr, rstd_ptr, alpha_ptr, res_base_ptr, pre_base_ptr,
                    post_base_ptr, gate_ptr, h_res_next_ptr, h_pre_next_ptr, h_post_next_ptr,
                    offs_t, N, tokens_per_gate, eps, tau, n, C, M, num_iters, BLOCK_M, NP)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _boundary_bwd_rows_kernel(x_ptr, hint_x_ptr, hint_h_res_ptr, hint_h_post_ptr, hint_y_ptr,
                              h_res_ptr, h_post_ptr, y_ptr, du_ptr, d_h_pre_in_ptr, d_h_pre_ptr,
                              N, n: tl.constexpr, C: tl.constexpr, FROM_HINT: tl.constexpr,
                              HAS_D_H_PRE: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr, NP: tl.constexpr):
    """d H'_pre[t, i] = du'[t] . z[t, i] (+ any gradient H'_pre got from outside), z recomputed."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t3 = offs_t.to(tl.int64)[:, None, None]
    mask_t3 = (offs_t < N)[:, None, None]
    i3 = tl.arange(0, NP)[None, :, None]
    mask_ti = mask_t3 & (i3 < n)
    acc = tl.zeros([BLOCK_T, NP, 1], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c3 = c0 + tl.arange(0, BLOCK_C)[None, None, :]
        x = _input_streams(x_ptr, hint_x_ptr, hint_h_res_ptr, hint_h_post_ptr, hint_y_ptr, t3, i3,
                           c3, mask_t3, n, C, FROM_HINT)
        z = _update_streams(x, h_res_ptr, h_post_ptr, y_ptr, t3, i3, c3, mask_t3, n, C)
        z = z.to(x_ptr.dtype.element_ty).to(tl.float32)
        du = tl.load(du_ptr + t3 * C + c3, mask=mask_t3 & (c3 < C), other=0.0).to(tl.float32)
        acc += tl.sum(z * du, axis=2, keep_dims=True)
    if HAS_D_H_PRE:
        acc += tl.load(d_h_pre_in_ptr + t3 * n + i3, mask=mask_ti, other=0.0)
    tl.store(d_h_pre_ptr + t3 * n + i3, acc, mask=mask_ti)


@triton.jit
def _boundary_bwd_cols_kernel(x_ptr, hint_x_ptr, hint_h_res_ptr, hint_h_post_ptr, hint_y_ptr,
                              h_res_ptr, h_post_ptr, y_ptr, w_ptr, coeffs_ptr, rstd_ptr,
                              d_coeffs_ptr, h_pre_next_ptr, du_ptr, dz_ptr, dx_ptr, dy_ptr,
                              d_h_res_part_ptr, d_h_post_part_ptr, dw_part_ptr, N,
                              n: tl.constexpr, C: tl.constexpr, M: tl.constexpr,
                              FROM_HINT: tl.constexpr, HAS_DZ: tl.constexpr,
                              BLOCKS_PER_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, NP: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """For one channel block and one split of tokens:
    dz = dz_in + H'_pre du' + rstd (dc W') - rstd^2 (dc . c) / (nC) z      (dc: d coeffs, x alpha)
    dx[j] = sum_i H_res[i, j] dz[i], dy = sum_i H_post[i] dz[i],
    dH_res[i, j] += dz[i] . x[j] and dH_post[i] += dz[i] . y over this channel block (partials),
    dW' += sum_t rstd dc (x) z over the split (kept in registers, written once)."""
    cb = tl.program_id(0)
    c3 = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, None, :]
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    m3 = tl.arange(0, BLOCK_M)[:, None, None]
    offs_m = tl.arange(0, BLOCK_M)
    K = n * C
    stream_dtype = x_ptr.dtype.element_ty
    w = tl.load(w_ptr + m3 * K + i3 * C + c3, mask=(m3 < M) & (i3 < n) & (c3 < C), other=0.0)
    w = tl.reshape(w.to(stream_dtype), [BLOCK_M, NP * BLOCK_C])
    dw = tl.zeros([BLOCK_M, NP * BLOCK_C], dtype=tl.float32)
    for k in range(BLOCKS_PER_SPLIT):
        offs_t = (tl.program_id(1) * BLOCKS_PER_SPLIT + k) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        t64 = offs_t.to(tl.int64)
        t3 = t64[:, None, None]
        mask_t3 = mask_t[:, None, None]
        mask_ti = mask_t3 & (i3 < n)
        mask_tic = mask_ti & (c3 < C)
        x = _input_streams(x_ptr, hint_x_ptr, hint_h_res_ptr, hint_h_post_ptr, hint_y_ptr, t3, i3,
                           c3, mask_t3, n, C, FROM_HINT)
        z = _update_streams(x, h_res_ptr, h_post_ptr, y_ptr, t3, i3, c3, mask_t3, n, C)
        z = z.to(stream_dtype)
        mask_tm = mask_t[:, None] & (offs_m[None, :] < M)
        dc = tl.load(d_coeffs_ptr + t64[:, None] * M + offs_m[None, :], mask=mask_tm, other=0.0)
        c = tl.load(coeffs_ptr + t64[:, None] * M + offs_m[None, :], mask=mask_tm, other=0.0)
        rstd = tl.load(rstd_ptr + offs_t, mask=mask_t, other=0.0)
        dc_scaled = (dc * rstd[:, None]).to(stream_dtype)
        z_coef = rstd * rstd * tl.sum(dc * c, axis=1) / K
        dz = tl.reshape(_dot(dc_scaled, w, None, DOT_PRECISION, DOT_UPCAST), [BLOCK_T, NP, BLOCK_C])
        dz = dz - z_coef[:, None, None] * z.to(tl.float32)
        du = tl.load(du_ptr + t3 * C + c3, mask=mask_t3 & (c3 < C), other=0.0).to(tl.float32)
        dz += tl.load(h_pre_next_ptr + t3 * n + i3, mask=mask_ti, other=0.0) * du
        if HAS_DZ:
            dz += tl.load(dz_ptr + t3 * K + i3 * C + c3, mask=mask_tic, other=0.0).to(tl.float32)
        dz = tl.where(mask_tic, dz, 0.0)
        dw = _dot(tl.trans(dc_scaled), tl.reshape(z, [BLOCK_T, NP * BLOCK_C]), dw, DOT_PRECISION,
                  DOT_UPCAST)

        y = tl.load(y_ptr + t3 * C + c3, mask=mask_t3 & (c3 < C), other=0.0).to(tl.float32)
        h_post = tl.load(h_post_ptr + t3 * n + i3, mask=mask_ti, other=0.0)
        dy = tl.sum(h_post * dz, axis=1, keep_dims=True)
        tl.store(dy_ptr + t3 * C + c3, dy.to(dy_ptr.dtype.element_ty), mask=mask_t3 & (c3 < C))
        d_h_res = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
        for j in range(n):
            h_col = tl.load(h_res_ptr + t3 * (n * n) + i3 * n + j, mask=mask_ti, other=0.0)
            dx = tl.sum(h_col * dz, axis=1, keep_dims=True)
            tl.store(dx_ptr + t3 * K + j * C + c3, dx.to(dx_ptr.dtype.element_ty),
                     mask=mask_t3 & (c3 < C))
            x_j = tl.sum(tl.where(i3 == j, x, 0.0), axis=1, keep_dims=True)
            d_h_res += tl.where(j3 == j, tl.sum(dz * x_j, axis=2, keep_dims=True), 0.0)
        part = cb.to(tl.int64) * N
        tl.store(d_h_res_part_ptr + (part + t3) * (n * n) + i3 * n + j3, d_h_res,
                 mask=mask_ti & (j3 < n))
        tl.store(d_h_post_part_ptr + (part + t3) * n + i3, tl.sum(dz * y, axis=2, keep_dims=True),
                 mask=mask_ti)
    dw = tl.reshape(dw, [BLOCK_M, NP, BLOCK_C])
    part = tl.program_id(1).to(tl.int64) * M * K
    tl.store(dw_part_ptr + part + m3 * K + i3 * C + c3, dw, mask=(m3 < M) & (i3 < n) & (c3 < C))


# ============================================================================= launchers
def boundary_forward(x, h_res, h_post, y, weight, alpha, res_base, pre_base, post_base, gate,
                     num_iters, tau, eps, fast=False):
    """(z [N, n, C] in x's dtype, u [N, C] in x's dtype, H'_res [N, n, n], H'_pre, H'_post [N, n],
    coeffs [N, M], rstd [N]) for the update (x, h_res, h_post, y) and the next sublayer's weights."""
    N, n, C = x.shape
    M = weight.shape[0]
    dev = x.device
    z = _new(x.shape, x.dtype, dev)
    coeffs = _new((N, M), torch.float32, dev)
    rstd = _new((N,), torch.float32, dev)
    h_res_next = _new((N, n, n), torch.float32, dev)
    h_pre_next = _new((N, n), torch.float32, dev)
    h_post_next = _new((N, n), torch.float32, dev)
    if N <= SMALL_N:
        u = _boundary_forward_split(x, h_res, h_post, y, weight, alpha, res_base, pre_base,
                                    post_base, gate, num_iters, tau, eps, fast, z, coeffs, rstd,
                                    h_res_next, h_pre_next, h_post_next)
        return z, u, h_res_next, h_pre_next, h_post_next, coeffs, rstd
    cfg = KERNEL_CONFIGS["boundary"]
    u = _new((N, C), x.dtype, dev)
    _boundary_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]),)](
        x, h_res, h_post, y, weight, alpha, res_base, pre_base, post_base, gate, z, u, coeffs,
        rstd, h_res_next, h_pre_next, h_post_next, N, N // gate.numel(), eps, tau, n=n, C=C, M=M,
        num_iters=num_iters, BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], BLOCK_M=_block_m(M),
        NP=_padded_streams(n), DOT_PRECISION=_dot_precision(x.dtype, fast),
        DOT_UPCAST=_INTERPRETED, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return z, u, h_res_next, h_pre_next, h_post_next, coeffs, rstd


def _boundary_forward_split(x, h_res, h_post, y, weight, alpha, res_base, pre_base, post_base,
                            gate, num_iters, tau, eps, fast, z, coeffs, rstd, h_res_next,
                            h_pre_next, h_post_next):
    """boundary_forward for a few tokens (decode): the update and the channel blocks' shares of
    the projection, then their sum and the mix, then the collapse; writes z, coeffs, rstd and the
    H's in place and returns u."""
    N, n, C = x.shape
    M = weight.shape[0]
    cfg = KERNEL_CONFIGS["boundary_small"]
    BLOCK_M = _block_m(M)
    cblocks = triton.cdiv(C, cfg["BLOCK_C"])
    token_blocks = triton.cdiv(N, cfg["BLOCK_T"])
    dot_part = _new((cblocks, N, BLOCK_M), torch.float32, x.device)
    sumsq_part = _new((cblocks, N), torch.float32, x.device)
    _boundary_fwd_split_kernel[(token_blocks, cblocks)](
        x, h_res, h_post, y, weight, z, dot_part, sumsq_part, N, n=n, C=C, M=M,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], BLOCK_M=BLOCK_M, NP=_padded_streams(n),
        DOT_PRECISION=_dot_precision(x.dtype, fast), DOT_UPCAST=_INTERPRETED,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _boundary_mix_split_kernel[(token_blocks,)](
        dot_part, sumsq_part, alpha, res_base, pre_base, post_base, gate, coeffs, rstd,
        h_res_next, h_pre_next, h_post_next, N, N // gate.numel(), eps, tau, n=n, C=C, M=M,
        num_iters=num_iters, BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], BLOCK_M=BLOCK_M,
        NP=_padded_streams(n), num_warps=cfg["num_warps"])
    return collapse(z, h_pre_next)


def boundary_h_pre_grad(x, hint, h_res, h_post, y, du, d_h_pre=None):
    """d H'_pre [N, n] fp32 = du' . z per stream (+ d_h_pre). hint: None or (x_h, H_res_h,
    H_post_h, y_h) from which x is recomputed (x is then ignored and may be None)."""
    from_hint = hint is not None
    src = hint[0] if from_hint else x
    N, n, C = src.shape
    cfg = KERNEL_CONFIGS["boundary_bwd_rows"]
    hint = hint if from_hint else (src, h_res, h_post, y)  # unused pointers when not FROM_HINT
    out = _new((N, n), torch.float32, src.device)
    _boundary_bwd_rows_kernel[(triton.cdiv(N, cfg["BLOCK_T"]),)](
        src, *hint, h_res, h_post, y, du, out if d_h_pre is None else d_h_pre, out, N, n=n, C=C,
        FROM_HINT=from_hint, HAS_D_H_PRE=d_h_pre is not None, BLOCK_T=cfg["BLOCK_T"],
        BLOCK_C=cfg["BLOCK_C"], NP=_padded_streams(n), num_warps=cfg["num_warps"])
    return out


def boundary_backward(x, hint, h_res, h_post, y, weight, coeffs, rstd, d_coeffs, h_pre_next, du,
                      dz=None, fast=False):
    """(dx, d H_res [N, n, n], d H_post [N, n], dy, dW') given d coeffs (already through the mix
    backward) and the gradients of z (dz, None if z is unused) and of u' (du)."""
    from_hint = hint is not None
    src = hint[0] if from_hint else x
    N, n, C = src.shape
    M = weight.shape[0]
    cfg = KERNEL_CONFIGS["boundary_bwd_cols"]
    dev = src.device
    cblocks = triton.cdiv(C, cfg["BLOCK_C"])
    per_split = min(cfg["BLOCKS_PER_SPLIT"], triton.cdiv(N, cfg["BLOCK_T"]))  # few tokens: no empty loops
    splits = triton.cdiv(N, per_split * cfg["BLOCK_T"])
    hint = hint if from_hint else (src, h_res, h_post, y)
    dx = _new(src.shape, src.dtype, dev)
    dy = _new(y.shape, y.dtype, dev)
    d_h_res_part = _new((cblocks, N, n, n), torch.float32, dev)
    d_h_post_part = _new((cblocks, N, n), torch.float32, dev)
    dw_part = _new((splits, M, n * C), torch.float32, dev)
    _boundary_bwd_cols_kernel[(cblocks, splits)](
        src, *hint, h_res, h_post, y, weight, coeffs, rstd, d_coeffs, h_pre_next, du,
        src if dz is None else dz, dx, dy, d_h_res_part, d_h_post_part, dw_part, N, n=n, C=C, M=M,
        FROM_HINT=from_hint, HAS_DZ=dz is not None, BLOCKS_PER_SPLIT=per_split,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], BLOCK_M=_block_m(M),
        NP=_padded_streams(n), DOT_PRECISION=_dot_precision(src.dtype, fast),
        DOT_UPCAST=_INTERPRETED, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (dx, d_h_res_part.sum(0), d_h_post_part.sum(0), dy,
            dw_part.sum(0).to(weight.dtype))
