"""Text generation: KV-cache prefill plus one-token decode steps, batched, sampled, with mHC gates.

    engine = Engine(model, tokenizer)                 # mode='eager': the reference path
    prompt = tokenizer.encode("The capital of France", prepend_bos=True)
    [result] = engine.generate([prompt], max_new_tokens=64, temperature=0.8, seed=0)
    print(result.text, result.finish_reason, result.entropies[:3])
    for event in engine.stream(prompt, temperature=0.8):   # what scripts/chat_cli.py prints
        print(event.text, end="", flush=True)

docs/engine.md gives the conventions (stop handling, seeds, top-k/top-p, adaptive temperature)
and the modes: 'eager' (the reference: a dynamic KV cache, finished rows dropped at once),
'static' (fixed shapes and no host sync inside a decode step; the CPU reference of the graph
path) and 'cuda_graph' (static, each step replayed from a CUDA graph; compile=True also runs the
step through torch.compile, which compiles once per model and batch-size bucket).
"""

import codecs
import contextlib
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from nanochat.checkpoint import bare_model
from nanochat.gpt import KVCache
from nanochat.mhc import bound_inductor_operator_str

MODES = ("eager", "static", "cuda_graph")
ADAPTIVE_MIN_SCALE = 0.1  # adaptive temperature never drops below 10% of the base temperature
MIN_TEMPERATURE = 1e-4  # floor of the divisor; a base temperature of exactly 0 means greedy
STATIC_LEN_MULTIPLE = 256  # static caches round their length up, so graphs get reused across calls
MAX_CACHED_DECODERS = 12  # bucket sizes kept per engine (one decoder each: a KV cache, maybe a graph)


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens; a stop token is not included, a stop string's tokens are
    text: str  # decoded new tokens, cut just before a stop string
    finish_reason: str  # 'stop' (stop token or stop string) or 'length' (max_new_tokens reached)
    entropies: list[float] = field(default_factory=list)  # nats, model distribution at T=1
    confidences: list[float] = field(default_factory=list)  # model probability (T=1) of the token
    temperatures: list[float] = field(default_factory=list)  # temperature used for each token
    stop: str | int | None = None  # the stop string or stop token id that ended the row
    prompt_tokens_dropped: int = 0  # tokens cut from the left of a prompt too long for the context


@dataclass
class StreamEvent:
    token: int  # the sampled token (the last event's may be the stop token)
    text: str  # newly printable text: '' while it may still turn into a stop string
    entropy: float
    confidence: float
    temperature: float
    finish_reason: str | None = None  # set on the last event only


# ---------------------------------------------------------------- sampling (no host syncs)
def sample_next(logits, uniforms, temperature, top_k: int, top_p, adaptive):
    """One token per row from fp32 logits [B, V], with no host sync (safe inside a CUDA graph).

    temperature, top_p: 0-d tensors; adaptive: 0-d bool tensor; top_k: int (0 = off); uniforms:
    [B] in [0, 1), one per row and step. Temperature first (adaptive: T = base * clamp(1 - H/ln V,
    0.1, 1), H the entropy of the model's distribution), then top-k, then top-p on what is left
    (the smallest set of best tokens whose mass reaches top_p), then inverse-CDF sampling with the
    row's uniform. Base temperature 0 gives the argmax. Returns (tokens [B] long, entropy [B],
    confidence [B] = model probability of the token at T=1, temperature used [B])."""
    vocab = logits.shape[-1]
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(dim=-1)
    # lower temperature when the model is unsure: a flat distribution is sampled more greedily
    scale = (1.0 - entropy / math.log(vocab)).clamp(min=ADAPTIVE_MIN_SCALE, max=1.0)
    temp = torch.where(adaptive, temperature * scale, temperature.expand_as(scale))
    k = top_k if 0 < top_k < vocab else vocab
    top_logits, top_ids = logits.topk(k, dim=-1)  # sorted, best first
    p = torch.softmax(top_logits / temp.clamp(min=MIN_TEMPERATURE)[:, None], dim=-1)
    mass_before = p.cumsum(dim=-1) - p  # exactly 0 for the best token, so it is always kept
    p = p * ((mass_before < top_p) | (top_p >= 1.0))
    cdf = p.cumsum(dim=-1)
    # first index whose cdf reaches u * total: never a removed (zero-mass) token, which sits after
    # the kept ones with an unchanged cdf
    pick = (cdf < uniforms[:, None] * cdf[:, -1:]).sum(dim=-1).clamp(max=k - 1)
    sampled = top_ids.gather(1, pick[:, None]).squeeze(1)
    tokens = torch.where(temp > 0, sampled, logits.argmax(dim=-1))
    confidence = probs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, entropy, confidence, temp


