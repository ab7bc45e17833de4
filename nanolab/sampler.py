"""The KV-cache sampler: one generation engine for RL rollouts, evaluation, scripts/sample.py and the server.

    gen = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.8, top_k=50,
                   stop_tokens=(eot,), seed=0, return_logprobs=True)
    gen.tokens (R, N) int64, gen.mask (R, N) bool, gen.lengths (R,), gen.logprobs (R, N) float32, gen.tokens_list()
    gen = generate_groups(model, prompts, group_size=4, max_new_tokens=64)    # RL: rows b*n .. b*n+n-1 share prompt b

How a batch is run (R rows, N = max_new_tokens, P = longest prompt):
  - ragged prompts are left-padded to P; cache.valid masks the padding slots and each row gets its own positions
    (slot - n_pad), so a row computes exactly what it would alone;
  - one batched prefill writes the P prompt slots and gives the first token's logits (last_only=True); for group
    sampling the B unique prompts are prefilled once and their cache rows copied n times (what
    KVCache.repeat_interleave does, written in place so a captured CUDA graph keeps reading the same buffers);
  - then N - 1 one-token decode steps. Each step is shape-static (the cache's write slot is a device tensor), so on
    CUDA it is captured once in a CUDA graph and replayed; sampling runs outside the graph;
  - a row that emits a stop token (or whose decoded text gains a stop string) is finished: its later tokens are
    `pad_id` with mask 0, it keeps being fed pad tokens (rows never interact), and the loop ends once all are done.

Log-probs of each sampled token are returned two ways:
    logprobs          = log_softmax(raw logits)[token]                 (float32; the model's own distribution: RL)
    sampling_logprobs = log_softmax(filter(logits / temperature))[token]   (the distribution actually sampled from;
                                                                            0 for greedy, a point mass)
"""

from __future__ import annotations

import contextlib
import math
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
    logq = torch.log_softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    # E = -log U (faster than exponential_ on CPU); clamped > 0 so a zero-probability token is never 0/0 = NaN
    e = torch.rand(logq.shape, device=logq.device, generator=generator).log_().neg_().clamp_(min=1e-30)
    return (logq.exp() / e).argmax(-1), logq


