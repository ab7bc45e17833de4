"""The KV-cache sampler: one generation engine for RL rollouts, evaluation, scripts/sample.py and the server.

    engine = Engine(model)            # owns the decoding state: KV cache, bf16 weight copies, CUDA graphs
    gen = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.8, top_k=50,
                          stop_tokens=(eot,), seed=0, return_logprobs=True)
    gen.tokens (R, N) int64, gen.mask (R, N) bool, gen.lengths (R,), gen.logprobs (R, N) float32, gen.tokens_list()
    gen = engine.generate(prompts, 64, group_size=4)    # RL: rows b*n .. b*n+n-1 share prompt b
    engine.release()                  # frees the cache and graphs (so does dropping the engine)

    gen = generate(model, prompts, 64, ...)             # one-off: a temporary Engine, freed on return

An Engine keeps its decoder (cache + captured graphs) between calls of the same shape, so a loop of
same-shape calls (an RL rollout per iteration) allocates and captures once; keep one Engine per repeated shape
and release it (or let it go) before memory-hungry phases such as training. There is no hidden per-model state:
what is allocated belongs to an Engine object the caller holds.

Stops given as command-line text (token ids, '<|endoftext|>', strings with backslash escapes) are split by
`parse_stops`; `completion_texts` decodes finished rows without their stop.

How a batch is run (R rows, N = max_new_tokens, P = longest prompt):
  - ragged prompts are left-padded to P; cache.valid masks the padding slots and each row gets its own positions
    (slot - n_pad), so a row computes exactly what it would alone;
  - one batched prefill writes the P prompt slots and gives the first token's logits (last_only=True); for group
    sampling the B unique prompts are prefilled once and their cache rows copied n times (what
    KVCache.repeat_interleave does, written in place so a captured CUDA graph keeps reading the same buffers);
  - then N - 1 one-token decode steps. Each step is shape-static (the cache's write slot is a device tensor), so on
    CUDA the whole step (forward, drawing the token, recording it, feeding it back) is captured once in a CUDA
    graph and replayed; only the uniforms for sampling are drawn outside it (one launch), and the host syncs only
    every `check_every` steps to see whether all rows are done;
  - a row that emits a stop token (or whose decoded text gains a stop string) is finished: its later tokens are
    `pad_id` with mask 0, it keeps being fed pad tokens (rows never interact), and the loop ends once all are done.

Log-probs of each sampled token are returned two ways:
    logprobs          = log_softmax(raw logits)[token]                 (float32; the model's own distribution: RL)
    sampling_logprobs = log_softmax(filter(logits / temperature))[token]   (the distribution actually sampled from;
                                                                            0 for greedy, a point mass)
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .models.base import CausalLM, KVCache


# --- result -------------------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """What `generate` returns. R rows (= len(prompts) * group_size, prompt-major), N = max_new_tokens.

    tokens:            (R, N) int64, the new tokens; `pad_id` after a row has finished
    mask:              (R, N) bool, True for generated tokens up to and including the stop token
    lengths:           (R,) int64, number of generated tokens per row (= mask.sum(1))
    stopped:           (R,) bool, True if the row ended on a stop token / stop string, False if it hit N
    prompts:           list of R prompts (token-id lists), the prompt of each row
    logprobs:          (R, N) float32 or None, log p_model(token) from the raw logits (0 where mask is False)
    sampling_logprobs: (R, N) float32 or None, log q(token) under the sampling distribution (0 where mask is False)
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    prompts: list[list[int]]
    logprobs: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None
    group_size: int = 1

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def tokens_list(self) -> list[list[int]]:
        """Each row's generated tokens (stop token included), as Python lists."""
        rows = self.tokens.tolist()
        return [row[:n] for row, n in zip(rows, self.lengths.tolist())]

    @property
    def sequences(self) -> list[list[int]]:
        """Each row's prompt followed by its generated tokens."""
        return [p + c for p, c in zip(self.prompts, self.tokens_list())]


# --- logits -> token -----------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution's logits: logits / temperature, with tokens outside the top-k and outside the
    top-p nucleus set to -inf. logits (R, V) float; temperature > 0.

    top-k keeps the k largest (ties with the k-th included); top-p keeps the smallest prefix of tokens, sorted
    by probability, whose mass reaches p (the most likely token is always kept).
    """
    x = logits / temperature if temperature != 1.0 else logits
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one token per row. logits (R, V) -> tokens (R,) int64 and the sampling distribution's log-probs
    (R, V) float32, or None when greedy (temperature 0: argmax, a point mass).

    Sampling uses the exponential race argmax_v q_v / E_v with E_v ~ Exp(1) i.i.d., which draws v with
    probability exactly q_v, without the host sync torch.multinomial can need on CUDA.
    """
    if temperature == 0:
        return logits.argmax(-1), None
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
    return _race(logits, temperature, top_k, top_p, uniform)