def row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """[B, steps] uniforms in [0, 1): row b's come from its own torch.Generator seeded seeds[b],
    so a row samples the same tokens whatever else shares its batch."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s % 2**64)) for s in seeds])


def _to_host(picked) -> list[list[float]]:
    """(tokens, entropy, confidence, temperature) -> one list per row, in one device->host copy."""
    return torch.stack([t.double() for t in picked], dim=1).tolist()


# ---------------------------------------------------------------- fixed-shape decoding
class StaticKVCache:
    """A KV cache for one-token decode steps with fixed shapes and no host syncs.

    Same interface as gpt.KVCache (the model only calls positions, attention_mask, update,
    advance and reads pos), but the write position lives on the device (pos_t) and attention
    spans all max_len slots, the unfilled and padded ones masked, so every step has the same
    shapes and can be replayed from a CUDA graph. `pos` stays 0: decode steps do not advance it
    on the host. Keys and values are one tensor per layer, so torch.compile updates them in place
    (slices of one big tensor would be copied whole). Prefill goes through a regular KVCache
    that _StaticDecoder.load copies in."""

    def __init__(self, model, batch_size: int, max_len: int, dtype):
        cfg = model.config
        device = model.lm_head.weight.device
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos_t = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    @staticmethod
    def _one_token(T: int):
        if T != 1:
            raise ValueError(f"StaticKVCache decodes one token per step, got {T}; prefill with a KVCache")

    def positions(self, T: int) -> torch.Tensor:
        self._one_token(T)
        return (self.pos_t - self.pad).clamp(min=0)[:, None]

    def attention_mask(self, T: int) -> torch.Tensor:
        self._one_token(T)
        visible = (self.slots[None, :] <= self.pos_t) & (self.slots[None, :] >= self.pad[:, None])
        return visible[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer_idx][:, :, self.pos_t] = k
        self.v[layer_idx][:, :, self.pos_t] = v
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, T: int):
        self.pos_t += T


def _decode_step(dec: "_StaticDecoder"):
    """One token for every row of a static decoder, all state in its tensors (graph-capturable)."""
    model = dec.model
    h = model.hidden_states(dec.idx, kv_cache=dec.cache, mhc_gates=dec.gates)
    logits = model.logits_from_hidden(h[:, -1])
    u = dec.uniforms.index_select(1, dec.step_t).squeeze(1)
    picked = sample_next(logits, u, dec.temperature, dec.top_k, dec.top_p, dec.adaptive)
    dec.idx.copy_(picked[0][:, None])
    dec.out.copy_(torch.stack([t.double() for t in picked], dim=1))
    dec.step_t += 1


class _StaticDecoder:
    """The fixed buffers of one (bucket size, max_len, gates, top_k, dtype) decode configuration."""

    def __init__(self, model, batch_size: int, max_len: int, gate_slots: int, top_k: int, dtype,
                 step_fn, use_cuda_graph: bool):
        device = model.lm_head.weight.device
        self.model, self.batch_size, self.top_k, self.step_fn = model, batch_size, top_k, step_fn
        self.cache = StaticKVCache(model, batch_size, max_len, dtype)
        self.idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.gates = torch.zeros(batch_size, gate_slots, device=device) if gate_slots else None
        self.uniforms = torch.zeros(batch_size, max_len, device=device)
        self.step_t = torch.zeros(1, dtype=torch.long, device=device)
        self.temperature = torch.zeros((), device=device)
        self.top_p = torch.ones((), device=device)
        self.adaptive = torch.zeros((), dtype=torch.bool, device=device)
        self.out = torch.zeros(batch_size, 4, dtype=torch.float64, device=device)
        self._host, self._events, self._flip = None, None, 0
        self.graph = None
        if use_cuda_graph:
            self._capture()

    def _capture(self):
        # Under autocast, its cache of bf16 weight copies dies with the caller's autocast context,
        # and a graph that read it would replay freed memory: capture with the cache off, so the
        # casts are part of the graph.
        no_cast_cache = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                         if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        with no_cast_cache:
            self.step_fn(self)  # compiles on first use (torch.compile), outside any capture
            side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step_fn(self)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step_fn(self)
        # warm-up moved the counters and wrote junk into slots 0-2: load() resets all state

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step_fn(self)

    def launch(self):
        """Run one step; return a function that waits for its output and returns it as lists.
        On CUDA the output is copied to pinned host memory behind the step, so the host can
        launch the next step before reading this one."""
        self.step()
        if not self.out.is_cuda:
            values = self.out.tolist()
            return lambda: values
        if self._host is None:  # two buffers: at most two steps are in flight
            self._host = [torch.empty(self.out.shape, dtype=self.out.dtype, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        buf, event = self._host[self._flip], self._events[self._flip]
        self._flip ^= 1
        buf.copy_(self.out, non_blocking=True)
        event.record()
        return lambda: (event.synchronize(), buf.tolist())[1]

    def _set_sampling(self, settings):
        temperature, top_p, adaptive = settings
        self.temperature.copy_(temperature)
        self.top_p.copy_(top_p)
        self.adaptive.copy_(adaptive)

    def load(self, prefill: KVCache, first_tokens, uniforms, gates, settings):
        """Rows 0..n-1 from a prefilled KVCache of n rows; the remaining rows idle harmlessly."""
        n, T = prefill.batch_size, prefill.pos
        c = self.cache
        for layer in range(len(c.k)):
            c.k[layer][:n, :, :T].copy_(prefill.k[layer, :, :, :T])
            c.v[layer][:n, :, :T].copy_(prefill.v[layer, :, :, :T])
        c.pad.zero_()
        c.pad[:n].copy_(prefill.pad)
        c.pos_t.fill_(T)
        self.idx.zero_()
        self.idx[:n, 0].copy_(first_tokens)
        self.uniforms.zero_()
        self.uniforms[:n, : uniforms.shape[1]].copy_(uniforms)
        if self.gates is not None:
            self.gates.zero_()
            self.gates[:n].copy_(gates)
        self.step_t.fill_(1)  # token 0 came from the prefill logits
        self._set_sampling(settings)

    def take_rows(self, src: "_StaticDecoder", slots: list[int]):
        """Continue the given rows of a bigger decoder in this smaller one. Their max_len may
        differ; both hold every slot this generation uses."""
        sel = torch.tensor(slots, device=self.idx.device)
        m, S = len(slots), min(self.cache.max_len, src.cache.max_len)
        for mine, theirs in zip(self.cache.k + self.cache.v, src.cache.k + src.cache.v):
            mine[:m, :, :S].copy_(theirs[sel, :, :S])
        self.cache.pad.zero_()
        self.cache.pad[:m].copy_(src.cache.pad[sel])
        self.cache.pos_t.copy_(src.cache.pos_t)
        self.idx.zero_()
        self.idx[:m].copy_(src.idx[sel])
        self.uniforms.zero_()
        self.uniforms[:m, :S].copy_(src.uniforms[sel, :S])
        if self.gates is not None:
            self.gates.zero_()
            self.gates[:m].copy_(src.gates[sel])
        self.step_t.copy_(src.step_t)
        self._set_sampling((src.temperature, src.top_p, src.adaptive))


# ---------------------------------------------------------------- per-row bookkeeping
class _Row:
    """Host-side state of one prompt's generation: tokens, statistics, stop conditions."""

    def __init__(self, tokenizer, stop_strings, stop_token_ids, dropped: int, track_bytes: bool):
        self.tokenizer = tokenizer
        self.stop_bytes = [s.encode("utf-8") for s in stop_strings]
        self.stop_token_ids = frozenset(stop_token_ids)
        self.track_bytes = track_bytes or bool(self.stop_bytes)
        self.tokens, self.entropies, self.confidences, self.temperatures = [], [], [], []
        self.buf = bytearray()  # UTF-8 of the tokens so far (stop strings, streaming)
        self.text_end = None  # byte offset where a stop string starts
        self.finish_reason, self.stop, self.last = None, None, None
        self.dropped = dropped

    def add(self, token: int, entropy: float, confidence: float, temperature: float) -> bool:
        """Record one sampled token; True when it ends the row."""
        self.last = (token, entropy, confidence, temperature)
        if token in self.stop_token_ids:
            self.finish_reason, self.stop = "stop", token
            return True
        self.tokens.append(token)
        self.entropies.append(entropy)
        self.confidences.append(confidence)
        self.temperatures.append(temperature)
        if self.track_bytes:
            start = len(self.buf)
            self.buf += self.tokenizer.decode_bytes([token])
            found = [(i, s) for s in self.stop_bytes
                     if (i := self.buf.find(s, max(0, start - len(s) + 1))) >= 0]
            if found:
                self.text_end, stop = min(found)
                self.finish_reason, self.stop = "stop", stop.decode("utf-8")
                return True
        return False

    def safe_text_end(self) -> int:
        """Bytes that cannot become part of a stop string, whatever comes next."""
        held = 0
        for s in self.stop_bytes:
            for k in range(min(len(s) - 1, len(self.buf)), held, -1):
                if self.buf.endswith(s[:k]):
                    held = k
                    break
        return len(self.buf) - held

    def result(self) -> GenerationResult:
        if self.text_end is not None:
            text = bytes(self.buf[: self.text_end]).decode("utf-8", errors="replace")
        else:
            text = self.tokenizer.decode(self.tokens)
        return GenerationResult(self.tokens, text, self.finish_reason or "length", self.entropies,
                                self.confidences, self.temperatures, self.stop, self.dropped)


