"""Loss functions for LM post-training: token log-probs, KL estimators, GRPO, PPO, DPO-family, SimPO, KTO, ORPO.

Pure tensor functions (torch + math only). Conventions used throughout:
  B = batch (sequences), T = sequence length, V = vocabulary.
  mask: bool or 0/1 tensor, True/1 = active token. Padded positions may hold any garbage (even inf/nan):
        every function selects with torch.where before doing arithmetic, so padding never changes a value
        or a gradient.
  logp: per-token log-probabilities of the sampled tokens, (B, T), usually float32 from token_logprobs.
  Sequence-level inputs to the preference losses are (B,) summed (or averaged, where stated) log-probs.
Statistics returned in dicts are detached tensors (no host sync here; call .item() when logging).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_shape(expected: tuple, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(expected):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def _float(x: Tensor) -> Tensor:
    """Upcast to float32 (keep float64): loss arithmetic never runs in bf16/fp16."""
    return x.double() if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- token-level basics

def token_logprobs(logits: Tensor, tokens: Tensor, ignore_index: int | None = None) -> Tensor:
    """log p(tokens) under softmax(logits), computed in float32 even for bf16 logits.

    logits (..., V), tokens (...) int64 -> (...) float32 (float64 if logits are float64).
    logp = logits[tok] - logsumexp(logits). Positions with tokens == ignore_index get 0.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match tokens shape {tuple(tokens.shape)}")
    x = _float(logits)
    ignored = tokens == ignore_index if ignore_index is not None else None
    idx = tokens.masked_fill(ignored, 0) if ignored is not None else tokens
    logp = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return logp.masked_fill(ignored, 0.0) if ignored is not None else logp


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: H = -sum_v p(v) log p(v). (..., V) -> (...) float32."""
    logp = F.log_softmax(_float(logits), dim=-1)
    p = logp.exp()
    # p == 0 (logit -inf) contributes 0; masking logp (not the product) keeps the gradient nan-free
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """sum of x over active positions. mask broadcastable to x; dim=None sums everything (keepdim ignored)."""
    m = mask.bool().expand_as(x)
    xm = torch.where(m, x, 0.0)
    return xm.sum() if dim is None else xm.sum(dim, keepdim=keepdim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """sum(x * mask) / max(sum(mask), 1) over dim (all dims if None). An all-padding slice gives 0."""
    m = mask.bool().expand_as(x)
    n = m.sum() if dim is None else m.sum(dim, keepdim=keepdim)
    return masked_sum(x, m, dim, keepdim) / n.clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False,
               unbiased: bool = True) -> Tensor:
    """Variance over active positions: sum m(x - mean)^2 / (n - 1) (or / n). Fewer than 2 active -> 0."""
    m = mask.bool().expand_as(x)
    x = torch.where(m, x, 0.0)  # garbage in padding must not reach (x - mean)^2 (nan gradients)
    mean = masked_mean(x, m, dim, keepdim=True)
    n = m.sum() if dim is None else m.sum(dim, keepdim=keepdim)
    ss = masked_sum((x - mean) ** 2, m, dim, keepdim)
    return ss / (n - 1 if unbiased else n).clamp_min(1)


# ----------------------------------------------------------------------------- KL

def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = -log r, log r = logp_ref - logp. Unbiased per-token estimate of KL(pi || ref) from samples of pi."""
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2. Biased, low variance, always >= 0."""
    return 0.5 * (logp_ref - logp) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = (r - 1) - log r (Schulman). Unbiased and >= 0.

    Near r = 1 (the common case early in training) expm1(x) - x cancels catastrophically, so for
    |x| = |log r| < 1e-2 the Taylor series sum_{k=2..6} x^k / k! is used (truncation < 1e-13 relative).
    """
    x = logp_ref - logp
    series = x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return torch.where(x.abs() < 1e-2, series, torch.expm1(x) - x)


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, logp_ref: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || ref) estimate, kind in {"k1", "k2", "k3"}; same shape as inputs."""
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logp, logp_ref)


def categorical_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Exact KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last dim.

    (..., V), (..., V) -> (...), computed from log_softmax in float32 (float64 if an input is float64).
    Terms with p(v) = 0 contribute 0 (also when q(v) = 0).
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p shape {tuple(logits_p.shape)} != logits_q shape {tuple(logits_q.shape)}")
    dt = torch.promote_types(torch.promote_types(logits_p.dtype, logits_q.dtype), torch.float32)
    logp = F.log_softmax(logits_p.to(dt), dim=-1)
    logq = F.log_softmax(logits_q.to(dt), dim=-1)
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, 0.0)).sum(-1)


# ----------------------------------------------------------------------------- GRPO

def group_advantages(rewards: Tensor, group_size: int, normalize: str | None = "group", eps: float = 1e-6,
                     mask: Tensor | None = None) -> Tensor:
    """Group-relative advantages. Rows are grouped as consecutive blocks of group_size (N = G * group_size).

    rewards (N,) per sequence, or (N, T) per token (then statistics are per position t across the group,
    over the rows active at t; mask (N, T) keeps padding out of every statistic).
        A = r - mean_group(r)                    normalize=None      (Dr. GRPO)
        A = (r - mean_group(r)) / (std_group + eps)   "group"        (GRPO)
        A = (r - mean_group(r)) / (std_batch + eps)   "batch"        std of all active rewards in the batch
    std is the unbiased (n - 1) std as in torch.std; a single active sample has std 0. Padding -> 0.
    Returns a float tensor shaped like rewards; no gradient flows (advantages are targets).
    """
    if normalize not in ("group", "batch", None):
        raise ValueError(f"normalize must be 'group', 'batch' or None, got {normalize!r}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (N,) or (N, T), got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rows N={n}")
    _check_shape(tuple(rewards.shape), mask=mask)
    r = _float(rewards.detach())
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    rg, mg = r.reshape(n // group_size, group_size, *r.shape[1:]), m.reshape(n // group_size, group_size, *r.shape[1:])
    adv = rg - masked_mean(rg, mg, dim=1, keepdim=True)
    if normalize == "group":
        adv = adv / (masked_var(rg, mg, dim=1, keepdim=True).sqrt() + eps)
    elif normalize == "batch":
        adv = adv / (masked_var(r, m).sqrt() + eps)
    return torch.where(mg, adv, 0.0).reshape(r.shape)


def _clipped_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, eps_low: float, eps_high: float):
    """Per-token -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), plus rho and where the clip is active."""
    ratio = torch.exp(logp - logp_old)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    # clipped term selected (and differs) -> zero gradient wrt logp at this token
    clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return loss, ratio, clipped


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    logp_ref: Tensor | None = None,
    kl: Tensor | None = None,
    beta: float | Tensor = 0.0,
    kl_estimator: str = "k3",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "grpo",
    max_len: int | None = None,
    num_active_tokens_global: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO clipped-surrogate loss with an optional KL-to-reference penalty.

    logp, logp_old, mask: (B, T); advantages (B,) per sequence or (B, T) per token.
    logp_old=None means one update per rollout (rho = exp(logp - logp.detach()) = 1): the loss is then
    REINFORCE with these advantages, gradient -A * grad logp per token.
        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t) + beta * KL_t,   rho_t = exp(logp - logp_old)
    KL_t is kl_estimate(logp, logp_ref, kl_estimator), or the given per-token tensor `kl` (B, T) (e.g. exact
    categorical_kl over the vocabulary). beta may be a 0-d tensor (a compiled caller whose beta changes every
    step then compiles once; a tensor beta always adds its term, also when it holds 0). eps_high defaults to
    eps_low (DAPO's clip-higher sets it larger).
    Aggregation (loss_type):
        "grpo":    mean over each sequence's active tokens, then mean over the B sequences
        "bnpo":    sum over active tokens / number of active tokens (local batch)
        "dr_grpo": sum / (B * max_len), max_len defaults to T (pass it explicitly to be padding-invariant)
        "dapo":    sum / num_active_tokens_global (default: local active count). DDP averages gradients over
                   ranks, so pass all_reduced_count / world_size to get the gradient of the global token mean.
    Returns (scalar loss, stats) with detached stats clip_frac, ratio_mean and (if a KL is available) kl_mean.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    _check_shape(tuple(logp.shape), logp_old=logp_old, mask=mask, logp_ref=logp_ref, kl=kl)
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be (B,) or (B, T) for logp {tuple(logp.shape)}")
    if logp_ref is not None and kl is not None:
        raise ValueError("pass either logp_ref or kl, not both")
    use_kl = isinstance(beta, Tensor) or beta != 0.0
    if use_kl and logp_ref is None and kl is None:
        raise ValueError(f"beta={beta} needs logp_ref or a per-token kl tensor")
    if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected grpo, bnpo, dr_grpo or dapo")
    eps_high = eps_low if eps_high is None else eps_high
    m = mask.bool()
    logp = torch.where(m, _float(logp), 0.0)  # sanitize padding before exp(): garbage must not give inf/nan grads
    logp_old = logp.detach() if logp_old is None else torch.where(m, _float(logp_old), 0.0)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    adv = torch.where(m, adv.detach().to(logp.dtype), 0.0)

    per_tok, ratio, clipped = _clipped_surrogate(logp, logp_old, adv, eps_low, eps_high)
    if logp_ref is not None:
        kl = kl_estimate(logp, torch.where(m, _float(logp_ref), 0.0), kl_estimator)
    if kl is not None:
        kl = torch.where(m, _float(kl), 0.0)
        if use_kl:
            per_tok = per_tok + beta * kl

    B, T = logp.shape
    if loss_type == "grpo":
        loss = masked_mean(per_tok, m, dim=1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_tok, m)
    elif loss_type == "dr_grpo":
        loss = masked_sum(per_tok, m) / (B * (T if max_len is None else max_len))
    else:
        denom = m.sum() if num_active_tokens_global is None else num_active_tokens_global
        loss = masked_sum(per_tok, m) / torch.as_tensor(denom, device=logp.device).clamp_min(1)

    stats = {"clip_frac": masked_mean(clipped.to(ratio.dtype), m).detach(), "ratio_mean": masked_mean(ratio, m).detach()}
    if kl is not None:
        stats["kl_mean"] = masked_mean(kl, m).detach()
    return loss, stats


# ----------------------------------------------------------------------------- PPO

@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95,
        bootstrap_value: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over masked sequences. Returns (advantages, returns), both (B, T).

    rewards, values, mask: (B, T). Walking the active tokens of a row backwards (padding anywhere is skipped,
    so left/right/interior padding never changes a result):
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next
    where V_next, A_next belong to the next *active* token; after the last active token V_next =
    bootstrap_value (B,) if given (truncated episode) else 0, and A_next = 0.
    returns = advantages + values. Padding gets 0. No gradient (targets).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, T), got shape {tuple(rewards.shape)}")
    _check_shape(tuple(rewards.shape), values=values, mask=mask)
    _check_shape(tuple(rewards.shape[:1]), bootstrap_value=bootstrap_value)
    m = mask.bool()
    r, v = torch.where(m, _float(rewards), 0.0), torch.where(m, _float(values), 0.0)
    next_v = torch.zeros_like(r[:, 0]) if bootstrap_value is None else _float(bootstrap_value).to(r.dtype)
    next_a = torch.zeros_like(r[:, 0])
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, 0.0)
        next_v, next_a = torch.where(mt, v[:, t], next_v), torch.where(mt, a, next_a)
    return adv, torch.where(m, adv + v, 0.0)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with masked mean / unbiased var over all active entries; padding -> 0.

    shift_mean=False adds the mean back (rescale only), as PPO implementations do for rewards.
    """
    _check_shape(tuple(x.shape), mask=mask)
    m = mask.bool()
    x = torch.where(m, x, 0.0)
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


