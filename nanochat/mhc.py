"""Dynamic Manifold-Constrained Hyper-Connections (mHC), arXiv 2512.24880, per token.

Conventions, fixed here once (docs/mhc.md repeats them):

    streams   x: [B, T, n, C]          n residual streams of width C
    H_res:       [B, T, n, n]          doubly stochastic; out[i] = sum_j H_res[i, j] * x[j]
                                        (the paper's x_{l+1} = H_res x_l, x_l an n x C matrix)
    H_pre:       [B, T, n] in (0, 1)   branch input u = sum_i H_pre[i] * x[i]
    H_post:      [B, T, n] in (0, 2)   out[i] += H_post[i] * F(u)
    gate g in [0, 1]:                  H_res <- (1 - g) * I + g * H_res
                                        (g = 0 gives exactly I; a convex blend of two doubly
                                        stochastic matrices stays doubly stochastic)

Coefficients (paper section 4.1): x~ = RMSNorm(flatten(x)) over n*C, one packed projection
phi to n^2 + 2n values, each part scaled by a learnable alpha (init 0.01) and added to a static
base b; H_res = Sinkhorn(logits / tau), H_pre = sigmoid, H_post = 2 * sigmoid.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sinkhorn_log_iterations(logits: torch.Tensor, num_iters: int, tau: float) -> torch.Tensor:
    # fp32 inside: bf16 log-sum-exp drifts by ~1e-2 per row after 20 iterations.
    z = logits.float() / tau
    z = z - z.amax(dim=(-2, -1), keepdim=True)  # max-subtracted: exp never overflows
    for _ in range(num_iters):
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # rows sum to 1
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)  # columns sum to 1
    return torch.exp(z)


def describe_compile_arg(arg, depth: int = 0) -> str:
    """A short, bounded description of one argument of an op that Inductor lowers: dtype and
    size for tensors and IR nodes, values for plain data, a type name for anything else. It never
    calls str() on an IR node (see bound_inductor_operator_str)."""
    if isinstance(arg, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)):
        return repr(arg)
    if isinstance(arg, (list, tuple)) and depth < 2:
        inner = ", ".join(describe_compile_arg(a, depth + 1) for a in arg[:8])
        more = f", ... ({len(arg)} items)" if len(arg) > 8 else ""
        return ("[" if isinstance(arg, list) else "(") + inner + more + ("]" if isinstance(arg, list) else ")")
    if isinstance(arg, torch.Tensor):
        return f"Tensor({arg.dtype}, {tuple(arg.shape)})"
    try:  # Inductor IR (TensorBox, StorageBox, buffers): their own size and dtype, never their inputs
        return f"{type(arg).__name__}({arg.get_dtype()}, {list(arg.get_size())})"
    except Exception:
        return type(arg).__name__


def bound_inductor_operator_str():
    """Keep torch.compile from hanging on the fused mHC stack (torch 2.11, seen on an H100 at d12).

    Inductor lowers each custom op it has no lowering for as an "implicit fallback" and logs
    `OperatorIssue.operator_str(target, args, kwargs)` for it; torch 2.11 builds that string
    eagerly, whatever the log level, and str() of an IR argument prints the IR it was computed from,
    recursively, without sharing: a tree that grows exponentially with depth. The fused stack's
    final op (mhc_collapse) is first met at the end of the graph, its arguments computed through
    all 24 sublayers of d12, so compile spent minutes (timed out at 320 s) in that __str__.
    Newer torch formats lazily (2.13's graph.py), but the message is still unbounded when logging
    is on. This replaces the formatter with a bounded one (op name, argument dtypes and sizes);
    only the text of that log line and of Inductor's missing-operator errors changes. Called by
    every torch.compile site of the project (importing Inductor costs a second, so not at import)."""
    try:
        from torch._inductor import exc
    except Exception:  # no inductor in this build: nothing to bound
        return
    if getattr(exc.OperatorIssue.operator_str, "_nanochat_bounded", False):
        return

    def operator_str(target, args, kwargs) -> str:
        lines = [f"  target: {target}"] + [f"  args[{i}]: {describe_compile_arg(a)}" for i, a in enumerate(args)]
        if kwargs:
            lines.append(f"  kwargs: {describe_compile_arg(list(kwargs.items()))}")
        return "\n".join(lines)
    operator_str._nanochat_bounded = True
    exc.OperatorIssue.operator_str = staticmethod(operator_str)


@torch.library.custom_op("nanochat::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: torch.Tensor, num_iters: int, tau: float) -> torch.Tensor:
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _sinkhorn_log_iterations(logits, num_iters, tau)


@_sinkhorn_op.register_fake
def _(logits, num_iters, tau):
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)


def _sinkhorn_log_backward(grad_out: torch.Tensor, logits: torch.Tensor, num_iters: int,
                           tau: float) -> torch.Tensor:
    """Gradient of _sinkhorn_log_iterations, recomputing the iterations instead of storing them.

    Each step z <- z - logsumexp(z, dim) has the vector-Jacobian product g <- g - softmax(z, dim) *
    sum(g, dim). The initial max subtraction shifts every entry equally and the first row step is
    shift-invariant, so it contributes nothing."""
    z = logits.float() / tau
    z = z - z.amax(dim=(-2, -1), keepdim=True)
    inputs = []
    for _ in range(num_iters):
        inputs.append(z)
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        inputs.append(z)
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)
    g = grad_out.float() * torch.exp(z)
    for step in reversed(range(2 * num_iters)):
        dim = -1 if step % 2 == 0 else -2
        g = g - torch.softmax(inputs[step], dim=dim) * g.sum(dim=dim, keepdim=True)
    return (g / tau).to(logits.dtype)


@torch.library.custom_op("nanochat::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(grad_out: torch.Tensor, logits: torch.Tensor, num_iters: int,
                          tau: float) -> torch.Tensor:
    # Recompute the iterations instead of storing them: 2*num_iters [.., n, n] fp32 tensors per
    # sublayer would otherwise stay alive until backward.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _sinkhorn_log_backward(grad_out, logits, num_iters, tau)


@_sinkhorn_backward_op.register_fake
def _(grad_out, logits, num_iters, tau):
    return torch.empty_like(logits)


def _sinkhorn_setup_context(ctx, inputs, output):
    logits, num_iters, tau = inputs
    ctx.save_for_backward(logits)
    ctx.num_iters, ctx.tau = num_iters, tau


def _sinkhorn_backward(ctx, grad_out):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward_op(grad_out, logits, ctx.num_iters, ctx.tau), None, None


_sinkhorn_op.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup_context)


def sinkhorn_log(logits: torch.Tensor, num_iters: int = 20, tau: float = 1.0,
                 recompute: bool = True) -> torch.Tensor:
    """Project [..., n, n] logits onto doubly stochastic matrices (Sinkhorn-Knopp in log domain).

    Always computed in fp32 (also under bf16 autocast) and returned as fp32. With recompute=True
    it runs as an opaque custom op (torch.compile does not unroll it) whose backward recomputes the
    iterations; with recompute=False it is plain differentiable PyTorch (the reference)."""
    if num_iters < 1:
        raise ValueError(f"sinkhorn num_iters={num_iters} must be >= 1")
    if tau <= 0:
        raise ValueError(f"sinkhorn tau={tau} must be > 0")
    if recompute:
        return _sinkhorn_op(logits, int(num_iters), float(tau))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _sinkhorn_log_iterations(logits, num_iters, tau)


# The stream arithmetic of one sublayer, as broadcast multiply-adds rather than einsums:
# 'btij,btjc->btic' is a batched matmul of B*T tiny n x n @ n x C products, which cuBLAS runs as
# B*T mostly empty tiles (and autocast rounds to bf16), while torch.compile fuses a broadcast
# product and its sum over the n streams, the H_post term included, into one pass over the
# streams (and the backward into one pointwise and one reduction kernel). Written as one product
# and one sum rather than n separate multiply-adds: a third fewer graph nodes (d4: 685 vs 917),
# so a shorter compile; eager mode briefly holds the [.., n, n, C] product. Arithmetic in fp32 at
# least (bf16 streams are widened, as in an einsum's fp32 accumulator).
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def collapse_streams(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Branch input u = sum_i H_pre[.., i] * x[.., i, :]: [B, T, n], [B, T, n, C] -> [B, T, C] in x's dtype."""
    dtype = _compute_dtype(x)
    return (h_pre.to(dtype).unsqueeze(-1) * x.to(dtype)).sum(dim=-2).to(x.dtype)


def residual_streams(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """The streams after a sublayer: out[.., i, :] = sum_j H_res[.., i, j] * x[.., j, :] + H_post[.., i] * y,
    [B, T, n, C] in the wider of x's and y's dtypes."""
    dtype = _compute_dtype(x)
    mixed = (h_res.to(dtype).unsqueeze(-1) * x.to(dtype).unsqueeze(-3)).sum(dim=-2)
    out = mixed + h_post.to(dtype).unsqueeze(-1) * y.to(dtype).unsqueeze(-2)
    return out.to(torch.promote_types(x.dtype, y.dtype))


# Presets over the mHC fields of GPTConfig. The project's defaults (GPTConfig) need no preset.
MHC_PRESETS = {
    # The PRD (../shared/seeds/004) literally: tau 0.05 with off-diagonal logits -8 makes
    # exp(-160) underflow to 0 in fp32, so H_res is exactly I and its off-diagonal parameters get
    # exactly zero gradient forever. Kept reachable to show that (docs/mhc.md).
    "prd": dict(
        mhc_sinkhorn_iters=20, mhc_sinkhorn_tau=0.05, mhc_alpha_init=1.0, mhc_alpha_learnable=False,
        mhc_proj_init_std=0.01, mhc_res_diag_logit=0.0, mhc_res_offdiag_logit=-8.0,
        mhc_pre_init="first", mhc_gate_init=1 / (1 + math.exp(-1.0)), mhc_gate_noise=0.2,
    ),
    # The paper (arXiv 2512.24880): no temperature (tau = 1), 20 iterations, dynamic terms scaled
    # by learnable alphas initialised at 0.01, and no gate (g fixed at 1).
    "paper": dict(
        mhc_sinkhorn_iters=20, mhc_sinkhorn_tau=1.0, mhc_alpha_init=0.01, mhc_alpha_learnable=True,
        mhc_proj_init_std=0.0, mhc_res_diag_logit=3.0, mhc_res_offdiag_logit=0.0,
        mhc_pre_init="cycle", mhc_gate_init=1.0, mhc_gate_noise=0.0,
    ),
}


def apply_mhc_preset(config_kwargs: dict, preset: str | None) -> dict:
    """Return config_kwargs with the preset's mHC fields filled in (explicit kwargs are overwritten)."""
    if preset in (None, "", "default"):
        return dict(config_kwargs)
    if preset not in MHC_PRESETS:
        raise ValueError(f"unknown --mhc_preset {preset!r}; choose one of: default, "
                         + ", ".join(MHC_PRESETS))
    return {**config_kwargs, **MHC_PRESETS[preset]}


def gate_to_logit(value: float) -> float:
    """Inverse sigmoid, with 0 -> -inf and 1 -> +inf so the extremes are exact."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"mHC gate {value} is outside [0, 1]; gates are sigmoid values")
    if value == 0.0:
        return -math.inf
    if value == 1.0:
        return math.inf
    return math.log(value / (1.0 - value))


class DynamicMHC(nn.Module):
    """mHC around one sublayer (attention or MLP): per-token H_res, H_pre, H_post from the streams."""

    def __init__(self, dim: int, num_streams: int = 4, sinkhorn_iters: int = 20,
                 sinkhorn_tau: float = 1.0, layer_idx: int = 0, *, slot: int = 0,
                 alpha_init: float = 0.01,
                 alpha_learnable: bool = True, proj_init_std: float = 0.0,
                 res_diag_logit: float = 3.0, res_offdiag_logit: float = 0.0,
                 pre_init: str = "cycle", gate_init: float = 0.5, gate_noise: float = 0.0,
                 sinkhorn_recompute: bool = True, fused_kernels: bool = False):
        super().__init__()
        n = num_streams
        self.dim, self.num_streams, self.layer_idx, self.slot = dim, n, layer_idx, slot
        self.sinkhorn_iters, self.sinkhorn_tau = sinkhorn_iters, sinkhorn_tau
        self.sinkhorn_recompute = sinkhorn_recompute
        # Triton kernels (nanochat/kernels); they fall back to the reference where they cannot run
        self.fused_kernels = fused_kernels
        self.init_args = dict(alpha_init=alpha_init, proj_init_std=proj_init_std,
                              res_diag_logit=res_diag_logit, res_offdiag_logit=res_offdiag_logit,
                              pre_init=pre_init, gate_init=gate_init)
        self.gate_noise = gate_noise
        # packed projection phi: [res (n*n) | pre (n) | post (n)]
        self.proj = nn.Linear(n * dim, n * n + 2 * n, bias=False)
        if alpha_learnable:
            self.alpha = nn.Parameter(torch.empty(3))  # scales of the res, pre, post dynamic terms
        else:
            self.register_buffer("alpha", torch.empty(3))
        self.res_base = nn.Parameter(torch.empty(n, n))
        self.pre_base = nn.Parameter(torch.empty(n))
        self.post_base = nn.Parameter(torch.empty(n))
        self.gate = nn.Parameter(torch.empty(()))  # a logit: g = sigmoid(gate)
        self.capture = False  # when True, forward keeps the last matrices in self.captured
        self.captured = None

    @torch.no_grad()
    def init_weights(self):
        a = self.init_args
        n = self.num_streams
        if a["proj_init_std"] > 0:
            nn.init.normal_(self.proj.weight, std=a["proj_init_std"])
        else:
            # unit-variance outputs for unit-RMS inputs; alpha (0.01) then sets the dynamic scale
            bound = math.sqrt(3.0 / (n * self.dim))
            nn.init.uniform_(self.proj.weight, -bound, bound)
        self.alpha.fill_(a["alpha_init"])
        self.res_base.fill_(a["res_offdiag_logit"])
        self.res_base.diagonal().fill_(a["res_diag_logit"])
        if a["pre_init"] == "cycle":
            # Sublayer s reads mainly stream s mod n (the Hyper-Connections paper's init, softened
            # to sigmoid 0.88 / 0.12). Streams read unequally get unequal gradients; with equal
            # reads (and the sum reduce) every stream gets the same gradient, and that gradient
            # is orthogonal to the doubly stochastic tangent space: H_res would not train.
            self.pre_base.fill_(-2.0)
            self.pre_base[self.slot % n] = 2.0
        elif a["pre_init"] == "uniform":
            self.pre_base.fill_(math.log(1.0 / (n - 1)) if n > 1 else 10.0)  # sigmoid = 1/n
        elif a["pre_init"] == "first":
            self.pre_base.fill_(-8.0)
            self.pre_base[0] = 0.0
        else:
            raise ValueError(f"mhc_pre_init={a['pre_init']!r} is not 'cycle', 'uniform' or 'first'")
        self.post_base.zero_()  # H_post = 2 * sigmoid(0) = 1: every stream gets the branch output
        self.gate.fill_(gate_to_logit(a["gate_init"]))

    def set_gate(self, value: float):
        """Set this sublayer's gate g in [0, 1] (stored as its logit; 0 and 1 are exact)."""
        with torch.no_grad():
            self.gate.fill_(gate_to_logit(float(value)))

    def gate_value(self) -> float:
        return torch.sigmoid(self.gate.detach().float()).item()

    def _gate(self, gate: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """The gate as [B or 1, 1, 1, 1] fp32: a per-sample override, else sigmoid(parameter)."""
        if gate is not None:
            return gate.to(device=device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        g = torch.sigmoid(self.gate.float()).reshape(1, 1, 1, 1)
        if self.training and self.gate_noise > 0:
            noise = 1.0 + self.gate_noise * (2.0 * torch.rand(batch, 1, 1, 1, device=device) - 1.0)
            g = (g * noise).clamp(0.0, 1.0)  # clamp keeps H_res doubly stochastic
        return g

    def get_matrices(self, x: torch.Tensor, gate: torch.Tensor | None = None):
        """x: [B, T, n, C] -> H_res [B, T, n, n], H_pre [B, T, n], H_post [B, T, n], all fp32."""
        B, T, n, C = x.shape
        flat = F.rms_norm(x.reshape(B, T, n * C), (n * C,))
        coeffs = self.proj(flat).float()
        alpha = self.alpha.float()
        res_logits = self.res_base.float() + alpha[0] * coeffs[..., : n * n].reshape(B, T, n, n)
        h_pre = torch.sigmoid(self.pre_base.float() + alpha[1] * coeffs[..., n * n: n * n + n])
        h_post = 2.0 * torch.sigmoid(self.post_base.float() + alpha[2] * coeffs[..., n * n + n:])
        h_res = sinkhorn_log(res_logits, self.sinkhorn_iters, self.sinkhorn_tau,
                             recompute=self.sinkhorn_recompute)
        g = self._gate(gate, B, x.device)
        eye = torch.eye(n, device=x.device, dtype=torch.float32)
        h_res = (1.0 - g) * eye + g * h_res
        return h_res, h_pre, h_post

    def forward(self, x: torch.Tensor, branch_fn, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, n, C]; branch_fn maps [B, T, C] -> [B, T, C]; returns the new [B, T, n, C]."""
        if self.fused_kernels and not self.capture:
            from nanochat.kernels import fused_mhc_forward  # lazy: keeps kernels optional
            return fused_mhc_forward(self, x, branch_fn, gate)
        h_res, h_pre, h_post = self.get_matrices(x, gate)
        if self.capture:
            self.captured = (h_res.detach(), h_pre.detach(), h_post.detach())
        y = branch_fn(collapse_streams(h_pre, x))
        return residual_streams(x, h_res, h_post, y)
