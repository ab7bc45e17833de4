"""What the three model families share: the KV cache (the one interface to the sampler), configs, and the
`CausalLM` base with the forward contract, init, counting and cache creation.

A cache holds, per layer, preallocated buffers with the batch first and one slot per token (what a slot holds is the
family's business: K/V for GPT-2 and OLMo-2, a latent and a rope key for MLA). Slot s of row b is either a real token
or left padding (`valid[b, s]`); a query at slot t sees real keys at slots <= t, and always itself, so a padding
query never has an empty softmax (no NaN can leak into the cache). `pos` is a device tensor, so a decode step writes
with `index_copy_` and never branches on Python ints: the same step can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .layers import BIDIRECTIONAL, lm_loss


class ConfigBase:
    """JSON round-trip and validation helpers for the per-family config dataclasses."""

    family: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def replace(self, **overrides):
        return dataclasses.replace(self, **overrides)

    def _check_positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__}.{n} must be a positive integer, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class KVCache:
    """Per-layer decode state for a batch of rows.

    layers[i]: dict of buffers, batch first, e.g. {"k": (B, H_kv, L, hd), "v": ...} or {"latent": (B, L, r), ...}
    valid:     (B, L) bool, False at left-padding slots
    pos:       () int64 tensor, the number of slots written so far (the same for every row)
    """

    layers: list[dict[str, torch.Tensor]]
    valid: torch.Tensor
    pos: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def slots_and_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (T,) the next T tokens are written to, and the attention mask (B, 1, T, L) they use."""
        slots = self.pos + torch.arange(T, device=self.valid.device)
        key_slots = torch.arange(self.max_len, device=self.valid.device)
        causal = key_slots[None, :] <= slots[:, None]  # (T, L)
        itself = key_slots[None, :] == slots[:, None]
        mask = (self.valid[:, None, :] & causal[None]) | itself[None]  # (B, T, L)
        return slots, mask[:, None]

    def advance(self, T: int) -> None:
        self.pos.add_(T)

    def repeat_interleave(self, n: int) -> KVCache:
        """Each row repeated n times in place of one (row b -> rows b*n .. b*n+n-1): a group shares its prefill."""
        layers = [{k: v.repeat_interleave(n, dim=0) for k, v in layer.items()} for layer in self.layers]
        return KVCache(layers, self.valid.repeat_interleave(n, dim=0), self.pos.clone())

    def bytes_per_token(self) -> int:
        """Bytes stored per cached token (per row), summed over layers."""
        total = 0
        for layer in self.layers:
            for buf in layer.values():
                total += buf.element_size() * buf.numel() // (buf.shape[0] * self.max_len)
        return total


_NO_CACHE = ("this model has causal=False (bidirectional attention): a KV cache, and so the sampler, needs a causal "
             "model; sample a denoising model with scripts/denoise.py's sample_mdlm")


class CausalLM(nn.Module):
    """What the three families share: the `forward` contract, init, parameter and FLOP counts, cache creation.

    forward(idx (B, T), targets=None, cache=None, positions=None, last_only=False) -> (logits, loss)
      - without a cache: causal attention over idx, positions 0..T-1 (config.causal=False: every position attends
        to every position, the bidirectional encoder of BERT-style and masked-diffusion LMs; a cache is an error);
      - with a cache: idx is written at the cache's next T slots and attends to everything cached so far;
        positions (B, T) default to the slot indices (pass them for left-padded rows);
      - last_only returns logits for the last position only, (B, 1, V) (what sampling needs);
      - attn_mask, a bool (B, 1, T, T) (True = may attend; without a cache only) replaces the causal mask: packed
        rows pass causal & same-example masks (with positions restarting at 0 per example) so no token attends
        across examples;
      - select, a bool (B, T) mask, returns logits for the selected positions only, (N, V) in row-major order
        (what scoring a response needs: the LM head and its (B, T, V) output are the largest tensors);
      - loss is the mean cross-entropy over targets != -100, or None without targets.
    Subclasses set self.config, self.wte, self.blocks, self.ln_f, self.lm_head and implement `_embed`,
    `_cache_layout`, `_attention_flops_per_token`.
    Setting `model.gradient_checkpointing = True` recomputes each block's activations in the backward pass
    (torch.utils.checkpoint, training without a cache only): less memory for about one more forward.
    """

    gradient_checkpointing = False

    def _init_weights(self) -> None:
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)  # GPT-2: scale residual projections by 1/sqrt(2L)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Token (and position) embedding; returns x (B, T, d) and what each block needs for positions."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, last_only: bool = False, select: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None):
        B, T = idx.shape
        causal = getattr(self.config, "causal", True)
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            mask, slots = attn_mask, None
            if mask is None and not causal:
                mask = BIDIRECTIONAL
            if positions is None:
                positions = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T): broadcast, cheap backward
        else:
            if not causal:
                raise ValueError(_NO_CACHE)
            slots, mask = cache.slots_and_mask(T)
            if positions is None:
                positions = slots.expand(B, T)
        x, pos_info = self._embed(idx, positions)
        recompute = self.gradient_checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, pos_info, None, None, mask, use_reentrant=False)
            else:
                x = block(x, pos_info, None if cache is None else cache.layers[i], slots, mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        elif select is not None:
            x = x[select]
        logits = self.lm_head(self.ln_f(x))
        loss = lm_loss(logits, targets) if targets is not None else None
        return logits, loss

    # --- caches -------------------------------------------------------------------------------------------
    def _cache_layout(self, batch_size: int, max_len: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one layer's cache buffers."""
        raise NotImplementedError

    def make_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens (default: block_size)."""
        if not getattr(self.config, "causal", True):
            raise ValueError(_NO_CACHE)
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ValueError(f"cache of {max_len} tokens exceeds the model's block_size {self.config.block_size}")
        ref = self.lm_head.weight
        device = device or ref.device
        dtype = dtype or ref.dtype
        layout = self._cache_layout(batch_size, max_len)
        layers = [{k: torch.zeros(shape, device=device, dtype=dtype) for k, shape in layout.items()}
                  for _ in range(self.config.n_layer)]
        valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        return KVCache(layers, valid, torch.zeros((), dtype=torch.long, device=device))

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes cached per token per row, all layers: what decoding keeps in memory for each token."""
        elt = torch.empty((), dtype=dtype).element_size()
        per_layer = sum(math.prod(s) for s in self._cache_layout(1, 1).values())
        return per_layer * self.config.n_layer * elt

    # --- counting ------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once). non_embedding drops position and input-token tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if hasattr(self, "wpe"):
                n -= self.wpe.weight.numel()
            if self.lm_head.weight is not self.wte.weight:
                n -= self.wte.weight.numel()
        return n

    def _attention_flops_per_token(self, seq_len: int) -> int:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix / nanoGPT:
        6 N + attention, with N the parameters used in matmuls (no position table, no untied input table)."""
        seq_len = seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + self._attention_flops_per_token(seq_len)
