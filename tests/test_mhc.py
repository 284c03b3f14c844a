"""Dynamic mHC: Sinkhorn, the gate, conventions, and the known traps of the PRD's sketch."""

import math

import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.mhc import MHC_PRESETS, DynamicMHC, apply_mhc_preset, sinkhorn_log


def make_mhc(dim=16, n=4, **kwargs):
    m = DynamicMHC(dim, num_streams=n, **kwargs)
    m.init_weights()
    return m


def prd_kwargs():
    p = MHC_PRESETS["prd"]
    return dict(sinkhorn_iters=p["mhc_sinkhorn_iters"], sinkhorn_tau=p["mhc_sinkhorn_tau"],
                alpha_init=p["mhc_alpha_init"], alpha_learnable=p["mhc_alpha_learnable"],
                proj_init_std=p["mhc_proj_init_std"], res_diag_logit=p["mhc_res_diag_logit"],
                res_offdiag_logit=p["mhc_res_offdiag_logit"], pre_init=p["mhc_pre_init"],
                gate_init=p["mhc_gate_init"], gate_noise=p["mhc_gate_noise"])


# ---------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("diag,scale", [(3.0, 0.01), (3.0, 0.1), (0.0, 0.3)])
def test_sinkhorn_doubly_stochastic_under_bf16_autocast(diag, scale):
    # the model's logits: the diagonal base (3 by default) plus alpha (0.01) times a unit-scale
    # dynamic term; 0.1 allows alpha to grow tenfold. (Farther out, 20 iterations converge more
    # slowly: docs/mhc.md gives the measured row error.)
    logits = (diag * torch.eye(4) + torch.randn(512, 8, 4, 4) * scale).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = sinkhorn_log(logits, num_iters=20, tau=1.0)
    assert h.dtype == torch.float32
    assert (h >= 0).all()
    assert (h.sum(-1) - 1).abs().max() < 1e-3
    assert (h.sum(-2) - 1).abs().max() < 1e-3


def test_sinkhorn_recompute_backward_matches_autograd():
    logits = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4)
    sinkhorn_log(logits, 20, 0.5, recompute=True).mul(weight).sum().backward()
    fast = logits.grad.clone()
    logits.grad = None
    sinkhorn_log(logits, 20, 0.5, recompute=False).mul(weight).sum().backward()
    assert torch.allclose(fast, logits.grad.float().to(fast.dtype), atol=1e-6)
    assert fast.abs().max() > 1e-3  # a real, non-zero gradient


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        sinkhorn_log(torch.zeros(2, 2), 5, 0.0)
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_log(torch.zeros(2, 2), 0, 1.0)


# ---------------------------------------------------------------- trap 1: PRD's underflow
def test_prd_literal_values_freeze_h_res_at_identity():
    m = make_mhc(**prd_kwargs())
    m.train(False)
    x = torch.randn(2, 5, 4, 16)
    h_res, _, _ = m.get_matrices(x)
    off = ~torch.eye(4, dtype=torch.bool)
    assert (h_res[..., off] == 0).all(), "exp(-160) underflows: H_res is exactly I"
    out = m(x, lambda u: u * 0.5)
    out.square().sum().backward()
    assert (m.res_base.grad[off] == 0).all(), "off-diagonal logits get exactly zero gradient"


def test_default_h_res_off_diagonal_gets_gradient():
    m = make_mhc()
    x = torch.randn(2, 5, 4, 16)
    out = m(x, lambda u: u * 0.5)
    out.square().sum().backward()
    off = ~torch.eye(4, dtype=torch.bool)
    assert (m.res_base.grad[off].abs() > 0).all()
    h_res, _, _ = m.get_matrices(x)
    assert h_res[..., off].min() > 1e-3  # not the identity