# --- the decode state: cache, static inputs, optional CUDA graph ----------------------------------------------------
class _Decoder:
    """A cache plus static (R, 1) input buffers for the token and its position; `step()` runs one decode step and
    returns the (R, V) logits.

    With a CUDA graph the step is captured on first use and replayed afterwards: it reads `idx`, `pos`, the cache
    buffers, `cache.valid` and `cache.pos` by address, so all of them are only ever updated in place. Without one
    (CPU), each step attends to the written prefix of the cache only (a view of its first pos + 1 slots): the
    cache is read from memory every step, so this saves up to half the attention time over a generation.
    """

    def __init__(self, model: CausalLM, rows: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 cuda_graph: bool, compile: bool = False):
        self._model = weakref.ref(model)  # not a strong ref: the registry below is keyed weakly by the model
        self.cache = model.make_cache(rows, max_len, device=device, dtype=dtype)
        self.idx = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.use_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.in_use = False
        # which dim of each cache buffer indexes slots: the one that changes with max_len
        a, b = model._cache_layout(1, 2), model._cache_layout(1, 3)
        self.slot_dim = {k: next(i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y) for k in a}
        self.trim = device.type == "cpu"
        # torch.compile fuses the step's many small kernels (norms, residual adds, GELU, rotary) into a few; with
        # a CUDA graph on top, batch-1 decoding stops being bound by kernel count. Shapes are static, so it compiles
        # once per decoder (slow: tens of seconds), which pays off for long or repeated generation.
        self.step_fn = torch.compile(self._eager_step, dynamic=False) if compile else self._eager_step

    def prefix(self, n: int) -> KVCache:
        """A view of the cache's first n slots (writes go to the full cache; pos is shared)."""
        layers = [{k: buf.narrow(self.slot_dim[k], 0, n) for k, buf in layer.items()} for layer in self.cache.layers]
        return KVCache(layers, self.cache.valid[:, :n], self.cache.pos)

    def _eager_step(self, cache: KVCache | None = None) -> torch.Tensor:
        logits, _ = self._model()(self.idx, cache=cache or self.cache, positions=self.pos, last_only=True)
        self.pos.add_(1)
        return logits[:, -1]

    def _capture(self) -> None:
        # Warm up on a side stream (as the PyTorch CUDA-graph docs ask), undoing each step's pos advance; the
        # warm-up writes slot `cache.pos`, which the real step overwrites before anything reads it.
        # Under autocast, its weight-cast cache must be off: a cached cast would be baked into the graph as a
        # pointer to a tensor freed when the caller's autocast region ends (and stale after optimizer steps).
        device = self.cache.pos.device
        amp = _autocast_dtype(device)
        no_cache = (torch.autocast(device.type, dtype=amp, cache_enabled=False) if amp is not None
                    else contextlib.nullcontext())
        cache_pos, pos = self.cache.pos.clone(), self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with no_cache:
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step_fn()
                    self.cache.pos.copy_(cache_pos)
                    self.pos.copy_(pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # recorded, not run: pos and the cache are untouched until replay
                self.logits = self.step_fn()
        self.graph = graph

    def step(self) -> torch.Tensor:
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # an op that cannot be captured: stay correct, run eagerly
                warnings.warn(f"CUDA graph capture of the decode step failed ({e!r}); decoding eagerly", stacklevel=3)
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                self.use_graph, self.graph, self.logits = False, None, None
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if self.trim:
            return self._eager_step(self.prefix(int(self.cache.pos) + 1))
        return self.step_fn()


# One reusable decoder per model (the latest shape), so repeated calls of one shape (RL iterations, benchmarks)
# capture their CUDA graph once. Keyed by the model's parameter and buffer addresses (a graph reads them by address:
# in-place updates such as optimizer steps are seen, new tensors or modules need a new decoder) and MLA's absorb flag.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release_decoder(model: CausalLM) -> None:
    """Free the cache (and CUDA graph) `generate` keeps for `model` between calls, e.g. before training."""
    _DECODERS.pop(model, None)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when autocast is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _decoder_for(model: CausalLM, rows: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 cuda_graph: bool, compile: bool = False) -> _Decoder:
    key = (rows, max_len, str(device), dtype, cuda_graph, compile, _autocast_dtype(device),
           tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())),
           tuple(getattr(getattr(b, "attn", None), "absorb", None) for b in model.blocks))
    entry = _DECODERS.get(model)
    if entry is not None and entry[0] == key and not entry[1].in_use:
        return entry[1]
    if entry is not None and not entry[1].in_use:
        del _DECODERS[model]  # drop the old cache before allocating the new one
    dec = _Decoder(model, rows, max_len, device, dtype, cuda_graph, compile)
    if entry is None or not entry[1].in_use:
        _DECODERS[model] = (key, dec)
    return dec


# --- generate ------------------------------------------------------------------------------------------------------
def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if hasattr(prompts, "tolist"):  # a (B, T) tensor or array of equal-length prompts
        if prompts.ndim != 2:
            raise ValueError(f"a prompts tensor/array must be 2-D (B, T), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if hasattr(p, "tolist"):
            p = p.tolist()
        if isinstance(p, (int, str)) or not isinstance(p, Sequence):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}; "
                             "pass a list of prompts, e.g. [[1, 2, 3]]")
        p = list(map(int, p))
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. a BOS/EOT token)")
        if min(p) < 0 or max(p) >= vocab_size:
            bad = next(t for t in p if not 0 <= t < vocab_size)
            raise ValueError(f"prompts[{i}] has token id {bad} outside the vocabulary [0, {vocab_size})")
        out.append(p)
    return out


