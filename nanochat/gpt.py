"""The GPT: nanochat-style, with optional Dynamic mHC (nanochat/mhc.py) around every sublayer.

- rotary position embeddings, QK-norm, parameter-free RMSNorm pre-norm, ReLU^2 MLP, no biases
- untied token embedding and head, logit soft-capping, optional grouped-query attention, SDPA
- one dial: GPTConfig.from_depth(depth) sets width 64*depth and heads of dim 128 (64 if 128 does
  not divide), every size overridable
- built on the meta device and initialised by one init_weights() that states every init

mHC: the embedding is replicated into n streams plus a learnable per-stream offset
(stream_embed, which breaks the symmetry that would otherwise give H_res zero gradient), each
sublayer is wrapped by DynamicMHC, and the streams are summed before the final norm and head.

Gate slots (docs/mhc.md): 'global' = 1 value for all sublayers; 'per_layer' = L values, one per
block for both its sublayers; 'per_sublayer' = 2L values ordered block 0 attention, block 0 MLP,
block 1 attention, ... A gate g in [0, 1] is sigmoid(gate parameter); a per-sample tensor
mhc_gates [B, slots] passed to forward() replaces the parameters for that pass only.

Options (GPTConfig, all off by default, so the default model is unchanged): MoE feed-forwards
(nanochat/moe.py; the trainer adds model.aux_loss()), mlp_activation, norm_type 'layernorm'
(learnable affine + bias at every norm site: embedding, pre-attention, pre-MLP, final; QK-norm
stays parameter-free), learned absolute positions, biases, tied embeddings, factorised embeddings
and depth gating. docs/presets.md says which seed system uses which.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.mhc import DynamicMHC
from nanochat.moe import ACTIVATIONS, FeedForward, MoEFeedForward


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    logit_softcap: float = 15.0
    rope_base: float = 10000.0
    # Dynamic mHC. Defaults are the project's own (docs/mhc.md); --mhc_preset prd|paper swap them.
    mhc_enabled: bool = False
    mhc_num_streams: int = 4
    mhc_sinkhorn_iters: int = 20
    mhc_sinkhorn_tau: float = 1.0
    mhc_alpha_init: float = 0.01
    mhc_alpha_learnable: bool = True
    mhc_proj_init_std: float = 0.0  # 0: uniform with unit output variance (then scaled by alpha)
    mhc_res_diag_logit: float = 3.0  # H_res starts at diag ~0.87 (n=4): near I, gradients alive
    mhc_res_offdiag_logit: float = 0.0
    mhc_pre_init: str = "cycle"  # sublayer s reads mainly stream s mod n; 'uniform'; 'first' (PRD)
    mhc_gate_init: float = 0.5
    mhc_gate_noise: float = 0.0  # training only: g *= U[1-a, 1+a], then clamped to [0, 1]
    mhc_stream_embed_std: float = 0.1
    mhc_fused_kernels: bool = False  # Triton kernels for the mHC bookkeeping (docs/kernels.md)
    # 'bfloat16': under autocast the n streams are kept in bf16 (half the bytes the mHC ops move;
    # each residual update rounds to bf16); 'float32': the activations' dtype, as the baseline's residual
    mhc_stream_dtype: str = "float32"
    # Block and embedding options (docs/presets.md); the defaults are the nanochat model above.
    mlp_activation: str = "relu2"  # 'relu2' | 'relu' | 'gelu' | 'swiglu' (hidden = mlp_ratio * n_embd)
    norm_type: str = "rms"  # 'rms' (parameter-free) | 'layernorm' (learnable weight and bias)
    pos_embedding: str = "rope"  # 'rope' | 'learned' (absolute, sequence_len rows, no rotary)
    bias: bool = False  # biases in the attention and MLP / expert linears (never router, lm_head)
    tie_embeddings: bool = False  # lm_head shares the token embedding's storage
    embedding_dim: int = 0  # 0: n_embd; else embed at this width and project up (factorised)
    depth_gating: bool = False  # learned per-block scale (init 1) on each branch output
    # Mixture of experts (nanochat/moe.py); moe_num_experts = 0 is the dense MLP
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_expert_hidden: int = 0  # 0: mlp_ratio * n_embd per expert; else e.g. that / E (fine-grained)
    moe_shared_experts: int = 0  # always-on experts of the same width
    moe_activation: str = "relu2"
    moe_noisy_gating: bool = False  # learned noise scale, training only
    moe_lb_coef: float = 0.01  # Switch load balancing (1.0 when balanced)
    moe_z_coef: float = 0.0  # router z-loss
    moe_entropy_coef: float = 0.0  # router entropy penalty (seed 000's lambda_ent_moe)
    moe_capacity_factor: float = 0.0  # 0: dropless; c > 0: ceil(c * N * k / E) per expert in training

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "GPTConfig":
        """The one dial: width 64*depth, head dim 128 where it divides (else 64)."""
        if depth < 1:
            raise ValueError(f"--depth {depth} must be >= 1")
        n_embd = overrides.pop("n_embd", None) or 64 * depth
        head_dim = 128 if n_embd % 128 == 0 else 64
        n_head = overrides.pop("n_head", None) or max(1, n_embd // head_dim)
        n_kv_head = overrides.pop("n_kv_head", None) or n_head
        cfg = cls(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, **overrides)
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}: checkpoint from a newer version?")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        need(self.n_embd % self.n_head == 0,
             f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a multiple of {self.n_head}")
        need(self.pos_embedding in ("rope", "learned"),
             f"pos_embedding={self.pos_embedding!r} must be 'rope' or 'learned'")
        need(self.pos_embedding != "rope" or (self.n_embd // self.n_head) % 2 == 0,
             f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for rotary embeddings")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; pick a divisor of n_head")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(self.logit_softcap >= 0, f"logit_softcap={self.logit_softcap} must be >= 0 (0 disables)")
        need(self.mhc_num_streams >= 1,
             f"mhc_num_streams={self.mhc_num_streams} must be >= 1 (4 is the paper's choice)")
        need(self.mhc_sinkhorn_iters >= 1,
             f"mhc_sinkhorn_iters={self.mhc_sinkhorn_iters} must be >= 1 (20 is the default)")
        need(self.mhc_sinkhorn_tau > 0,
             f"mhc_sinkhorn_tau={self.mhc_sinkhorn_tau} must be > 0 (1.0 is the default)")
        need(0.0 <= self.mhc_gate_init <= 1.0,
             f"mhc_gate_init={self.mhc_gate_init} must be in [0, 1]: it is a gate value, not a logit")
        need(0.0 <= self.mhc_gate_noise < 1.0, f"mhc_gate_noise={self.mhc_gate_noise} must be in [0, 1)")
        need(self.mhc_stream_dtype in ("float32", "bfloat16"),
             f"mhc_stream_dtype={self.mhc_stream_dtype!r} must be 'float32' or 'bfloat16'")
        need(self.mhc_pre_init in ("cycle", "uniform", "first"),
             f"mhc_pre_init={self.mhc_pre_init!r} must be 'cycle', 'uniform' or 'first'")
        need(self.mlp_activation in ACTIVATIONS,
             f"mlp_activation={self.mlp_activation!r} must be one of {ACTIVATIONS}")
        need(self.norm_type in ("rms", "layernorm"), f"norm_type={self.norm_type!r} must be 'rms' or 'layernorm'")
        need(self.embedding_dim >= 0,
             f"embedding_dim={self.embedding_dim} must be >= 0 (0: embed at n_embd; 128 is seed 001's)")
        need(self.moe_num_experts >= 0, f"moe_num_experts={self.moe_num_experts} must be >= 0 (0: dense MLP)")
        if self.moe_num_experts > 0:
            need(1 <= self.moe_top_k <= self.moe_num_experts,
                 f"moe_top_k={self.moe_top_k} must be in [1, moe_num_experts={self.moe_num_experts}]")
            need(self.moe_activation in ACTIVATIONS,
                 f"moe_activation={self.moe_activation!r} must be one of {ACTIVATIONS}")
            need(self.moe_expert_hidden >= 0, f"moe_expert_hidden={self.moe_expert_hidden} must be >= 0 "
                 f"(0: full width mlp_ratio * n_embd; fine-grained: that / moe_num_experts)")
            need(self.moe_shared_experts >= 0, f"moe_shared_experts={self.moe_shared_experts} must be >= 0")
            for name in ("moe_lb_coef", "moe_z_coef", "moe_entropy_coef", "moe_capacity_factor"):
                need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_gate_slots(self) -> int:
        return 2 * self.n_layer


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))  # parameter-free


class ParameterFreeRMSNorm(nn.Module):
    """norm() as a module, so that every norm site can be swapped for a LayerNorm by config."""

    def forward(self, x):
        return norm(x)


def make_norm(config: "GPTConfig") -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.n_embd, elementwise_affine=True, bias=True)
    return ParameterFreeRMSNorm()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B or 1, T, 1, D/2]. Rotates the two halves of each head."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


class KVCache:
    """Static key/value cache for incremental decoding, shared by all layers.

    Rows may be left-padded (pad_lengths[b] slots hold no real token): their rotary positions
    start at 0 on the first real token and padded keys are masked, so a row gets the same
    result as it would alone."""

    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_len: int, device, dtype, pad_lengths: torch.Tensor | None = None):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        if pad_lengths is None:
            pad_lengths = torch.zeros(batch_size, dtype=torch.long)
        self.pad = pad_lengths.to(device=device, dtype=torch.long)
        self.has_padding = bool((self.pad > 0).any())

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def positions(self, T: int) -> torch.Tensor:
        """Rotary positions [B, T] of the next T tokens."""
        idx = torch.arange(self.pos, self.pos + T, device=self.pad.device)
        return (idx[None, :] - self.pad[:, None]).clamp(min=0)

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """[B, 1, T, S] boolean mask for the next T queries, or None when plain causal suffices."""
        if not self.has_padding and (T == 1 or self.pos == 0):
            return None
        S = self.pos + T
        keys = torch.arange(S, device=self.pad.device)
        queries = torch.arange(self.pos, S, device=self.pad.device)
        causal = keys[None, :] <= queries[:, None]  # [T, S]
        real = keys[None, :] >= self.pad[:, None]  # [B, S]
        # a padding query sees itself, so no softmax row is empty (an empty row gives NaN)
        own = keys[None, :] == queries[:, None]
        return ((causal[None] & real[:, None, :]) | own[None])[:, None]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, H, T, D] at the current position; return all keys and values so far."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots is full (at {self.pos}, adding {T})")
        self.k[layer_idx, :, :, self.pos:self.pos + T] = k
        self.v[layer_idx, :, :, self.pos:self.pos + T] = v
        return self.k[layer_idx, :, :, :self.pos + T], self.v[layer_idx, :, :, :self.pos + T]

    def advance(self, T: int):
        self.pos += T

    def select_rows(self, rows: torch.Tensor):
        """Keep only these batch rows (finished rows stop costing compute)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.pad = self.pad[rows]
        self.has_padding = bool((self.pad > 0).any())


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, cos_sin, kv_cache: KVCache | None, attn_mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if cos_sin is None:  # learned absolute positions: already in the residual stream
            q, k = norm(q), norm(k)
        else:
            cos, sin = cos_sin
            q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               enable_gqa=gqa)
        else:
            # without a cache, or prefill from position 0, or one decode token: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=(T > 1), dropout_p=dropout_p,
                                               enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(FeedForward):
    """The dense MLP: hidden mlp_ratio * n_embd, activation config.mlp_activation (ReLU^2 default)."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.n_embd, int(config.mlp_ratio * config.n_embd), config.mlp_activation,
                         config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MoEFeedForward(config) if config.moe_num_experts > 0 else MLP(config)
        self.norm_attn, self.norm_mlp = make_norm(config), make_norm(config)
        self.depth_gating = config.depth_gating
        if self.depth_gating:
            # seed 000's depth gating: one learned scale per block on both branch outputs (inside
            # mHC it scales F(u) before H_post spreads it over the streams); init 1 = no gating
            self.depth_gate = nn.Parameter(torch.empty(()))
        self.dropout = nn.Dropout(config.dropout)
        self.mhc_enabled = config.mhc_enabled
        if self.mhc_enabled:
            kwargs = dict(dim=config.n_embd, num_streams=config.mhc_num_streams,
                          sinkhorn_iters=config.mhc_sinkhorn_iters, sinkhorn_tau=config.mhc_sinkhorn_tau,
                          layer_idx=layer_idx, alpha_init=config.mhc_alpha_init,
                          alpha_learnable=config.mhc_alpha_learnable,
                          proj_init_std=config.mhc_proj_init_std,
                          res_diag_logit=config.mhc_res_diag_logit,
                          res_offdiag_logit=config.mhc_res_offdiag_logit,
                          pre_init=config.mhc_pre_init, gate_init=config.mhc_gate_init,
                          gate_noise=config.mhc_gate_noise,
                          fused_kernels=config.mhc_fused_kernels)
            self.mhc_attn = DynamicMHC(slot=2 * layer_idx, **kwargs)
            self.mhc_mlp = DynamicMHC(slot=2 * layer_idx + 1, **kwargs)

    def branch_fns(self, cos_sin, kv_cache=None, attn_mask=None):
        """(attention branch, MLP branch): [B, T, C] -> [B, T, C] each, pre-norm included (what
        mHC wraps; nanochat/kernels/mhc_stack.py runs them between its fused ops)."""
        def attn_branch(u):
            return self._gated(self.dropout(self.attn(self.norm_attn(u), cos_sin, kv_cache, attn_mask)))

        def mlp_branch(u):
            return self._gated(self.dropout(self.mlp(self.norm_mlp(u))))

        return attn_branch, mlp_branch

    def forward(self, x, cos_sin, kv_cache=None, attn_mask=None, gates=None):
        """x: [B, T, C] (plain) or [B, T, n, C] (mHC); gates: None or [B, 2] (attention, MLP)."""
        attn_branch, mlp_branch = self.branch_fns(cos_sin, kv_cache, attn_mask)
        if not self.mhc_enabled:
            x = x + attn_branch(x)
            return x + mlp_branch(x)
        x = self.mhc_attn(x, attn_branch, gate=None if gates is None else gates[:, 0])
        return self.mhc_mlp(x, mlp_branch, gate=None if gates is None else gates[:, 1])

    def _gated(self, y):
        return y * self.depth_gate if self.depth_gating else y


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    return ((vocab_size + multiple - 1) // multiple) * multiple


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.padded_vocab = padded_vocab_size(config.vocab_size)  # tensor-core friendly rows
        emb_dim = config.embedding_dim or config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab, emb_dim),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        if config.pos_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.sequence_len, config.n_embd)
        if config.embedding_dim:  # factorised (seed 001): embed at embedding_dim, project up
            self.embed_proj = nn.Linear(emb_dim, config.n_embd, bias=False)
        self.norm_emb, self.norm_final = make_norm(config), make_norm(config)
        head_dim_in = config.n_embd
        if config.tie_embeddings and config.embedding_dim:
            # tying needs the head at embedding_dim: project down first (ALBERT-style)
            self.head_proj = nn.Linear(config.n_embd, emb_dim, bias=False)
            head_dim_in = emb_dim
        self.lm_head = nn.Linear(head_dim_in, self.padded_vocab, bias=False)
        self._tie_embeddings()
        if config.mhc_enabled:
            self.stream_embed = nn.Parameter(torch.empty(config.mhc_num_streams, config.n_embd))
        # rotary tables for 10x the training context, so generation can run past it
        self.rotary_len = config.sequence_len * 10
        self.register_buffer("cos", torch.empty(self.rotary_len, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(self.rotary_len, config.head_dim // 2), persistent=False)
        self.activation_checkpointing = False

    @torch.no_grad()
    def init_weights(self):
        """Every parameter and buffer's initialisation, in one place (meta-device friendly)."""
        cfg = self.config
        self._tie_embeddings()  # to_empty() from the meta device gives each module its own copy
        # Tied: the table is also the output layer, so it gets a small (GPT-2) std; the input side
        # does not care, the embedding is normalised before the first block.
        wte_std = 0.02 if cfg.tie_embeddings else 1.0
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=wte_std)
        if not cfg.tie_embeddings:
            torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0) * cfg.n_embd ** -0.5  # uniform with std 1/sqrt(fan_in)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                torch.nn.init.uniform_(lin.weight, -bound, bound)
            block.mlp.init_weights(bound)  # inputs uniform like q, k, v; output projection zero
            # output projections start at zero: each block starts as the identity
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj):
                if lin.bias is not None:
                    torch.nn.init.zeros_(lin.bias)
            if cfg.norm_type == "layernorm":
                for ln in (block.norm_attn, block.norm_mlp):
                    torch.nn.init.ones_(ln.weight)
                    torch.nn.init.zeros_(ln.bias)
            if cfg.depth_gating:
                block.depth_gate.fill_(1.0)  # identity: the model starts as without gating
            if cfg.mhc_enabled:
                block.mhc_attn.init_weights()
                block.mhc_mlp.init_weights()
        if cfg.mhc_enabled:
            torch.nn.init.normal_(self.stream_embed, mean=0.0, std=cfg.mhc_stream_embed_std)
        if cfg.pos_embedding == "learned":
            # half the token embedding's std: GPT-2's ratio (0.01 vs 0.02)
            torch.nn.init.normal_(self.transformer.wpe.weight, mean=0.0, std=0.5 * wte_std)
        if cfg.embedding_dim:
            # std 1/sqrt(embedding_dim): the projected embedding keeps the table's scale
            b = math.sqrt(3.0) * cfg.embedding_dim ** -0.5
            torch.nn.init.uniform_(self.embed_proj.weight, -b, b)
            if cfg.tie_embeddings:
                torch.nn.init.uniform_(self.head_proj.weight, -bound, bound)
        if cfg.norm_type == "layernorm":
            for ln in (self.norm_emb, self.norm_final):
                torch.nn.init.ones_(ln.weight)
                torch.nn.init.zeros_(ln.bias)
        self._init_rotary()

    def _tie_embeddings(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def _init_rotary(self):
        if self.config.pos_embedding != "rope":  # unused; zeros keep the buffers finite
            self.cos.zero_()
            self.sin.zero_()
            return
        d = self.config.head_dim
        device = self.cos.device
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        t = torch.arange(self.rotary_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    # ---------------------------------------------------------------- mHC gates
    def mhc_modules(self) -> list[DynamicMHC]:
        """All DynamicMHC modules in slot order: block 0 attention, block 0 MLP, block 1 attention..."""
        if not self.config.mhc_enabled:
            return []
        return [m for b in self.transformer.h for m in (b.mhc_attn, b.mhc_mlp)]

    def _require_mhc(self):
        if not self.config.mhc_enabled:
            raise ValueError("this model has no mHC (mhc_enabled=False): there are no gates to set")

    def set_mhc_gate(self, value: float):
        """One gate value in [0, 1] for every sublayer."""
        self._require_mhc()
        for m in self.mhc_modules():
            m.set_gate(value)

    def set_mhc_gates_per_layer(self, values):
        """L values: values[i] for both sublayers of block i."""
        self._require_mhc()
        values = [float(v) for v in values]
        if len(values) != self.config.n_layer:
            raise ValueError(f"per-layer gates need {self.config.n_layer} values, got {len(values)}")
        for i, block in enumerate(self.transformer.h):
            block.mhc_attn.set_gate(values[i])
            block.mhc_mlp.set_gate(values[i])

    def set_mhc_gates_per_sublayer(self, values):
        """2L values ordered block 0 attention, block 0 MLP, block 1 attention, ..."""
        self._require_mhc()
        values = [float(v) for v in values]
        if len(values) != self.config.num_gate_slots:
            raise ValueError(f"per-sublayer gates need {self.config.num_gate_slots} values, got {len(values)}")
        for m, v in zip(self.mhc_modules(), values):
            m.set_gate(v)

    def get_mhc_gates(self) -> list[float]:
        """Current gate values g = sigmoid(parameter), 2L of them in slot order."""
        return [m.gate_value() for m in self.mhc_modules()]

    def expand_mhc_gates(self, gates: torch.Tensor) -> torch.Tensor:
        """[B, 1 | L | 2L] gate values -> [B, 2L] in per-sublayer slot order."""
        self._require_mhc()
        L = self.config.n_layer
        if gates.dim() != 2 or gates.shape[1] not in (1, L, 2 * L):
            raise ValueError(f"mhc_gates must be [batch, 1 | {L} | {2 * L}] (global, per_layer, "
                             f"per_sublayer), got {tuple(gates.shape)}")
        if gates.shape[1] == 1:
            return gates.expand(-1, 2 * L)
        if gates.shape[1] == L:
            return gates.repeat_interleave(2, dim=1)
        return gates

    # ---------------------------------------------------------------- forward
    def _rotary(self, B: int, T: int, kv_cache: KVCache | None):
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
            return self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        pos = kv_cache.positions(T)  # [B, T]
        if kv_cache.pos + T > self.rotary_len:
            raise ValueError(f"position {kv_cache.pos + T} exceeds the rotary table ({self.rotary_len})")
        return self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                      mhc_gates: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, C] after the stream reduce and final norm."""
        B, T = idx.shape
        cos_sin = None  # learned positions: no rotary
        if self.config.pos_embedding == "rope":
            cos, sin = self._rotary(B, T, kv_cache)
            dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else None
            if dtype is not None:
                cos, sin = cos.to(dtype), sin.to(dtype)
            cos_sin = (cos, sin)
        attn_mask = kv_cache.attention_mask(T) if kv_cache is not None else None
        x = self._embed(idx, kv_cache)
        gate_cols = None
        if self.config.mhc_enabled:
            x = x.unsqueeze(-2) + self.stream_embed.to(x.dtype)  # expand: [B, T, n, C]
            if self.config.mhc_stream_dtype == "bfloat16" and torch.is_autocast_enabled(idx.device.type):
                x = x.to(torch.bfloat16)  # only under autocast: the branches' fp32 weights need it
            if mhc_gates is not None:
                gate_cols = self.expand_mhc_gates(mhc_gates)
        elif mhc_gates is not None:
            self._require_mhc()
        checkpointing = self.activation_checkpointing and self.training
        if self.config.mhc_enabled and self.config.mhc_fused_kernels and not checkpointing:
            # the whole stack on the fused kernels, each sublayer's residual update fused with the
            # next one's coefficients (docs/kernels.md); returns the reduced streams
            from nanochat.kernels import fused_mhc_blocks  # lazy: the kernels stay optional
            x = fused_mhc_blocks(self.transformer.h, x, cos_sin, kv_cache, attn_mask, gate_cols)
        else:
            for i, block in enumerate(self.transformer.h):
                gates = None if gate_cols is None else gate_cols[:, 2 * i: 2 * i + 2]
                if checkpointing:
                    x = checkpoint(block, x, cos_sin, kv_cache, attn_mask, gates, use_reentrant=False)
                else:
                    x = block(x, cos_sin, kv_cache, attn_mask, gates)
            if self.config.mhc_enabled:
                x = x.sum(dim=-2)  # reduce the streams
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_final(x)

    def _embed(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Token embedding (projected up when factorised) + learned positions, normalised: [B, T, C]."""
        x = self.transformer.wte(idx)
        if self.config.embedding_dim:
            x = self.embed_proj(x)
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(self._learned_positions(idx.shape[1], kv_cache, idx.device))
        return self.norm_emb(x)

    def _learned_positions(self, T: int, kv_cache: KVCache | None, device) -> torch.Tensor:
        """[T] (no cache) or [B, T] (cache: left padding taken off) rows of the position table."""
        rows = self.config.sequence_len
        pos = torch.arange(T, device=device) if kv_cache is None else kv_cache.positions(T)
        last = T if kv_cache is None else int(pos.max()) + 1
        if last > rows:
            raise ValueError(f"position {last - 1} is past the learned position table ({rows} rows = "
                             f"sequence_len): learned positions cannot extrapolate; keep prompt + new "
                             f"tokens within {rows}, or use pos_embedding='rope'")
        return pos

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.tie_embeddings and self.config.embedding_dim:
            h = self.head_proj(h)
        logits = self.lm_head(h)[..., : self.config.vocab_size].float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, mhc_gates: torch.Tensor | None = None,
                loss_reduction: str = "mean"):
        """Logits [B, T, V] (fp32), or the cross-entropy loss when targets are given.

        targets use -1 for positions to ignore; loss_reduction 'none' gives per-token losses [B, T]."""
        logits = self.logits_from_hidden(self.hidden_states(idx, kv_cache, mhc_gates))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(targets.shape)
        return loss

    def new_kv_cache(self, batch_size: int, max_len: int, pad_lengths=None, dtype=None) -> KVCache:
        cfg = self.config
        device = self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(batch_size, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, max_len, device, dtype,
                       pad_lengths)

    # ---------------------------------------------------------------- bookkeeping
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint groups for the optimisers: 'matrix' (block weights: Muon or AdamW with decay),
        'embedding', 'lm_head', and 'mhc' (projections, bases, alphas, gates, stream_embed:
        AdamW without weight decay, never orthogonalised).

        Options add: 'scalar' (LayerNorm weights and biases, linear biases, depth-gate scales: AdamW
        without weight decay; empty for the default model); MoE routers, noise projections and
        experts, and the factorised embedding projections (embed_proj, head_proj) are 2-D linear
        maps and go to 'matrix'; learned positions to 'embedding'; a tied table to 'lm_head' only
        (it is the output layer too, so it takes the head's learning rate)."""
        cfg = self.config
        mhc_ids = set()
        groups = {"matrix": [], "embedding": [], "lm_head": [self.lm_head.weight], "mhc": [], "scalar": []}
        if not cfg.tie_embeddings:
            groups["embedding"].append(self.transformer.wte.weight)
        if cfg.pos_embedding == "learned":
            groups["embedding"].append(self.transformer.wpe.weight)
        if cfg.mhc_enabled:
            groups["mhc"].append(self.stream_embed)
            for m in self.mhc_modules():
                for p in m.parameters():
                    groups["mhc"].append(p)
            mhc_ids = {id(p) for p in groups["mhc"]}
        for block in self.transformer.h:
            for p in block.parameters():
                if id(p) not in mhc_ids:
                    groups["matrix" if p.ndim == 2 else "scalar"].append(p)
        for name in ("embed_proj", "head_proj"):
            if hasattr(self, name):
                groups["matrix"].append(getattr(self, name).weight)
        groups["scalar"].extend(list(self.norm_emb.parameters()) + list(self.norm_final.parameters()))
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups

    def num_params(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in v) for k, v in self.parameter_groups().items()}

    # ---------------------------------------------------------------- mixture of experts
    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoEFeedForward)]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of the last forward, each the mean over MoE layers (so a
        coefficient does not scale with depth): 'moe_lb', 'moe_z', 'moe_entropy'. Empty when dense."""
        layers = self.moe_layers()
        if not layers or layers[0].last_aux is None:
            return {}
        return {f"moe_{key}": torch.stack([m.last_aux[key] for m in layers]).mean()
                for key in ("lb", "z", "entropy")}

    def aux_loss(self) -> torch.Tensor:
        """The weighted sum to add to the LM loss before backward (0 for a dense model):
        moe_lb_coef * lb + moe_z_coef * z + moe_entropy_coef * entropy, from the last forward."""
        cfg = self.config
        losses = self.aux_losses()
        if not losses:
            return torch.zeros((), device=self.lm_head.weight.device)
        return (cfg.moe_lb_coef * losses["moe_lb"] + cfg.moe_z_coef * losses["moe_z"]
                + cfg.moe_entropy_coef * losses["moe_entropy"])

    def moe_stats(self) -> list[dict]:
        """Per MoE layer, from the last forward: tokens_per_expert [E] (assignments, before
        capacity), dropped, assignments, router_entropy (detached tensors / ints; no host sync)."""
        return [dict(m.last_stats) for m in self.moe_layers() if m.last_stats is not None]

    def estimate_flops_per_token(self, include_mhc: bool = True) -> float:
        """Training FLOPs per token: 6 x matmul parameters + the attention term 12*L*H*D*T.
        include_mhc=False gives the baseline model's FLOPs (MFU of mHC runs is quoted on those,
        so the cost of mHC shows as lower MFU)."""
        cfg = self.config
        counts = self.num_params()
        matmul = counts["matrix"] + counts["lm_head"]
        for moe in self.moe_layers():  # a token runs top_k of the E routed experts
            routed = sum(p.numel() for p in moe.experts.parameters() if p.ndim == 2)
            matmul -= routed * (moe.num_experts - moe.top_k) // moe.num_experts
        if include_mhc and cfg.mhc_enabled:
            matmul += sum(m.proj.weight.numel() for m in self.mhc_modules())
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len
        return 6 * matmul + attention


def build_model(config: GPTConfig, device, seed: int | None = None) -> GPT:
    """Build on the meta device, materialise on `device`, initialise every weight."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model