# ---------------------------------------------------------------- trap 2: symmetric streams
def _res_base_grads(pre_init, zero_stream_embed):
    """H_res base gradient per sublayer of a d2 model whose zero-initialised output projections
    were given weights (as after the first optimiser step: at step 0 no block weight but c_proj
    has a gradient, mHC or not)."""
    cfg = GPTConfig.from_depth(2, vocab_size=64, sequence_len=16, mhc_enabled=True,
                               mhc_pre_init=pre_init)
    model = build_model(cfg, "cpu", seed=0)
    with torch.no_grad():
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
        if zero_stream_embed:
            model.stream_embed.zero_()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx).backward()
    return torch.tensor([m.res_base.grad.norm().item() for m in model.mhc_modules()])


def test_stream_embed_and_cycled_h_pre_give_h_res_gradient_in_full_model():
    healthy = _res_base_grads("cycle", zero_stream_embed=False)
    identical_streams = _res_base_grads("cycle", zero_stream_embed=True)
    equal_reads = _res_base_grads("uniform", zero_stream_embed=False)
    first = slice(0, 3)  # every sublayer but the last
    assert (healthy[first] > 1e-7).all()
    assert (healthy[first] > 30 * identical_streams[first]).all()
    assert (healthy[first] > 30 * equal_reads[first]).all()
    # The last sublayer's H_res cannot matter: columns sum to 1, so the stream sum before the
    # head is unchanged by it (docs/mhc.md). Its gradient is numerically zero.
    assert healthy[-1] < 1e-3 * healthy[0]


# ---------------------------------------------------------------- trap 3: gate stays in [0, 1]
def test_gate_noise_is_clamped_so_h_res_stays_doubly_stochastic():
    m = make_mhc(gate_init=0.97, gate_noise=0.5)
    m.train()
    x = torch.randn(256, 3, 4, 16)
    h_res, _, _ = m.get_matrices(x)
    assert (h_res >= -1e-7).all()
    assert (h_res.sum(-1) - 1).abs().max() < 1e-3
    assert (h_res.sum(-2) - 1).abs().max() < 1e-3
    g = m._gate(None, 10_000, x.device)
    assert g.min() >= 0 and g.max() <= 1 and (g == 1).any()


def test_gate_values_outside_unit_interval_are_rejected():
    m = make_mhc()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            m.set_gate(bad)


# ---------------------------------------------------------------- trap 5: H_res really applied
def test_gate_zero_gives_exact_identity_and_perturbing_h_res_changes_output():
    m = make_mhc()
    x = torch.randn(2, 5, 4, 16)
    m.set_gate(0.0)
    h_res, _, _ = m.get_matrices(x)
    assert torch.equal(h_res, torch.eye(4).expand_as(h_res))
    m.set_gate(1.0)
    branch = lambda u: torch.tanh(u)  # noqa: E731
    before = m(x, branch)
    with torch.no_grad():
        m.res_base[0, 1] += 2.0
    after = m(x, branch)
    assert (before - after).abs().max() > 1e-3


# ---------------------------------------------------------------- trap 6: transpose convention
def test_h_res_row_i_says_what_output_stream_i_reads():
    n, dim = 4, 8
    m = make_mhc(dim=dim, n=n, alpha_init=0.0, gate_init=1.0)
    perm = [2, 0, 3, 1]  # output stream i should read input stream perm[i]
    with torch.no_grad():
        m.res_base.fill_(-30.0)
        for i, j in enumerate(perm):
            m.res_base[i, j] = 30.0
    x = torch.randn(1, 3, n, dim)
    out = m(x, lambda u: torch.zeros_like(u))
    for i, j in enumerate(perm):
        assert torch.allclose(out[:, :, i], x[:, :, j], atol=1e-5)