def _check_args(max_new_tokens, temperature, top_k, top_p, group_size, stop_strings, decode) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` callable (token ids -> text), e.g. decode=tokenizer.decode")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")


def generate(model: CausalLM, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), seed: int | None = None, return_logprobs: bool = False, *,
             group_size: int = 1, stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             pad_id: int = 0, generator: torch.Generator | None = None, cuda_graph: bool | None = None,
             compile: bool = False,
             on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
             check_every: int | None = None) -> Generation:
    """Sample up to `max_new_tokens` tokens after each prompt with the model's KV cache.

    prompts:        list of B token-id lists of any lengths >= 1 (or a (B, T) tensor)
    temperature:    0 = greedy; top_k / top_p filter the tempered distribution (ignored when greedy)
    stop_tokens:    a row is finished after emitting one of these (included in its completion, mask 1)
    stop_strings:   a row is finished once decode(its completion) contains one of these (needs `decode`);
                    only active rows are decoded, and only their last few tokens
    seed:           seeds a torch.Generator on the model's device (deterministic output); or pass `generator`
                    to continue one stream across calls; neither: torch's global RNG
    group_size:     n samples per prompt sharing one prefill; rows b*n .. b*n+n-1 belong to prompt b
    cuda_graph:     capture the decode step in a CUDA graph (default: True on CUDA, unavailable on CPU)
    compile:        torch.compile the decode step first (with cuda_graph only: static shapes); compiles once per
                    shape, tens of seconds, then the fastest path at small batch
    on_token:       called after every step as on_token(step, tokens (R,), mask (R,)) (streaming; syncs)
    check_every:    steps between host checks that all rows are done (default 1 on CPU, 8 on CUDA)
    pad_id:         token written after a row finishes and used for left padding (masked either way)

    Raises ValueError for an empty prompt, a token outside the vocabulary, or longest prompt + max_new_tokens
    exceeding the model's block_size. The model runs in eval mode (its training flag is restored afterwards).
    """
    cfg = model.config
    prompts = _check_prompts(prompts, cfg.vocab_size)
    _check_args(max_new_tokens, temperature, top_k, top_p, group_size, stop_strings, decode)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.block_size:
        raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{longest + max_new_tokens} exceeds the model's context (block_size {cfg.block_size})")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {cfg.vocab_size})")
    stop_tokens = [int(t) for t in stop_tokens]
    if any(not 0 <= t < cfg.vocab_size for t in stop_tokens):
        raise ValueError(f"stop_tokens {stop_tokens} must lie in the vocabulary [0, {cfg.vocab_size})")
    device = model.lm_head.weight.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if compile and not cuda_graph:
        raise ValueError("compile=True needs cuda_graph=True (a CUDA model): eager CPU decoding changes shape per step")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator,
                            return_logprobs, group_size, list(stop_strings), decode, pad_id, (cuda_graph, compile), on_token,
                            check_every or (8 if device.type == "cuda" else 1), device)
    finally:
        model.train(was_training)
    # Inference tensors cannot be saved for backward (e.g. as embedding indices in an RL update): clone out.
    tokens, mask, stopped, lp, slp = (None if t is None else t.clone() for t in out)
    rows = [p for p in prompts for _ in range(group_size)]
    return Generation(tokens=tokens, mask=mask, lengths=mask.sum(1), stopped=stopped, prompts=rows, logprobs=lp,
                      sampling_logprobs=slp, group_size=group_size)


def generate_groups(model: CausalLM, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
                    **kwargs) -> Generation:
    """`group_size` samples per prompt from one shared prefill (GRPO-style groups); rows are prompt-major
    (row b * group_size + j is sample j of prompt b). Other arguments as in `generate`."""
    return generate(model, prompts, max_new_tokens, group_size=group_size, **kwargs)


def _generate(model, prompts, max_new, temperature, top_k, top_p, stop_tokens, generator, want_lp, n,
              stop_strings, decode, pad_id, graph_opts, on_token, check_every, device):
    cuda_graph, compile = graph_opts
    B, P = len(prompts), max(len(p) for p in prompts)
    R = B * n
    lens = torch.tensor([len(p) for p in prompts])
    idx = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])  # left-padded (B, P)
    n_pad = (P - lens)[:, None]
    slot = torch.arange(P)[None, :]
    valid = (slot >= n_pad).to(device)
    positions = (slot - n_pad).clamp_min(0).to(device)
    idx = idx.to(device)

    # The decode steps write slots P .. P + max_new - 2. With a CUDA graph, round the cache up to a multiple of 64
    # (within block_size) so calls with nearby prompt lengths reuse one captured graph.
    max_len = P + max_new - 1
    if cuda_graph:
        max_len = min(-(-max_len // 64) * 64, model.config.block_size)
    # the cache holds keys/values in the dtype they are computed in (autocast's, if it is on)
    dtype = _autocast_dtype(device) or model.lm_head.weight.dtype
    dec = _decoder_for(model, R, max_len, device, dtype, cuda_graph, compile)
    dec.in_use = True
    try:
        # prefill: the B unique prompts into the first row of each group (a strided view), then copy that row's
        # slots into the group's other rows (KVCache.repeat_interleave, in place)
        dec.cache.valid[:, P:].fill_(True)  # decode slots (a reused cache may hold an older call's padding there)
        pre = _group_leaders(dec.prefix(P), n)
        pre.pos.zero_()
        pre.valid.copy_(valid)
        logits, _ = model(idx, cache=pre, positions=positions, last_only=True)
        if n > 1:
            _fill_groups(dec.prefix(P), n)
            logits = logits.repeat_interleave(n, dim=0)
        dec.pos.copy_(lens.repeat_interleave(n)[:, None])
        return _decode_loop(dec, logits[:, -1], max_new, temperature, top_k, top_p, stop_tokens, generator,
                            want_lp, stop_strings, decode, pad_id, on_token, check_every)
    finally:
        dec.in_use = False


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


def _decode_loop(dec, logits, max_new, temperature, top_k, top_p, stop_tokens, generator, want_lp,
                 stop_strings, decode, pad_id, on_token, check_every):
    R, device = logits.shape[0], logits.device
    tokens = torch.full((R, max_new), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(R, max_new, dtype=torch.bool, device=device)
    lp = torch.zeros(R, max_new, dtype=torch.float32, device=device) if want_lp else None
    slp = torch.zeros(R, max_new, dtype=torch.float32, device=device) if want_lp else None
    active = torch.ones(R, dtype=torch.bool, device=device)
    stop_t = torch.tensor(stop_tokens, dtype=torch.long, device=device) if stop_tokens else None
    pad = torch.full((R,), pad_id, dtype=torch.long, device=device)
    # stop strings: host copies of active rows' tokens; a string ending in the newest token starts within its
    # last len(bytes) tokens (every token is >= 1 byte), so decoding that tail is enough
    window = max((len(s.encode()) for s in stop_strings), default=0) + 1
    history: list[list[int]] = [[] for _ in range(R)] if stop_strings else []
    can_stop = stop_t is not None or bool(stop_strings)

    tok = None
    for t in range(max_new):
        if t > 0:
            dec.idx.copy_(tok[:, None])
            logits = dec.step()
        tok, logq = sample_logits(logits, temperature, top_k, top_p, generator)
        tok = torch.where(active, tok, pad)
        tokens[:, t] = tok
        mask[:, t] = active
        if want_lp:
            plain = temperature == 1.0 and top_k is None and (top_p is None or top_p >= 1.0)
            raw = logq if plain else torch.log_softmax(logits.float(), dim=-1)
            lp[:, t] = torch.where(active, raw.gather(1, tok[:, None])[:, 0], 0.0)
            if logq is not None:  # greedy: a point mass, log q = 0 (slp stays zero)
                slp[:, t] = torch.where(active, logq.gather(1, tok[:, None])[:, 0], 0.0)
        if stop_t is not None:
            active = active & ~(tok[:, None] == stop_t).any(-1)
        if stop_strings:
            act, toks = mask[:, t].tolist(), tok.tolist()
            done = []
            for r in range(R):
                if act[r]:
                    history[r].append(toks[r])
                    tail = decode(history[r][-window:])
                    if any(s in tail for s in stop_strings):
                        done.append(r)
            if done:
                active[done] = False
        if on_token is not None:
            on_token(t, tok, mask[:, t])
        if can_stop and (t + 1) % check_every == 0 and not bool(active.any()):
            break
    stopped = ~active  # finished on a stop token / string (rows still active ran out of max_new_tokens)
    return tokens, mask, stopped, lp, slp