def _race(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_logits with the (R, V) uniforms given: argmax_v q_v / E_v with E = -log U. Pure tensor ops, so
    it runs inside a captured (and compiled) decode step; the uniforms are drawn outside it."""
    logq = torch.log_softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    # E = -log U (faster than exponential_ on CPU); clamped > 0 so a zero-probability token is never 0/0 = NaN
    e = uniform.log().neg().clamp(min=1e-30)
    return (logq.exp() / e).argmax(-1), logq


@dataclass(frozen=True)
class _Rule:
    """How tokens are drawn and recorded: everything a captured step bakes in (the graph cache key)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    want_lp: bool
    stop_tokens: tuple[int, ...]
    pad_id: int


class _Record:
    """The decode loop's device state, (R, N) for N = max_new_tokens, updated in place by `_advance` (so a
    captured step can own it): tokens, mask, log-probs, the active rows, the step index t and the uniforms."""

    def __init__(self, rows: int, max_new: int, vocab: int, rule: _Rule, device: torch.device):
        self.tokens = torch.empty(rows, max_new, dtype=torch.long, device=device)
        self.mask = torch.empty(rows, max_new, dtype=torch.bool, device=device)
        self.lp = torch.empty(rows, max_new, dtype=torch.float32, device=device) if rule.want_lp else None
        self.slp = torch.empty(rows, max_new, dtype=torch.float32, device=device) if rule.want_lp else None
        self.active = torch.empty(rows, dtype=torch.bool, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        self.uniform = (torch.empty(rows, vocab, dtype=torch.float32, device=device) if rule.temperature > 0
                        else None)
        self.stop = (torch.tensor(rule.stop_tokens, dtype=torch.long, device=device) if rule.stop_tokens
                     else None)
        self.pad = torch.full((rows,), rule.pad_id, dtype=torch.long, device=device)
        self.reset(rule.pad_id)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tokens, self.mask, self.lp, self.slp, self.active, self.t) if t is not None]

    def reset(self, pad_id: int) -> None:
        self.tokens.fill_(pad_id)
        self.mask.zero_()
        for t in (self.lp, self.slp):
            if t is not None:
                t.zero_()
        self.active.fill_(True)
        self.t.zero_()

    def draw_uniforms(self, generator: torch.Generator | None) -> None:
        if self.uniform is not None:
            self.uniform.uniform_(generator=generator)


def _advance(logits: torch.Tensor, rec: _Record, rule: _Rule, next_idx: torch.Tensor) -> None:
    """One decode step's bookkeeping, all on the device: draw token t of every row from logits (R, V), write
    it (pad for finished rows) with its mask and log-probs at column rec.t, retire rows that emitted a stop
    token, put the token into next_idx (R, 1), the next step's input, and advance rec.t."""
    if rule.temperature == 0:
        tok, logq = logits.argmax(-1), None
    else:
        tok, logq = _race(logits, rule.temperature, rule.top_k, rule.top_p, rec.uniform)
    active = rec.active
    tok = torch.where(active, tok, rec.pad)
    rec.tokens.index_copy_(1, rec.t, tok[:, None])
    rec.mask.index_copy_(1, rec.t, active[:, None])
    if rule.want_lp:
        plain = rule.temperature == 1.0 and rule.top_k is None and (rule.top_p is None or rule.top_p >= 1.0)
        raw = logq if plain else torch.log_softmax(logits.float(), dim=-1)
        rec.lp.index_copy_(1, rec.t, torch.where(active, raw.gather(1, tok[:, None])[:, 0], 0.0)[:, None])
        if logq is not None:  # greedy: a point mass, log q = 0 (slp stays zero)
            rec.slp.index_copy_(1, rec.t, torch.where(active, logq.gather(1, tok[:, None])[:, 0], 0.0)[:, None])
    if rec.stop is not None:
        active &= ~(tok[:, None] == rec.stop).any(-1)
    next_idx.copy_(tok[:, None])
    rec.t.add_(1)