def ppo_policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped policy loss, mean over active tokens.

    logp, logp_old, advantages, mask: (B, T).
        L = mean_t -min(rho_t A_t, clip(rho_t, 1 - clip_eps, 1 + clip_eps_high) A_t),  rho_t = exp(logp - logp_old)
    stats: clip_frac, ratio_mean, approx_kl = mean k3 estimate of KL(pi_old || pi) (samples come from pi_old).
    """
    _check_shape(tuple(logp.shape), logp_old=logp_old, advantages=advantages, mask=mask)
    m = mask.bool()
    logp, logp_old = torch.where(m, _float(logp), 0.0), torch.where(m, _float(logp_old), 0.0)
    adv = torch.where(m, advantages.detach().to(logp.dtype), 0.0)
    per_tok, ratio, clipped = _clipped_surrogate(logp, logp_old, adv, clip_eps,
                                                 clip_eps if clip_eps_high is None else clip_eps_high)
    stats = {
        "clip_frac": masked_mean(clipped.to(ratio.dtype), m).detach(),
        "ratio_mean": masked_mean(ratio, m).detach(),
        "approx_kl": masked_mean(kl_k3(logp_old, logp), m).detach(),
    }
    return masked_mean(per_tok, m), stats


def ppo_value_loss(values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor,
                   clip_eps: float | None = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, mean over active tokens. All inputs (B, T).

        V_clip = V_old + clip(V - V_old, -clip_eps, clip_eps)
        L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)         (clip_eps=None: 0.5 * mean (V - R)^2)
    stats: vf_clip_frac (fraction of tokens where the clipped error is the larger one).
    """
    _check_shape(tuple(values.shape), values_old=values_old, returns=returns, mask=mask)
    m = mask.bool()
    v, ret = torch.where(m, values, 0.0), torch.where(m, returns.detach(), 0.0)
    err = (v - ret) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(err, m), {"vf_clip_frac": torch.zeros((), device=v.device)}
    v_old = torch.where(m, values_old.detach(), 0.0)
    err_clip = (v_old + (v - v_old).clamp(-clip_eps, clip_eps) - ret) ** 2
    stats = {"vf_clip_frac": masked_mean((err_clip > err).to(err.dtype), m).detach()}
    return 0.5 * masked_mean(torch.maximum(err, err_clip), m), stats