@dataclass
class _Job:
    prompts: list[list[int]]
    rows: list[_Row]
    uniforms: torch.Tensor  # [B, max_new_tokens] on the device
    gates: torch.Tensor | None  # [B, 2L] on the device
    settings: tuple  # (temperature, top_p, adaptive) 0-d tensors
    top_k: int
    max_new_tokens: int
    t_start: float = 0.0
    t_first: float = 0.0


def _per_row(value, n: int, what: str, item_type) -> list[list]:
    """None | item | [items] (shared by every row) | [[items] per row] -> n lists of items."""
    if value is None:
        return [[] for _ in range(n)]
    if isinstance(value, item_type):
        value = [value]
    value = list(value)
    if value and all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} per-row lists for {n} prompts")
        rows = [list(v) for v in value]
    else:
        rows = [value] * n
    for row in rows:
        for v in row:
            if not isinstance(v, item_type) or (item_type is str and not v):
                raise ValueError(f"{what} must hold {'non-empty strings' if item_type is str else 'ints'}, "
                                 f"got {v!r}")
    return rows


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Engine:
    """Generation for one model and tokenizer. One generation at a time per engine."""

    def __init__(self, model, tokenizer, mode: str = "eager", compile: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
        model = bare_model(model)  # DDP / torch.compile wrappers: generate with the plain GPT
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.device = model.lm_head.weight.device
        if mode == "cuda_graph" and (model.config.moe_num_experts > 0 or model.config.pos_embedding != "rope"):
            raise ValueError("mode='cuda_graph' needs a decode step without host syncs, but MoE routing (expert "
                             "counts) and the learned-position bound check read values on the host; use "
                             "mode='static' or 'eager' for this model")
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"mode='cuda_graph' needs the model on a CUDA device (it is on {self.device}); "
                             f"use mode='static' (the same fixed-shape path without a graph) or 'eager'")
        if compile and mode == "eager":
            raise ValueError("compile=True applies to the fixed-shape step: use mode='static' or 'cuda_graph'")
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"model vocab_size={model.config.vocab_size} but tokenizer {tokenizer.name!r} has "
                             f"{tokenizer.vocab_size} tokens: load the tokenizer the model was trained with")
        if compile:
            bound_inductor_operator_str()  # else compiling the fused mHC stack can hang (torch 2.11)
        self.step_fn = torch.compile(_decode_step) if compile else _decode_step
        self._decoders = OrderedDict()
        self._busy = False
        self.last_stats = {}  # sizes and timings of the last generation (docs/engine.md)

    # ------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = 50, top_p: float | None = 0.95, seed=None, stop_strings=None,
                 stop_token_ids=None, mhc_gates=None, adaptive_temperature: bool = False
                 ) -> list[GenerationResult]:
        """Generate for every prompt (lists of token ids, of any lengths) as one batch.

        seed: int (row i uses seed + i), a list of one int per row, or None (fresh randomness).
        stop_strings / stop_token_ids: shared by all rows, or one list per row; stop_token_ids
        None means [tokenizer.eos_id], [] means none. mhc_gates: [B or 1, 1 | L | 2L] gate values
        in [0, 1], one row per prompt, kept with its prompt throughout."""
        job = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_strings,
                            stop_token_ids, mhc_gates, adaptive_temperature, track_bytes=False)
        for _ in self._run(job):
            pass
        return [row.result() for row in job.rows]

    def stream(self, prompt_tokens: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int | None = 50, top_p: float | None = 0.95, seed=None, stop_strings=None,
               stop_token_ids=None, mhc_gates=None, adaptive_temperature: bool = False):
        """Yield a StreamEvent per sampled token of one prompt (same options as generate). Text
        that could still become a stop string is held back until it cannot."""
        job = self._prepare([list(prompt_tokens)], max_new_tokens, temperature, top_k, top_p, seed,
                            stop_strings, stop_token_ids, mhc_gates, adaptive_temperature, track_bytes=True)
        row = job.rows[0]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        released = 0
        for _ in self._run(job):
            done = row.finish_reason is not None  # _record sets 'length' on the last step
            if row.text_end is not None:
                end = row.text_end
            else:
                end = len(row.buf) if done else row.safe_text_end()
            text = decoder.decode(bytes(row.buf[released:end]), final=done)
            released = max(released, end)
            token, entropy, confidence, temp = row.last
            yield StreamEvent(token, text, entropy, confidence, temp, row.finish_reason)

    def clear_cache(self):
        """Free the static decoders (their KV caches and CUDA graphs)."""
        self._decoders.clear()

    # ------------------------------------------------------------ preparation
    def _prepare(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_strings,
                 stop_token_ids, mhc_gates, adaptive, track_bytes) -> _Job:
        """Check every argument and build the job, before any model work."""
        cfg, tok = self.model.config, self.tokenizer
        if self._busy:
            raise RuntimeError("this Engine is already generating (e.g. an unfinished stream); "
                               "finish or close it, or use a second Engine")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        prompts = [list(p) for p in prompts]
        B = len(prompts)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        max_prompt = cfg.sequence_len - max_new_tokens
        if max_prompt < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of sequence_len={cfg.sequence_len}; use at most {cfg.sequence_len - 1}")
        if temperature is None or temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        top_k = 0 if top_k is None else int(top_k)
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0 or None = off)")
        top_p = 1.0 if top_p is None else float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (1 or None = off)")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token, e.g. [tokenizer.bos_id]")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        # over-long prompts lose their oldest tokens (a leading BOS is kept: it marks a document start)
        dropped = [max(0, len(p) - max_prompt) for p in prompts]
        for i, cut in enumerate(dropped):
            if cut:
                p = prompts[i]
                keep_bos = p[0] == tok.bos_id
                prompts[i] = ([p[0]] if keep_bos else []) + p[len(p) - max_prompt + keep_bos:]
        if any(dropped):
            warnings.warn(f"{sum(1 for d in dropped if d)} prompt(s) longer than {max_prompt} tokens "
                          f"(sequence_len {cfg.sequence_len} - max_new_tokens {max_new_tokens}) were cut from "
                          f"the left; GenerationResult.prompt_tokens_dropped has the counts", stacklevel=3)
        if stop_token_ids is None:
            stop_token_ids = [tok.eos_id]  # BOS == EOS here: a new document starting ends this one
        strings = _per_row(stop_strings, B, "stop_strings", str)
        stop_ids = _per_row(stop_token_ids, B, "stop_token_ids", int)
        rows = [_Row(tok, s, t, d, track_bytes) for s, t, d in zip(strings, stop_ids, dropped)]
        gates = self._prepare_gates(mhc_gates, B)
        if seed is None:
            seed = torch.Generator().seed()  # fresh, non-deterministic
        seeds = [int(s) for s in seed] if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(B)]
        if len(seeds) != B:
            raise ValueError(f"seed: {len(seeds)} seeds for {B} prompts")
        if self.model.training:
            warnings.warn("generating with the model in training mode (dropout, gate noise); call model.eval()",
                          stacklevel=3)
        d = self.device
        settings = (torch.tensor(float(temperature), device=d), torch.tensor(top_p, device=d),
                    torch.tensor(bool(adaptive), device=d))
        uniforms = row_uniforms(seeds, max_new_tokens).to(d)
        return _Job(prompts, rows, uniforms, gates, settings, top_k, max_new_tokens)

    def _prepare_gates(self, mhc_gates, B: int):
        if mhc_gates is None:
            return None
        if not self.model.config.mhc_enabled:
            raise ValueError("mhc_gates were given but this model has no mHC (mhc_enabled=False)")
        g = torch.as_tensor(mhc_gates, dtype=torch.float32)
        if g.dim() != 2 or g.shape[0] not in (1, B):
            raise ValueError(f"mhc_gates must be [batch={B} (or 1), slots], got {tuple(g.shape)}")
        if not bool(((g >= 0) & (g <= 1)).all()):
            raise ValueError("mhc_gates values must be in [0, 1]: they are gate values, not logits")
        g = self.model.expand_mhc_gates(g.to(self.device)).expand(B, -1)
        return g.contiguous()

    def _cache_dtype(self):
        kind = self.device.type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.model.lm_head.weight.dtype

    def _left_pad(self, prompts):
        T = max(len(p) for p in prompts)
        pad = [T - len(p) for p in prompts]
        pad_id = self.tokenizer.bos_id  # any id works: padded keys are masked
        idx = torch.tensor([[pad_id] * n + p for n, p in zip(pad, prompts)], dtype=torch.long)
        return idx.to(self.device), torch.tensor(pad, dtype=torch.long)

    def _prefill(self, idx, cache, gates):
        h = self.model.hidden_states(idx, kv_cache=cache, mhc_gates=gates)
        return self.model.logits_from_hidden(h[:, -1])  # [B, V]: never the [B, T, V] of a full forward

    # ------------------------------------------------------------ decode loops
    def _record(self, job: _Job, row_ids, values, step: int) -> list[int]:
        """Add one token per live row; return the positions (in row_ids) still generating."""
        if step == 0:
            job.t_first = time.perf_counter()
        last = step == job.max_new_tokens - 1
        keep = []
        for i, (r, (token, entropy, confidence, temp)) in enumerate(zip(row_ids, values)):
            if job.rows[r].add(int(token), entropy, confidence, temp):
                continue
            if last:
                job.rows[r].finish_reason = "length"
            else:
                keep.append(i)
        return keep

    @torch.inference_mode()
    def _run(self, job: _Job):
        """Generate for the job, yielding after every step (the rows hold the results)."""
        self._busy = True
        job.t_start = time.perf_counter()
        steps = 0
        try:
            run = self._run_eager if self.mode == "eager" else self._run_static
            for steps, _ in enumerate(run(job), start=1):
                yield
        finally:
            self._busy = False
            t_end = time.perf_counter()
            self.last_stats = dict(
                batch_size=len(job.rows), prompt_len=max(len(p) for p in job.prompts),
                new_tokens=sum(len(r.tokens) for r in job.rows), decode_steps=max(0, steps - 1),
                prefill_seconds=job.t_first - job.t_start, decode_seconds=t_end - job.t_first)

    def _run_eager(self, job: _Job):
        model = self.model
        idx, pad = self._left_pad(job.prompts)
        B, T = idx.shape
        cache = model.new_kv_cache(B, T + job.max_new_tokens, pad_lengths=pad, dtype=self._cache_dtype())
        gates = job.gates
        logits = self._prefill(idx, cache, gates)
        live = torch.arange(B, device=self.device)
        live_rows = list(range(B))  # the original row of every cache row
        for step in range(job.max_new_tokens):
            picked = sample_next(logits, job.uniforms[live, step], job.settings[0], job.top_k,
                                 job.settings[1], job.settings[2])
            keep = self._record(job, live_rows, _to_host(picked), step)
            yield
            if not keep:
                return
            tokens = picked[0]
            if len(keep) < len(live_rows):  # finished rows stop costing compute
                sel = torch.tensor(keep, device=self.device)
                cache.select_rows(sel)
                tokens, live = tokens[sel], live[sel]
                gates = None if gates is None else gates[sel]
                live_rows = [live_rows[i] for i in keep]
            logits = model(tokens[:, None], kv_cache=cache, mhc_gates=gates)[:, -1]

    def _run_static(self, job: _Job):
        model = self.model
        idx, pad = self._left_pad(job.prompts)
        n, T = idx.shape
        needed = T + job.max_new_tokens  # slots; at most sequence_len (prompts were cut to fit)
        prefill = model.new_kv_cache(n, T, pad_lengths=pad, dtype=self._cache_dtype())
        logits = self._prefill(idx, prefill, job.gates)
        picked = sample_next(logits, job.uniforms[:, 0], job.settings[0], job.top_k, job.settings[1],
                             job.settings[2])
        keep = self._record(job, list(range(n)), _to_host(picked), 0)
        yield
        if not keep:
            return
        dec = self._decoder(_next_pow2(n), needed, job)
        dec.load(prefill, picked[0], job.uniforms, job.gates, job.settings)
        del prefill
        slots = [i if i in keep else None for i in range(n)] + [None] * (dec.batch_size - n)
        # Pipelined by one step: step s+1 is already running on the device while the host reads
        # step s and checks its stops. A row that stopped at step s skips its step s+1 output.
        in_flight, next_step, compact = [], 1, False
        while True:
            while (len(in_flight) < 2 and next_step < job.max_new_tokens and not compact
                   and any(r is not None for r in slots)):
                in_flight.append((list(slots), next_step, dec.launch()))
                next_step += 1
            if not in_flight:
                return
            slots_then, step, read_values = in_flight.pop(0)
            values = read_values()
            live = [i for i, r in enumerate(slots_then) if r is not None and job.rows[r].finish_reason is None]
            keep = set(self._record(job, [slots_then[i] for i in live], [values[i] for i in live], step))
            yield
            slots = [r if r is not None and job.rows[r].finish_reason is None else None for r in slots]
            n_live = sum(r is not None for r in slots)
            if n_live == 0:
                return
            compact = n_live <= dec.batch_size // 2  # half the bucket idles: move to a smaller one
            if compact and not in_flight:
                order = [i for i, r in enumerate(slots) if r is not None]
                small = self._decoder(_next_pow2(len(order)), needed, job)
                small.take_rows(dec, order)
                slots = [slots[i] for i in order] + [None] * (small.batch_size - len(order))
                dec, compact = small, False

    def _decoder(self, batch_size: int, needed_len: int, job: _Job) -> _StaticDecoder:
        """The decoder of this bucket size (and gates, top-k, dtype); one per bucket, grown when a
        call needs more slots, so repeated calls replay the same graphs and memory stays bounded."""
        gate_slots = 0 if job.gates is None else job.gates.shape[1]
        dtype = self._cache_dtype()
        key = (batch_size, gate_slots, job.top_k, dtype, torch.is_autocast_enabled(self.device.type))
        dec = self._decoders.pop(key, None)
        if dec is None or dec.cache.max_len < needed_len:
            del dec  # free the smaller cache (and graph) before allocating the bigger one
            while len(self._decoders) >= MAX_CACHED_DECODERS:
                self._decoders.popitem(last=False)
            max_len = min(-(-needed_len // STATIC_LEN_MULTIPLE) * STATIC_LEN_MULTIPLE, self.model.rotary_len)
            dec = _StaticDecoder(self.model, batch_size, max_len, gate_slots, job.top_k, dtype, self.step_fn,
                                 use_cuda_graph=self.mode == "cuda_graph")
        self._decoders[key] = dec  # most recently used last
        return dec