# --- the decode state: cache, static inputs, optional CUDA graph ----------------------------------------------------
class _SingleRowLinear(torch.overrides.TorchFunctionMode):
    """F.linear on a single row as y = sum_k x_k W[:, k] (+ b), written as a broadcast product and a sum.

    Used inside a compiled batch-1 decode step: the compiler turns it into one reduction kernel per projection
    that streams the weight (with the bias add fused), where the GEMM library's kernels are tuned for many rows
    and take ~2x longer per call at one. Under autocast the operands are cast as autocast would cast them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.shape[-1]:
                if torch.is_autocast_enabled(x.device.type):
                    amp = torch.get_autocast_dtype(x.device.type)
                    x, w, b = x.to(amp), w.to(amp), None if b is None else b.to(amp)
                y = (x.unsqueeze(-2) * w).sum(-1)
                return y if b is None else y + b
        return func(*args, **kwargs)


class _Decoder:
    """A cache plus static (R, 1) input buffers for the token and its position; `step()` runs one decode step and
    returns the (R, V) logits.

    With a CUDA graph, a whole step (the model's forward on `idx` and `_advance`: drawing, recording and feeding
    back the token) is captured once per sampling rule and replayed; only the uniforms are drawn outside it, so a
    step costs two launches and no sync. The graph reads `idx`, `pos`, the cache buffers, `cache.valid`,
    `cache.pos` and its `_Record` by address, so all of them are only ever updated in place. Without one (CPU),
    each step attends to the written prefix of the cache only (a view of its first pos + 1 slots): the cache is
    read from memory every step, so this saves up to half the attention time over a generation.
    """

    def __init__(self, model: CausalLM, rows: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 cuda_graph: bool, compile: bool = False):
        self._model = weakref.ref(model)  # the Engine holds the model; nothing here keeps it alive
        self.cache = model.make_cache(rows, max_len, device=device, dtype=dtype)
        self.idx = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.use_graph = cuda_graph
        self.compile = compile
        self.single_row = compile and rows == 1  # compiled batch-1 decoding: GEMV linears, tuned kernels
        self.graphs: dict[tuple[_Rule, int], tuple[object, _Record]] = {}  # (rule, max_new) -> (graph, record)
        self.in_use = False
        # which dim of each cache buffer indexes slots: the one that changes with max_len
        a, b = model._cache_layout(1, 2), model._cache_layout(1, 3)
        self.slot_dim = {k: next(i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y) for k in a}
        self.trim = device.type == "cpu"
        # Under autocast a captured step would re-cast every float32 Linear weight to the autocast dtype at every
        # step (autocast's cast cache must be off in a graph). Instead the graph reads low-precision copies,
        # refreshed once per generate() call (`refresh_shadow`): the same values autocast would cast to, so the
        # same results, without the per-step casts. Weights shared with an embedding stay (the lookup is not
        # autocast). Plain models (float32 without autocast, or already bf16) have no shadow.
        self.amp = amp = _autocast_dtype(device)  # part of the Engine's decoder key, so fixed per decoder
        self.shadow: dict[str, torch.Tensor] = {}
        self._masters: list[torch.Tensor] = []
        if cuda_graph and amp is not None:
            tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    for pname, p in mod.named_parameters(recurse=False):
                        if p.dtype != amp and p.is_floating_point() and id(p) not in tied:
                            self.shadow[f"{name}.{pname}"] = torch.empty_like(p, dtype=amp)
                            self._masters.append(p)
        self.refresh_shadow()

    def prefix(self, n: int) -> KVCache:
        """A view of the cache's first n slots (writes go to the full cache; pos is shared)."""
        layers = [{k: buf.narrow(self.slot_dim[k], 0, n) for k, buf in layer.items()} for layer in self.cache.layers]
        return KVCache(layers, self.cache.valid[:, :n], self.cache.pos)

    def refresh_shadow(self) -> None:
        if self.shadow:
            with torch.no_grad():
                torch._foreach_copy_(list(self.shadow.values()), self._masters)

    def _eager_step(self, cache: KVCache | None = None) -> torch.Tensor:
        model, kwargs = self._model(), dict(cache=cache or self.cache, positions=self.pos, last_only=True)
        if self.shadow:
            logits, _ = torch.func.functional_call(model, self.shadow, (self.idx,), kwargs)
        else:
            logits, _ = model(self.idx, **kwargs)
        self.pos.add_(1)
        return logits[:, -1]

    def step(self) -> torch.Tensor:
        """The model's forward for one token per row (eager), (R, V) logits."""
        if self.trim:
            return self._eager_step(self.prefix(int(self.cache.pos) + 1))
        return self._eager_step()

    def _full_step(self, rec: _Record, rule: _Rule) -> None:
        with _SingleRowLinear() if self.single_row else contextlib.nullcontext():
            logits = self._eager_step()
        _advance(logits, rec, rule, self.idx)

    def graph_for(self, rule: _Rule, max_new: int, vocab: int) -> tuple[object, _Record] | None:
        """The captured step for this rule (captured on first use), or None when capture failed (then the
        decoder stays eager)."""
        key = (rule, max_new)
        if key not in self.graphs:
            rec = _Record(self.idx.shape[0], max_new, vocab, rule, self.idx.device)
            try:
                self.graphs[key] = (self._capture(rec, rule), rec)
            except Exception as e:  # an op that cannot be captured: stay correct, run eagerly
                warnings.warn(f"CUDA graph capture of the decode step failed ({e!r}); decoding eagerly", stacklevel=3)
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                self.use_graph = False
                return None
        return self.graphs[key]

    def _capture(self, rec: _Record, rule: _Rule):
        # torch.compile fuses the step's many small kernels (norms, residual adds, GELU, rotary, the sampling
        # arithmetic) into a few; with a CUDA graph on top, batch-1 decoding stops being bound by kernel count.
        # Shapes are static, so it compiles once per decoder and rule (slow: tens of seconds).
        step = functools.partial(self._full_step, rec, rule)
        if self.compile:
            # At one row: coordinate-descent tuning of the generated kernels' launch configs (the GEMV
            # reductions of _SingleRowLinear only stream their weights near memory bandwidth with it) and combo
            # kernels (independent small kernels, e.g. the K and V cache writes, launched as one). H200,
            # gpt2-124m, batch 1: step 426 -> 396 -> 353 us. Not at many rows: the char-GRPO rollout
            # (128 rows) got slower with them (25.1 -> 26.0 ms with the tuning alone).
            one_row = {"coordinate_descent_tuning": True, "combo_kernels": True}
            step = torch.compile(step, dynamic=False, options=one_row if self.single_row else None)
        # Warm up on a side stream (as the PyTorch CUDA-graph docs ask), undoing everything each step changes;
        # the warm-up writes slot `cache.pos`, which the real step overwrites before anything reads it.
        # Under autocast, its weight-cast cache must be off: a cached cast would be baked into the graph as a
        # pointer to a tensor freed when the caller's autocast region ends (and stale after optimizer steps).
        device = self.cache.pos.device
        no_cache = (torch.autocast(device.type, dtype=self.amp, cache_enabled=False) if self.amp is not None
                    else contextlib.nullcontext())
        state = [self.cache.pos, self.pos, self.idx, *rec.tensors()]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with no_cache:
            with torch.cuda.stream(side):
                for _ in range(3):
                    if rec.uniform is not None:
                        rec.uniform.fill_(0.5)  # not from an RNG: capturing must not move any generator
                    step()
                    for t, s in zip(state, saved):
                        t.copy_(s)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # recorded, not run: nothing changes until replay
                step()
        return graph


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when autocast is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