def test_h_pre_and_h_post_conventions():
    n, dim = 4, 8
    m = make_mhc(dim=dim, n=n, alpha_init=0.0, gate_init=0.0)
    x = torch.randn(1, 2, n, dim)
    seen = {}

    def branch(u):
        seen["u"] = u
        return torch.ones_like(u)

    out = m(x, branch)
    _, h_pre, h_post = m.get_matrices(x)
    assert torch.allclose(seen["u"], torch.einsum("btn,btnc->btc", h_pre, x), atol=1e-6)
    main = torch.sigmoid(torch.tensor(2.0))  # default 'cycle' init: slot 0 reads stream 0 mainly
    assert torch.allclose(h_pre[..., 0], main.expand_as(h_pre[..., 0]))
    assert torch.allclose(h_pre[..., 1:], (1 - main).expand_as(h_pre[..., 1:]))
    assert torch.allclose(out - x, h_post.unsqueeze(-1).expand_as(out), atol=1e-6)
    assert torch.allclose(h_post, torch.ones_like(h_post))


# ---------------------------------------------------------------- presets
def test_presets_apply_and_unknown_preset_is_a_clear_error():
    kw = apply_mhc_preset({"mhc_enabled": True}, "prd")
    assert kw["mhc_sinkhorn_tau"] == 0.05 and kw["mhc_enabled"]
    assert apply_mhc_preset({"a": 1}, None) == {"a": 1}
    cfg = GPTConfig.from_depth(1, vocab_size=32, sequence_len=8, mhc_enabled=True,
                               **MHC_PRESETS["paper"])
    assert cfg.mhc_sinkhorn_tau == 1.0
    with pytest.raises(ValueError, match="unknown --mhc_preset 'nope'"):
        apply_mhc_preset({}, "nope")


def test_prd_gate_starts_at_sigmoid_one():
    m = make_mhc(**prd_kwargs())
    assert math.isclose(m.gate_value(), 1 / (1 + math.exp(-1)), rel_tol=1e-6)


# ---------------------------------------------------------------- torch.compile
class DeepIR:
    """Stands in for an Inductor IR node whose str() would print its whole producer tree."""

    def __init__(self, producer=None):
        self.producer = producer

    def get_size(self):
        return [8, 4, 48]

    def get_dtype(self):
        return torch.float32

    def __str__(self):
        raise AssertionError("str() of an IR argument is the exponential path that hung compile")


def test_inductor_operator_str_is_bounded_and_never_prints_ir():
    from torch._inductor import exc

    from nanochat.mhc import bound_inductor_operator_str
    bound_inductor_operator_str()
    bound_inductor_operator_str()  # idempotent
    deep = DeepIR()
    for _ in range(40):
        deep = DeepIR(deep)
    args = [deep, [deep, None, 3], torch.zeros(2, 3, dtype=torch.bfloat16), 20, 1.0, True, object()]
    text = exc.OperatorIssue.operator_str("nanochat::mhc_boundary", args, {"num_iters": 20})
    assert "target: nanochat::mhc_boundary" in text
    assert "args[0]: DeepIR(torch.float32, [8, 4, 48])" in text
    assert "args[1]: [DeepIR(torch.float32, [8, 4, 48]), None, 3]" in text
    assert "Tensor(torch.bfloat16, (2, 3))" in text and "args[6]: object" in text and "num_iters" in text
    # Inductor's own missing-operator error builds its message with the same function
    assert "DeepIR(torch.float32" in str(exc.MissingOperatorWithoutDecomp("nanochat::x", [deep], {}))


def test_stream_dtype_option_is_checked_and_applies_only_under_autocast():
    with pytest.raises(ValueError, match="mhc_stream_dtype='float16' must be 'float32' or 'bfloat16'"):
        GPTConfig.from_depth(1, vocab_size=32, sequence_len=8, mhc_enabled=True, mhc_stream_dtype="float16")
    cfg = GPTConfig.from_depth(1, vocab_size=32, sequence_len=8, mhc_enabled=True, mhc_stream_dtype="bfloat16")
    model = build_model(cfg, "cpu", seed=0)
    idx = torch.randint(0, 32, (2, 8))
    assert model.hidden_states(idx).dtype == torch.float32  # no autocast: the fp32 weights need fp32 streams
    seen = []
    hook = model.transformer.h[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx).backward()
    hook.remove()
    assert seen == [torch.bfloat16]  # the streams entering the first block
