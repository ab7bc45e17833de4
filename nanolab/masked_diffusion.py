"""Masked diffusion over tokens: the noise schedules and the reverse-process sampler (scripts/denoise.py trains
the models; any nanolab family with causal=False and a mask token appended to its vocabulary).

A clean sequence x becomes z_t by replacing each token with the mask m independently with probability 1 - alpha_t:

    loglinear: alpha_t = 1 - t          w(t) = -alpha'_t / (1 - alpha_t) = 1 / t
    cosine:    alpha_t = cos(pi t / 2)   w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))

sample_mdlm runs the reverse process: start from masks (after a prompt); iteration k of K moves from
t_k = 1 - k/K to t_(k+1) and unmasks round(L (1 - alpha_(t_k))) - round(L (1 - alpha_(t_(k+1)))) positions, chosen
by low_confidence (highest probability of the drawn token) or random; block_len fills the positions block by block,
left to right (semi-autoregressive), the K steps split over the blocks. Tokens are drawn by Gumbel-max in float64
(low-precision Gumbel noise biases the draws) after temperature / top-k / top-p; temperature 0 is the argmax;
K = 1 is the one-shot sampler. A token once unmasked never changes.
"""

from __future__ import annotations

import math

import torch

from .graphs import GraphedStep
from .models import CausalLM
from .sampler import filter_logits

SCHEDULES = ("loglinear", "cosine")


def schedule(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask probability 1 - alpha_t, ELBO weight -alpha'_t / (1 - alpha_t)) for t of any shape."""
    if name == "loglinear":
        return t, 1 / t
    if name == "cosine":
        c, s = torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
        return 1 - c, (math.pi / 2) * s / (1 - c)
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")


def real_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """float32 logits with the mask token's set to -inf: the model predicts real tokens only."""
    return logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf)


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its probability under the filtered distribution) per row of logits (..., V), in float64:
    Gumbel-max, argmax(logits / temperature + g), g = -log(-log u); temperature 0 is the plain argmax."""
    logits = logits.double()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.softmax(-1).gather(-1, tok[..., None])[..., 0]
    logits = filter_logits(logits, temperature, top_k, top_p)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    tok = (logits - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
    return tok, logits.softmax(-1).gather(-1, tok[..., None])[..., 0]


def _denoiser(model: CausalLM, autocast, graphs: dict | None, device: torch.device):
    """x (n, length) -> model(x)[0], the (n, length, V + 1) logits, under `autocast`'s dtype. On CUDA, with a
    caller's dict, the forward is a GraphedStep (nanolab.graphs) kept in `graphs` across calls: after two eager
    calls it is captured and replayed, one launch per step instead of one per kernel (at small sizes most of the
    time); its output is overwritten by the next call."""
    amp = autocast.fast_dtype if isinstance(autocast, torch.autocast) and autocast._enabled else None

    def forward(x: torch.Tensor) -> tuple[torch.Tensor]:
        # no weight-cast cache: in a captured graph a cached cast would point at a tensor freed after capture
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            return (model(x)[0],)

    if graphs is None or device.type != "cuda":
        return lambda x: forward(x)[0]
    step = graphs.setdefault((id(model), model.lm_head.weight.data_ptr(), amp), GraphedStep(forward))
    return lambda x: step(x)[0]


@torch.no_grad()
def sample_mdlm(model: CausalLM, n: int, length: int, mask_id: int, steps: int, prompt: list[int] | None = None,
                remask: str = "low_confidence", block_len: int | None = None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, sched: str = "loglinear", seed: int = 0,
                autocast=None, graphs: dict | None = None) -> torch.Tensor:
    """n sequences (n, length) of real tokens: the prompt, then positions filled from masks by the reverse process
    (see the module docstring). On CUDA, pass a dict as `graphs` to replay the forward from a CUDA graph captured
    on the first call and reused by later calls of the same shape (the same samples as eager: the same kernels on
    the same inputs)."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(seed)
    prompt = list(prompt or [])
    L = length - len(prompt)
    bl = block_len or L
    blocks = [(s, min(s + bl, length)) for s in range(len(prompt), length, bl)]
    if steps < len(blocks):
        raise ValueError(f"{steps} steps cannot fill {len(blocks)} blocks (at least one step per block)")
    x = torch.full((n, length), mask_id, dtype=torch.long, device=device)
    x[:, :len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    forward = _denoiser(model, autocast, graphs, device)
    for b, (lo, hi) in enumerate(blocks):
        k_steps = steps // len(blocks) + (b < steps % len(blocks))
        ts = torch.linspace(1, 0, k_steps + 1, dtype=torch.float64)
        masked_left = (schedule(sched, ts)[0] * (hi - lo)).round().long().tolist()  # masks after each step
        masked_left[0], masked_left[-1] = hi - lo, 0
        for k in range(k_steps):
            count = masked_left[k] - masked_left[k + 1]
            if count == 0:
                continue
            logits = forward(x)[:, lo:hi]
            tok, conf = _draw(real_logits(logits, mask_id), temperature, top_k, top_p, gen)
            score = conf if remask == "low_confidence" else torch.rand(conf.shape, dtype=torch.float64,
                                                                        device=device, generator=gen)
            still = x[:, lo:hi] == mask_id
            chosen = score.masked_fill(~still, -math.inf).topk(count, dim=-1).indices
            x[:, lo:hi].scatter_(1, chosen, tok.gather(1, chosen))
    model.train(was_training)
    return x