# --- input checks --------------------------------------------------------------------------------------------------
def _is_integer_dtype(x) -> bool:
    """Whether a tensor's / array's dtype holds integers (bool, float and complex do not)."""
    dt = x.dtype
    if isinstance(dt, torch.dtype):
        return not (dt.is_floating_point or dt.is_complex or dt == torch.bool)
    return getattr(dt, "kind", "i") in "iu"  # numpy: signed / unsigned integers


def _token_ids(seq, what: str) -> list[int]:
    """seq as a list of Python ints. Floats (1.0 included), bools, strings and other non-integers are a
    ValueError naming `what`: a float token id is a bug upstream, not something to truncate silently."""
    if hasattr(seq, "dtype") and not _is_integer_dtype(seq):
        raise ValueError(f"{what} must hold integer token ids, got a {seq.dtype} {type(seq).__name__}")
    if hasattr(seq, "tolist"):
        seq = seq.tolist()
    out = []
    for t in seq:
        try:
            i = None if isinstance(t, bool) else operator.index(t)  # int, numpy integers, integer 0-d tensors
        except TypeError:
            i = None
        if i is None:
            raise ValueError(f"{what} must hold integer token ids, got {t!r} ({type(t).__name__})")
        out.append(i)
    return out


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if hasattr(prompts, "tolist"):  # a (B, T) tensor or array of equal-length prompts
        if prompts.ndim != 2:
            raise ValueError(f"a prompts tensor/array must be 2-D (B, T), got shape {tuple(prompts.shape)}")
        if not _is_integer_dtype(prompts):
            raise ValueError(f"prompts must hold integer token ids, got a {prompts.dtype} {type(prompts).__name__}")
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if hasattr(p, "tolist"):  # a 1-D tensor or array
            if hasattr(p, "dtype") and not _is_integer_dtype(p):
                raise ValueError(f"prompts[{i}] must hold integer token ids, got a {p.dtype} {type(p).__name__}")
            p = p.tolist()
        if isinstance(p, (int, float, str)) or not isinstance(p, Sequence):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}; "
                             "pass a list of prompts, e.g. [[1, 2, 3]]")
        p = _token_ids(p, f"prompts[{i}]")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. a BOS/EOT token)")
        if min(p) < 0 or max(p) >= vocab_size:
            bad = next(t for t in p if not 0 <= t < vocab_size)
            raise ValueError(f"prompts[{i}] has token id {bad} outside the vocabulary [0, {vocab_size})")
        out.append(p)
    return out