@torch.no_grad()
def kl_penalized_rewards(rewards: Tensor, logp: Tensor, logp_ref: Tensor, mask: Tensor, kl_coef: float,
                         estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Fold a per-token KL penalty into the rewards: r'_t = r_t - kl_coef * KL_t, KL_t = kl_estimate(..., estimator).

    All inputs (B, T) (rewards typically hold the sequence score at the last active token).
    Returns (penalized rewards, per-token KL), both 0 on padding, no gradient.
    """
    _check_shape(tuple(rewards.shape), logp=logp, logp_ref=logp_ref, mask=mask)
    m = mask.bool()
    kl = torch.where(m, kl_estimate(torch.where(m, logp, 0.0), torch.where(m, logp_ref, 0.0), estimator), 0.0)
    return torch.where(m, _float(rewards) - kl_coef * kl, 0.0), kl


# ----------------------------------------------------------------------------- preference losses

def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable everywhere (Maechler 2012): log1p(-exp(x)) for x < -log 2,
    log(-expm1(x)) otherwise. x = 0 gives -inf; x > 0 gives nan."""
    c = -math.log(2.0)
    # clamp each branch to its own domain so the unused branch cannot produce inf/nan gradients
    return torch.where(x < c, torch.log1p(-torch.exp(x.clamp(max=c))), torch.log(-torch.expm1(x.clamp(min=c))))


# Conventions of the preference losses (dpo_loss, simpo_loss, kto_loss, orpo_loss):
#   * inputs are per-sequence log-probs of the completion, (B,) (KTO: one (B,) tensor per group);
#   * they return (per-example losses, chosen rewards, rejected rewards), rewards detached; reduce the losses
#     with .mean() and log preference_stats(chosen_rewards, rejected_rewards);
#   * length normalisation: dpo_loss takes *summed* log-probs and averages them itself when given
#     chosen_lengths / rejected_lengths (or is told averaged=True); IPO refuses to run without one of the two.
#     simpo_loss and orpo_loss are defined on per-token *averaged* log-probs: pass averages, or sums together
#     with the lengths.

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down")
_USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair")
EXO_DEFAULT_EPS = 1e-3  # exo_pair needs eps > 0 (log eps); label_smoothing=0 means this value


def _per_token(logps: Tensor, lengths: Tensor | None) -> Tensor:
    return logps if lengths is None else logps / lengths.to(logps.dtype)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def _check_pair_inputs(chosen: Tensor, chosen_name: str, chosen_lengths: Tensor | None,
                       rejected_lengths: Tensor | None, averaged: bool, **same_shape: Tensor | None) -> None:
    if chosen.dim() != 1:
        raise ValueError(f"{chosen_name} must be (B,), got shape {tuple(chosen.shape)}")
    _check_shape(tuple(chosen.shape), **same_shape, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if averaged and chosen_lengths is not None:
        raise ValueError("averaged=True says the log-probs are already per-token means: do not also pass "
                         "chosen_lengths / rejected_lengths")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def preference_stats(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """The standard logging stats of a preference loss from its (detached) implicit rewards.

    Paired (both (B,)): rewards/chosen = mean(r_c), rewards/rejected = mean(r_r), rewards/margins = mean(r_c - r_r),
    rewards/accuracies = mean(1[r_c > r_r]). Unpaired (KTO, shapes differ): the first three with
    margins = mean(r_c) - mean(r_r), no accuracies. An empty group gives nan. Detached 0-d tensors, no host sync.
    """
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    stats = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean()}
    if c.shape == r.shape:
        stats["rewards/margins"] = (c - r).mean()
        stats["rewards/accuracies"] = (c > r).to(c.dtype).mean()
    else:
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return stats


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    averaged: bool = False,
    bco_delta: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family losses on per-sequence log-probs of the policy and the reference, all (B,).

    Returns (per-example losses (B,), chosen rewards beta a (B,), rejected rewards beta b (B,)), rewards detached,
    where (names as in TRL's DPOTrainer loss_type)
        a = pi_c - ref_c,  b = pi_r - ref_r   (log-ratios of chosen / rejected),   h = a - b,   eps = label_smoothing
        "sigmoid":   -(1 - eps) log sig(beta h) - eps log sig(-beta h)
                     DPO (Rafailov et al. 2023, eq. 7); eps > 0 is conservative DPO (cDPO, Mitchell 2023)
        "robust":    ((1 - eps)(-log sig(beta h)) - eps(-log sig(-beta h))) / (1 - 2 eps)
                     rDPO, unbiased under label-flip rate eps (Chowdhury et al. 2024, eq. 8)
        "hinge":     relu(1 - beta h)                              SLiC-HF hinge (Zhao et al. 2023)
        "ipo":       (h - 1 / (2 beta))^2, on per-token-averaged log-probs  IPO (Azar et al. 2023, eq. 17)
        "exo_pair":  sig(beta h)(log sig(beta h) - log(1 - eps)) + sig(-beta h)(log sig(-beta h) - log eps)
                     pairwise EXO, KL(p_theta || p_target) with target (1 - eps, eps) (Ji et al. 2024);
                     label_smoothing = 0 means eps = EXO_DEFAULT_EPS = 1e-3 (as TRL)
        "nca_pair":  -log sig(beta a) - 1/2 log sig(-beta a) - 1/2 log sig(-beta b)   NCA (Chen et al. 2024)
        "bco_pair":  -log sig(beta a - delta) - log sig(-(beta b - delta))            BCO (Jung et al. 2024)
                     delta = bco_delta: the running mean of the rewards beta a, beta b (both) over the batches seen
                     so far, kept by the caller (TRL updates it with this batch's mean before the loss); detached
        "sppo_hard": (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2   SPPO, hard labels (Wu et al. 2024; eta = 1/beta)
        "apo_zero":  (1 - sig(beta a)) + sig(beta b)               APO-zero (D'Oosterlinck et al. 2024)
        "apo_down":  sig(beta a) + (1 - sig(beta h))               APO-down (D'Oosterlinck et al. 2024)
    (sig = sigmoid.) label_smoothing is used by sigmoid, robust and exo_pair only; any other loss_type with
    label_smoothing != 0 is an error, so is bco_delta with a loss_type other than bco_pair (and bco_pair without it).

    Length normalisation: the inputs are summed log-probs. With chosen_lengths / rejected_lengths (token counts,
    (B,), > 0) every log-prob is first divided by its length; averaged=True declares the inputs to be per-token
    means already. IPO is defined on averages and raises unless one of the two is given. The rewards use the same
    (possibly averaged) log-probs. Use preference_stats(chosen, rejected) for rewards/margins/accuracies.
    """
    _check_pair_inputs(policy_chosen, "policy_chosen", chosen_lengths, rejected_lengths, averaged,
                       policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    _check_positive(beta=beta)
    _check_label_smoothing(label_smoothing)
    if label_smoothing != 0.0 and loss_type not in _USES_LABEL_SMOOTHING:
        raise ValueError(f"label_smoothing={label_smoothing} is not used by loss_type {loss_type!r} "
                         f"(only by {', '.join(_USES_LABEL_SMOOTHING)})")
    if (bco_delta is None) == (loss_type == "bco_pair"):
        raise ValueError("loss_type 'bco_pair' needs bco_delta (the running reward mean)" if bco_delta is None
                         else f"bco_delta is only used by loss_type 'bco_pair', not {loss_type!r}")
    if loss_type == "ipo" and chosen_lengths is None and not averaged:
        raise ValueError("loss_type 'ipo' is defined on per-token-averaged log-probs: pass chosen_lengths and "
                         "rejected_lengths, or averaged=True if the inputs are already averages")

    pc, rc = _per_token(_float(policy_chosen), chosen_lengths), _per_token(_float(ref_chosen), chosen_lengths)
    pr, rr = _per_token(_float(policy_rejected), rejected_lengths), _per_token(_float(ref_rejected), rejected_lengths)
    a, b = pc - rc, pr - rr
    h = a - b
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        e = eps if eps > 0 else EXO_DEFAULT_EPS
        z = beta * h
        losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                  + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    elif loss_type == "bco_pair":
        delta = bco_delta.detach().to(a.dtype) if isinstance(bco_delta, Tensor) else bco_delta
        losses = -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
    elif loss_type == "sppo_hard":
        losses = (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    else:  # apo_down
        losses = torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * h))
    return losses, (beta * a).detach(), (beta * b).detach()


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free, on length-normalised policy log-probs, (B,) each.

        l_c = log pi(y_w | x) / |y_w|,  l_r = log pi(y_l | x) / |y_l|,   z = beta (l_c - l_r) - gamma
        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)            eps = label_smoothing (0 in the paper)
    Inputs are per-token averages, or summed log-probs together with chosen_lengths / rejected_lengths (token
    counts, (B,)) to average them here. Defaults beta = 2.0, gamma = 1.0 (gamma / beta = 0.5) are the paper's
    Llama-3-Base setting (its tuned values span beta in [2, 2.5], gamma in [0.3, 1.6]); TRL's CPOTrainer
    (loss_type="simpo") defaults to beta = 0.1, simpo_gamma = 0.5 instead. gamma may be any real (0 gives length-normalised DPO without ref).
    Returns (per-example losses, chosen rewards beta l_c, rejected rewards beta l_r), rewards detached.
    """
    _check_pair_inputs(chosen_logps, "chosen_logps", chosen_lengths, rejected_lengths, False,
                       rejected_logps=rejected_logps)
    _check_positive(beta=beta)
    _check_label_smoothing(label_smoothing)
    lc, lr = _per_token(_float(chosen_logps), chosen_lengths), _per_token(_float(rejected_logps), rejected_lengths)
    z = beta * (lc - lr) - gamma
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return losses, (beta * lc).detach(), (beta * lr).detach()


def kto_loss(
    policy_chosen: Tensor,
    ref_chosen: Tensor,
    policy_rejected: Tensor,
    ref_rejected: Tensor,
    policy_kl: Tensor | None = None,
    ref_kl: Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7-8) on unpaired sequence log-probs: desirable (Bc,), undesirable (Br,).

    The reference point z0 = max(0, mean(policy_kl - ref_kl)), detached, estimates KL(pi || ref) from the
    summed log-probs of mismatched (prompt, completion) pairs of the batch (e.g. completion i with prompt i+1),
    policy_kl, ref_kl (Bk,). Under DDP all-gather policy_kl / ref_kl first so z0 is global. Passing neither
    sets z0 = 0 (TRL's KTO without the KL estimate).
    With r = pi - ref, lambda_D = desirable_weight, lambda_U = undesirable_weight:
        loss_D = lambda_D (1 - sigmoid(beta (r_c - z0))),   loss_U = lambda_U (1 - sigmoid(beta (z0 - r_r)))
    (the paper's lambda_y - v(x, y)); the paper advises lambda_D Bc / (lambda_U Br) in [1, 4/3].
    Returns (losses = cat(loss_D, loss_U) (Bc + Br,), chosen rewards beta r_c, rejected rewards beta r_r, z0 (0-d));
    either group may be empty. preference_stats(chosen, rejected) gives the unpaired stats.
    """
    for name, t in (("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected), ("policy_kl", policy_kl)):
        if t is not None and t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    _check_shape(tuple(policy_chosen.shape), ref_chosen=ref_chosen)
    _check_shape(tuple(policy_rejected.shape), ref_rejected=ref_rejected)
    if (policy_kl is None) != (ref_kl is None):
        raise ValueError("pass both policy_kl and ref_kl (the mismatched-pair log-probs), or neither")
    _check_positive(beta=beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight}, "
                         f"{undesirable_weight}")
    r_c, r_r = _float(policy_chosen) - _float(ref_chosen), _float(policy_rejected) - _float(ref_rejected)
    if policy_kl is None:
        z0 = torch.zeros((), dtype=r_c.dtype, device=r_c.device)
    else:
        _check_shape(tuple(policy_kl.shape), ref_kl=ref_kl)
        z0 = (_float(policy_kl) - _float(ref_kl)).mean().clamp_min(0).detach()
    loss_d = desirable_weight * (1 - torch.sigmoid(beta * (r_c - z0)))
    loss_u = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r_r)))
    return torch.cat([loss_d, loss_u]), (beta * r_c).detach(), (beta * r_r).detach(), z0


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    lam: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, eq. 6-7), reference-free. Inputs (B,): per-token-averaged policy log-probs, or summed
    log-probs together with chosen_lengths / rejected_lengths (token counts) to average them here.

        log_odds = (l_c - log(1 - exp(l_c))) - (l_r - log(1 - exp(l_r)))      l = averaged log-prob
        loss = -l_c + lam * (-log sigmoid(log_odds))                         (L_SFT + lambda L_OR)
    The NLL term is the chosen per-token mean NLL per example (its batch mean weights sequences equally,
    TRL's token-weighted NLL weights tokens). l is clamped to <= -1e-12 so l = 0 (p = 1) stays finite.
    lam = 0.1 is the paper's lambda (TRL's ORPOConfig.beta). lam >= 0.
    Returns (per-example losses, chosen rewards lam * l_c, rejected rewards lam * l_r), rewards detached.
    """
    _check_pair_inputs(chosen_logps, "chosen_logps", chosen_lengths, rejected_lengths, False,
                       rejected_logps=rejected_logps)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    lc = _per_token(_float(chosen_logps), chosen_lengths).clamp(max=-1e-12)
    lr = _per_token(_float(rejected_logps), rejected_lengths).clamp(max=-1e-12)
    log_odds = (lc - log1mexp(lc)) - (lr - log1mexp(lr))
    losses = -lc - lam * F.logsigmoid(log_odds)
    return losses, (lam * lc).detach(), (lam * lr).detach()