def _check_args(max_new_tokens, temperature, top_k, top_p, group_size, stop_strings, decode) -> None:
    # bool is an int subclass: True/False are refused explicitly (temperature=True would sample at 1.0)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), not a bool: got {temperature!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if isinstance(stop_strings, str):
        raise ValueError(f"stop_strings must be a list of strings, e.g. [{stop_strings!r}], not a bare string")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` callable (token ids -> text), e.g. decode=tokenizer.decode")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")


# --- the engine ----------------------------------------------------------------------------------------------------
class Engine:
    """A model's generation engine: owns the decoding state between calls (the KV cache, the static step
    inputs, the bf16 weight copies read under autocast and the captured CUDA graphs), so calls of one shape
    (RL rollouts every iteration, benchmarks) allocate the cache and capture their graphs once.

        engine = Engine(model)                  # allocates nothing until the first call
        gen = engine.generate(prompts, 64, temperature=1.0, group_size=4, seed=step, return_logprobs=True)
        engine.release()                         # free the cache and graphs now (e.g. before a training phase)

    The engine keeps one decoder, for the latest call's shape. A call reuses it when the rows (prompts x
    group_size), the cache length (longest prompt + max_new_tokens - 1; rounded up to a multiple of 64 with a
    CUDA graph), device, dtype, autocast dtype, cuda_graph / compile flags, the model's parameter and buffer
    addresses and MLA's absorb flag all match; any other call frees it and allocates a new one. A captured graph
    reads the weights by address: in-place updates (optimizer steps, load_state_dict into the same tensors) are
    seen by the next call; new parameter tensors (model.to(...) that moves or casts) give a new decoder. A
    re-entrant call (from an `on_token` callback, or another thread while a call is running) uses a temporary
    decoder of its own. `release()` (or garbage collection of the engine, or leaving a `with Engine(model) as e:`
    block) frees it; the engine can be used again afterwards. Keep one engine per call shape you repeat, e.g. one
    for rollouts and one for occasional evaluation samples, so they do not evict each other.
    """

    def __init__(self, model: CausalLM):
        if not isinstance(model, CausalLM):
            inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
            hint = (" (a DDP / torch.compile wrapper? pass the raw model, e.g. model.module or model._orig_mod)"
                    if isinstance(inner, CausalLM) else "")
            raise TypeError(f"Engine needs a nanolab CausalLM, got {type(model).__name__}{hint}")
        self.model = model
        self._decoder: _Decoder | None = None
        self._key: tuple | None = None

    def __repr__(self) -> str:
        dec = getattr(self, "_decoder", None)
        state = "empty" if dec is None else (f"{dec.idx.shape[0]} rows x {dec.cache.valid.shape[1]} slots, "
                                             f"{len(dec.graphs)} graph(s)")
        return f"Engine({type(self.model).__name__}, {state})"

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Free the KV cache, weight copies and CUDA graphs now (a call in progress keeps its own until it ends)."""
        self._decoder = self._key = None

    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_tokens: Sequence[int] = (), seed: int | None = None, return_logprobs: bool = False, *,
                 group_size: int = 1, stop_strings: Sequence[str] = (),
                 decode: Callable[[list[int]], str] | None = None, pad_id: int = 0,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None, compile: bool = False,
                 on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 check_every: int | None = None) -> Generation:
        """Sample up to `max_new_tokens` tokens after each prompt with the model's KV cache.

        prompts:        list of B token-id lists of any lengths >= 1 (or a (B, T) integer tensor)
        temperature:    0 = greedy; top_k / top_p filter the tempered distribution (ignored when greedy)
        stop_tokens:    a row is finished after emitting one of these (included in its completion, mask 1)
        stop_strings:   a row is finished once decode(its completion) contains one of these (needs `decode`);
                        only active rows are decoded, and only their last few tokens
        seed:           seeds a torch.Generator on the model's device (deterministic output); or pass `generator`
                        to continue one stream across calls; neither: torch's global RNG
        group_size:     n samples per prompt sharing one prefill; rows b*n .. b*n+n-1 belong to prompt b
        cuda_graph:     capture the decode step in a CUDA graph (default: True on CUDA, unavailable on CPU)
        compile:        torch.compile the decode step first (with cuda_graph only: static shapes); compiles once
                        per shape, tens of seconds, then the fastest path at small batch
        on_token:       called after every step as on_token(step, tokens (R,), mask (R,)) (streaming; syncs)
        check_every:    steps between host checks that all rows are done (default 1 on CPU, 8 on CUDA)
        pad_id:         token written after a row finishes and used for left padding (masked either way)

        Raises ValueError for an empty prompt, a token id that is not an integer (floats included) or lies
        outside the vocabulary, a bool temperature, or longest prompt + max_new_tokens exceeding the model's
        block_size. The model runs in eval mode (its training flag is restored afterwards). The returned tensors
        are the caller's own (copies, not the engine's buffers, and not inference tensors).
        """
        model = self.model
        cfg = model.config
        prompts = _check_prompts(prompts, cfg.vocab_size)
        _check_args(max_new_tokens, temperature, top_k, top_p, group_size, stop_strings, decode)
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > cfg.block_size:
            raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{longest + max_new_tokens} exceeds the model's context (block_size {cfg.block_size})")
        (pad_id,) = _token_ids([pad_id], "pad_id")
        if not 0 <= pad_id < cfg.vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {cfg.vocab_size})")
        if isinstance(stop_tokens, (int, str)):
            raise ValueError(f"stop_tokens must be a list of token ids, e.g. [{stop_tokens!r}], got {stop_tokens!r}")
        stop_tokens = _token_ids(stop_tokens, "stop_tokens")
        if any(not 0 <= t < cfg.vocab_size for t in stop_tokens):
            raise ValueError(f"stop_tokens {stop_tokens} must lie in the vocabulary [0, {cfg.vocab_size})")
        device = model.lm_head.weight.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        if compile and not cuda_graph:
            raise ValueError("compile=True needs cuda_graph=True (a CUDA model): eager CPU decoding changes shape "
                             "per step")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)

        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = self._generate(prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator,
                                     return_logprobs, group_size, list(stop_strings), decode, pad_id,
                                     (cuda_graph, compile), on_token,
                                     check_every or (8 if device.type == "cuda" else 1), device)
        finally:
            model.train(was_training)
        # Inference tensors cannot be saved for backward (e.g. as embedding indices in an RL update), and a
        # captured graph's buffers are overwritten by the next call: clone out.
        tokens, mask, stopped, lp, slp = (None if t is None else t.clone() for t in out)
        rows = [p for p in prompts for _ in range(group_size)]
        return Generation(tokens=tokens, mask=mask, lengths=mask.sum(1), stopped=stopped, prompts=rows,
                          logprobs=lp, sampling_logprobs=slp, group_size=group_size)

    def _decoder_for(self, rows: int, max_len: int, device: torch.device, dtype: torch.dtype, cuda_graph: bool,
                     compile: bool) -> _Decoder:
        """The engine's decoder if this call's key matches it, else a new one (kept; the old one is freed first);
        a temporary one when the engine's decoder is busy (a re-entrant call)."""
        model = self.model
        key = (rows, max_len, str(device), dtype, cuda_graph, compile, _autocast_dtype(device),
               tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())),
               tuple(getattr(getattr(b, "attn", None), "absorb", None) for b in model.blocks))
        dec = self._decoder
        if dec is not None and dec.in_use:
            return _Decoder(model, rows, max_len, device, dtype, cuda_graph, compile)
        if dec is not None and self._key == key:
            return dec
        dec = self._decoder = self._key = None  # drop the old cache (and graphs) before allocating the new one
        dec = _Decoder(model, rows, max_len, device, dtype, cuda_graph, compile)
        self._decoder, self._key = dec, key
        return dec

    def _generate(self, prompts, max_new, temperature, top_k, top_p, stop_tokens, generator, want_lp, n,
                  stop_strings, decode, pad_id, graph_opts, on_token, check_every, device):
        """generate() after validation, under inference mode: (tokens, mask, stopped, logprobs, sampling
        logprobs), the decoder's own buffers."""
        model = self.model
        cuda_graph, compile = graph_opts
        B, P = len(prompts), max(len(p) for p in prompts)
        R = B * n
        lens = torch.tensor([len(p) for p in prompts])
        idx = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])  # left-padded (B, P)
        n_pad = (P - lens)[:, None]
        slot = torch.arange(P)[None, :]
        # every host-to-device copy before the first launch: a copy from pageable memory waits for the stream
        valid = (slot >= n_pad).to(device)
        positions = (slot - n_pad).clamp_min(0).to(device)
        idx = idx.to(device)
        next_pos = lens.repeat_interleave(n)[:, None].to(device)  # each row's position after its prompt

        # The decode steps write slots P .. P + max_new - 2. With a CUDA graph, round the cache up to a multiple
        # of 64 (within block_size) so calls with nearby prompt lengths reuse one captured graph.
        max_len = P + max_new - 1
        if cuda_graph:
            max_len = min(-(-max_len // 64) * 64, model.config.block_size)
        # the cache holds keys/values in the dtype they are computed in (autocast's, if it is on)
        dtype = _autocast_dtype(device) or model.lm_head.weight.dtype
        dec = self._decoder_for(R, max_len, device, dtype, cuda_graph, compile)
        dec.in_use = True
        dec.refresh_shadow()  # the weights may have changed since the last call (optimizer steps)
        try:
            # prefill: the B unique prompts into the first row of each group (a strided view), then copy that
            # row's slots into the group's other rows (KVCache.repeat_interleave, in place)
            dec.cache.valid[:, P:].fill_(True)  # decode slots (a reused cache may hold an older call's padding)
            pre = _group_leaders(dec.prefix(P), n)
            pre.pos.zero_()
            pre.valid.copy_(valid)
            logits, _ = model(idx, cache=pre, positions=positions, last_only=True)
            if n > 1:
                _fill_groups(dec.prefix(P), n)
                logits = logits.repeat_interleave(n, dim=0)
            dec.pos.copy_(next_pos)
            rule = _Rule(float(temperature), top_k if temperature else None, top_p if temperature else None,
                         bool(want_lp), tuple(stop_tokens), pad_id)
            return _decode_loop(dec, logits[:, -1], max_new, rule, generator, stop_strings, decode, on_token,
                                check_every)
        finally:
            dec.in_use = False


# --- one-off generation ---------------------------------------------------------------------------------------------
def generate(model: CausalLM, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), seed: int | None = None, return_logprobs: bool = False, *,
             group_size: int = 1, stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             pad_id: int = 0, generator: torch.Generator | None = None, cuda_graph: bool | None = None,
             compile: bool = False,
             on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
             check_every: int | None = None) -> Generation:
    """One call of `Engine(model).generate(...)` (arguments and result as documented there): the cache and any
    CUDA graph live for this call only. Fine for one-off sampling; a loop of calls of one shape (RL rollouts,
    benchmarks) should keep an `Engine`, or every call allocates its cache and, on CUDA, captures (and with
    compile=True compiles) its decode step again."""
    return Engine(model).generate(
        prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, return_logprobs,
        group_size=group_size, stop_strings=stop_strings, decode=decode, pad_id=pad_id, generator=generator,
        cuda_graph=cuda_graph, compile=compile, on_token=on_token, check_every=check_every)


def generate_groups(model: CausalLM, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
                    **kwargs) -> Generation:
    """`group_size` samples per prompt from one shared prefill (GRPO-style groups); rows are prompt-major
    (row b * group_size + j is sample j of prompt b). Other arguments as in `generate`."""
    return generate(model, prompts, max_new_tokens, group_size=group_size, **kwargs)


def _group_leaders(cache: KVCache, n: int) -> KVCache:
    """View of rows 0, n, 2n, ... (the first row of each group of n) of a cache; pos is shared."""
    pick = lambda t: t.view(t.shape[0] // n, n, *t.shape[1:])[:, 0]
    return KVCache([{k: pick(buf) for k, buf in layer.items()} for layer in cache.layers], pick(cache.valid),
                   cache.pos)


def _fill_groups(cache: KVCache, n: int) -> None:
    """Copy each group's first row into its other n - 1 rows, in place."""
    for t in [buf for layer in cache.layers for buf in layer.values()] + [cache.valid]:
        g = t.view(t.shape[0] // n, n, *t.shape[1:])
        g[:, 1:].copy_(g[:, :1])


def _decode_loop(dec, logits, max_new, rule: _Rule, generator, stop_strings, decode, on_token, check_every):
    R, V, device = logits.shape[0], logits.shape[-1], logits.device
    captured = dec.graph_for(rule, max_new, V) if dec.use_graph else None
    if captured is None:
        rec = _Record(R, max_new, V, rule, device)
    else:
        graph, rec = captured
        rec.reset(rule.pad_id)
    # stop strings: host copies of active rows' tokens; a string ending in the newest token starts within its
    # last len(bytes) tokens (every token is >= 1 byte), so decoding that tail is enough
    window = max((len(s.encode()) for s in stop_strings), default=0) + 1
    history: list[list[int]] = [[] for _ in range(R)] if stop_strings else []
    can_stop = rec.stop is not None or bool(stop_strings)

    for t in range(max_new):
        rec.draw_uniforms(generator)
        if t == 0:  # the first token comes from the prefill's logits
            _advance(logits, rec, rule, dec.idx)
        elif captured is not None:
            graph.replay()
        else:
            _advance(dec.step(), rec, rule, dec.idx)
        if stop_strings:
            act, toks = rec.mask[:, t].tolist(), rec.tokens[:, t].tolist()
            done = []
            for r in range(R):
                if act[r]:
                    history[r].append(toks[r])
                    tail = decode(history[r][-window:])
                    if any(s in tail for s in stop_strings):
                        done.append(r)
            if done:
                rec.active[done] = False
        if on_token is not None:
            on_token(t, rec.tokens[:, t], rec.mask[:, t])
        if can_stop and (t + 1) % check_every == 0 and not bool(rec.active.any()):
            break
    stopped = ~rec.active  # finished on a stop token / string (rows still active ran out of max_new_tokens)
    return rec.tokens, rec.mask, stopped, rec.lp, rec.slp


# --- stops and completion texts -------------------------------------------------------------------------------------
EOT_TEXT = "<|endoftext|>"


def parse_stops(stops: Sequence[str], tokenizer, vocab_size: int) -> tuple[list[int], list[str]]:
    """Stop specifications as typed on a command line -> (stop_tokens, stop_strings) for `generate`.

    Each entry is one of:
      - digits ("13"): that token id;
      - "<|endoftext|>": the tokenizer's end-of-text token (`tokenizer.eot_token`);
      - anything else: a stop string, matched on the decoded text (so "\\n" also stops at a "\\n\\n" token).
        A backslash escape typed on a shell ("\\n", "\\t") becomes its character; text without a
        backslash is kept as is (non-ASCII included).
    Order is kept within each list. Raises ValueError for a token id outside [0, vocab_size) or for
    "<|endoftext|>" with a tokenizer that has no end-of-text token (character tokenizers).
    """
    tokens: list[int] = []
    strings: list[str] = []
    for s in stops:
        if re.fullmatch(r"\d+", s):
            t = int(s)
        elif s == EOT_TEXT:
            t = getattr(tokenizer, "eot_token", None)
            if t is None:
                raise ValueError(f"stop {s!r}: the tokenizer {getattr(tokenizer, 'name', '')!r} has no end-of-text "
                                 "token; give a token id or a stop string instead")
        else:
            # a backslash escape typed on a shell ('\n') becomes the character; other text is kept as is
            strings.append(s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s)
            continue
        if not 0 <= t < vocab_size:
            raise ValueError(f"stop {s!r}: token id {t} is outside the model's vocabulary [0, {vocab_size})")
        tokens.append(t)
    return tokens, strings


def completion_texts(tokenizer, tokens: Sequence[Sequence[int]], stopped: Sequence[bool],
                     stop_tokens: Sequence[int], stop_strings: Sequence[str]) -> list[str]:
    """Each completion's text without its stop, e.g. for a reward function.

    tokens:   each row's generated tokens (Generation.tokens_list()); stopped: Generation.stopped.tolist()
    A row that stopped on a stop token has that final token dropped before decoding; the decoded text is then
    cut at the first occurrence of each stop string in turn (so at the earliest of them). The Generation's
    tokens and mask are not changed: they still include the stop (the policy is trained to emit it).
    """
    out = []
    for toks, done in zip(tokens, stopped):
        if done and toks and toks[-1] in stop_tokens:
            toks = toks[:-1]
        text = tokenizer.decode(toks)
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        out.append(text)
    return out
