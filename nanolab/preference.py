"""Preference tuning pieces under scripts/dpo.py: its YAML schema, tokenized examples, batches that put chosen and
rejected through one forward pass, sequence log-probs, the method -> loss dispatch and the reference log-prob
cache. Pure functions and small dataclasses; the loop and the update live in the script.

    cfg = load_config("examples/dpo/shakespeare.yaml", DPOConfig)           # nanolab.config: strict keys
    data = tokenize_examples(rows, tok, cfg.training, paired=True)          # .dropped counts prompts too long
    ids, mask = collate(data.pairs_of([3, 7, 9]))                           # (2b, T): chosen rows, then rejected
    logps, lengths = sequence_logps(model, ids, mask)                       # (2b,) summed over response tokens
    losses, r_c, r_r = pair_loss(cfg.post_training, logps[:b], logps[b:], ref[:b], ref[b:], lengths[:b], ...)

Log-probs are SUMMED over the response tokens everywhere (logged as logps/chosen, logps/rejected, means over the
batch); the methods defined on per-token averages (ipo, simpo, orpo) get the token counts and average inside the
loss. Methods: the DPO family of nanolab.losses.dpo_loss ("dpo" is its "sigmoid" loss), "simpo" and "orpo"
(reference-free), "kto" (unpaired data: prompt, completion, label).

Tokenization (nanolab.preference_data.tokenize_pair's rule): prompt and response are encoded separately and
concatenated, the prompt cut to max_prompt_length keeping its end (or start), the response cut to fit max_length
keeping its start. An example is dropped (and counted) when no response token fits or the prompt is empty (the
first response token needs a position before it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import losses as L
from .errors import UsageError
from .preference_data import encode_plain

PAIRED_METHODS = ("dpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "simpo", "orpo")
METHODS = PAIRED_METHODS + ("kto",)
REFERENCE_FREE = ("simpo", "orpo")
REFERENCE_MODES = ("adapter-disabled", "precomputed")  # anything else is the path of a separate model


# ----------------------------------------------------------------------------- the YAML schema


@dataclass
class ModelEntry:
    name: str                      # the output sub-folder: {output_dir}/{name}/
    path: str                      # a nanolab checkpoint or run folder, a Hugging Face folder, or a preset name
    tokenizer: str | None = None   # a preset's tokenizer ("gpt2", or a tokenizer file/folder); others bring theirs

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")


@dataclass
class DatasetSection:
    path: str                                       # JSONL or .jsonl.gz
    format: Literal["paired", "unpaired"] = "paired"  # paired: prompt/chosen/rejected; unpaired (KTO): label
    prompt: str = "prompt"                          # column names
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    max_samples: int | None = None
    validation_split: float = 0.05                  # fraction held out (fixed split_seed); 0: no eval
    split_seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")


@dataclass
class PostTrainingSection:
    method: str = "dpo"
    beta: float = 0.1              # DPO's beta; SimPO's beta; ORPO's lambda; KTO's beta
    label_smoothing: float = 0.0   # dpo (cDPO), robust, exo_pair, simpo
    reference: str = "adapter-disabled"  # adapter-disabled | precomputed | the path of a separate reference model
    simpo_gamma: float = 0.5       # SimPO's margin gamma
    desirable_weight: float = 1.0  # KTO's lambda_D, lambda_U
    undesirable_weight: float = 1.0
    kto_kl: bool = True            # KTO: estimate the reference point z0 from mismatched pairs of the batch

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.method not in ("dpo", "robust", "exo_pair", "simpo"):
            raise ValueError(f"label_smoothing is not used by method {self.method!r}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")


@dataclass
class LoraSection:
    enabled: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None   # None: the family's default (GPT-2 c_attn; OLMo-2/Llama q_proj, v_proj)
    rslora: bool = False

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainingSection:
    epochs: float = 1.0                # passes over the training split (steps = floor(epochs * N / batch))
    max_steps: int | None = None       # overrides epochs
    batch_size: int = 8                # examples per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # an update sees batch_size x this x processes examples
    lr: float = 5e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    max_prompt_length: int | None = 128
    max_length: int = 256
    truncation: Literal["keep_end", "keep_start"] = "keep_end"  # which end of a long prompt is kept
    append_eos: bool = False           # end each response with the tokenizer's EOS token (as TRL does)
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bfloat16: autocast, float32 weights
    device: str = "auto"
    eval_batch_size: int | None = None  # default: batch_size

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr {self.lr}, min_lr {self.min_lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")


@dataclass
class FinetuningSection:
    save_steps: int = 100                  # checkpoint-{step}/ every this many steps (0: only at the end)
    save_total_limit: int | None = 2       # keep this many checkpoints (the best one too, with load_best_at_end)
    eval_steps: int = 50                   # evaluate on the validation split every this many steps and at the end
    early_stopping_patience: int | None = None  # stop after this many evals without a lower eval loss
    load_best_at_end: bool = False         # final/ holds the weights of the lowest eval loss

    def __post_init__(self):
        if self.save_steps < 0 or self.eval_steps < 0:
            raise ValueError("save_steps and eval_steps must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 or null, got {self.early_stopping_patience}")


@dataclass
class LoggingSection:
    log_steps: int = 10          # a metrics.jsonl row every this many steps
    wandb: bool = False
    wandb_project: str = "nanolab"

    def __post_init__(self):
        if self.log_steps < 1:
            raise ValueError(f"log_steps must be >= 1, got {self.log_steps}")


@dataclass
class DPOConfig:
    models: list[ModelEntry]
    dataset: DatasetSection
    post_training: PostTrainingSection = field(default_factory=PostTrainingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    finetuning: FinetuningSection = field(default_factory=FinetuningSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    output_dir: str = "out/dpo"
    seed: int = 0

    def __post_init__(self):
        if not self.models:
            raise ValueError("models: the list is empty")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: names must be unique (they name the output folders), repeated: {dup}")
        pt = self.post_training
        if (pt.method == "kto") != (self.dataset.format == "unpaired"):
            raise ValueError(f"post_training.method {pt.method!r} needs dataset.format "
                             f"{'unpaired' if pt.method == 'kto' else 'paired'}, got {self.dataset.format!r}")
        if pt.method not in REFERENCE_FREE:
            if pt.reference == "adapter-disabled" and not self.lora.enabled:
                raise ValueError("post_training.reference 'adapter-disabled' needs lora.enabled: true (or use "
                                 "'precomputed' or a separate model path for full fine-tuning)")
            if pt.reference == "precomputed" and pt.method == "kto" and pt.kto_kl:
                raise ValueError("post_training.reference 'precomputed' cannot serve KTO's KL pairs (they are built "
                                 "per batch): use 'adapter-disabled', a separate model, or kto_kl: false")


# ----------------------------------------------------------------------------- tokenized examples


def join(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], int] | None:
    """prompt + response cut to max_length (the response keeps its start), and the prompt length; None when no
    response token fits or the prompt is empty."""
    room = max_length - len(prompt)
    if not prompt or room < 1 or not response:
        return None
    return prompt + response[:room], len(prompt)


@dataclass
class Examples:
    """Tokenized examples. Paired: prompt ids and the chosen / rejected response ids. Unpaired: prompt ids, the
    completion ids (in `chosen`) and the labels. Responses are kept whole; join() cuts them per sequence."""
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]] | None
    labels: list[bool] | None
    max_length: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def sequence(self, prompt: int, response: list[int]) -> tuple[list[int], int]:
        out = join(self.prompts[prompt], response, self.max_length)
        assert out is not None  # tokenize_examples kept only examples that fit
        return out

    def pairs_of(self, idx: list[int]) -> list[tuple[list[int], int]]:
        """Paired: the chosen sequences of idx, then their rejected ones: 2 len(idx) (ids, prompt length)."""
        return ([self.sequence(i, self.chosen[i]) for i in idx] + [self.sequence(i, self.rejected[i]) for i in idx])

    def unpaired_of(self, idx: list[int], kl: bool) -> tuple[list[tuple[list[int], int]], Tensor]:
        """Unpaired: the sequences of idx, then (kl) their KL partners: the completion of idx[j] after the prompt of
        idx[j + 1], cyclically (with one example, its own prompt; a pair that leaves no room for the completion
        falls back to the example's own prompt). Returns (sequences, labels (len(idx),) bool)."""
        seqs = [self.sequence(i, self.chosen[i]) for i in idx]
        if kl:
            for j, i in enumerate(idx):
                k = idx[(j + 1) % len(idx)]
                seqs.append(join(self.prompts[k], self.chosen[i], self.max_length) or self.sequence(i, self.chosen[i]))
        return seqs, torch.tensor([self.labels[i] for i in idx], dtype=torch.bool)


def tokenize_examples(rows: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int | None, max_length: int,
                      truncation: str = "keep_end", paired: bool = True, append_eos: bool = False) -> Examples:
    """Examples of rows ({"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}); an example that
    cannot hold a response token (or has an empty prompt) is dropped and counted in .dropped. append_eos: each
    response ends with the tokenizer's EOS id (the id itself, never its text, which may encode as other tokens)."""
    if truncation not in ("keep_end", "keep_start"):
        raise UsageError(f"truncation must be 'keep_end' or 'keep_start', got {truncation!r}")
    eos = []
    if append_eos:
        if getattr(tokenizer, "eot_token", None) is None:
            raise UsageError(f"training.append_eos: the tokenizer ({tokenizer.to_dict().get('kind', '?')}) has no "
                             "EOS token")
        eos = [int(tokenizer.eot_token)]
    prompts, chosen, rejected, labels, dropped = [], [], [], [], 0
    for row in rows:
        p = encode_plain(tokenizer, row["prompt"])
        if max_prompt_length is not None and len(p) > max_prompt_length:
            p = p[len(p) - max_prompt_length:] if truncation == "keep_end" else p[:max_prompt_length]
        c = encode_plain(tokenizer, row["chosen"] if paired else row["completion"]) + eos
        r = encode_plain(tokenizer, row["rejected"]) + eos if paired else None
        if join(p, c, max_length) is None or (paired and join(p, r, max_length) is None):
            dropped += 1
            continue
        prompts.append(p)
        chosen.append(c)
        if paired:
            rejected.append(r)
        else:
            labels.append(bool(row["label"]))
    return Examples(prompts, chosen, rejected if paired else None, None if paired else labels, max_length, dropped)


def collate(seqs: list[tuple[list[int], int]], pad_id: int = 0, multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Right-padded ids (n, T) int64 and the response mask (n, T) bool (True on response tokens); T is the longest
    sequence rounded up to `multiple` (on a GPU, a few distinct shapes let the attention and matmul libraries reuse
    their plans instead of building new ones for every batch; causal attention makes the padding invisible)."""
    T = -(-max(len(ids) for ids, _ in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, n_prompt:len(s)] = True
    return ids, mask


# ----------------------------------------------------------------------------- log-probs and losses


def sequence_logps(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the response tokens of each row and their counts: ids, mask (n, T) -> (n,) float32,
    (n,) int64. One forward pass; the LM head runs only at the positions that predict a response token."""
    select = mask[:, 1:]
    logits, _ = model(ids[:, :-1], select=select)  # (N, V), N = response tokens
    lp = L.token_logprobs(logits, ids[:, 1:][select])
    rows = select.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=lp.dtype, device=lp.device).index_add_(0, rows, lp)
    return sums, select.sum(1)


def pair_loss(pt: PostTrainingSection, pol_c: Tensor, pol_r: Tensor, ref_c: Tensor | None, ref_r: Tensor | None,
              len_c: Tensor, len_r: Tensor, bco_delta: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-example losses (b,), chosen rewards, rejected rewards) of a paired method on summed log-probs."""
    if pt.method == "simpo":
        return L.simpo_loss(pol_c, pol_r, pt.beta, pt.simpo_gamma, pt.label_smoothing, len_c, len_r)
    if pt.method == "orpo":
        return L.orpo_loss(pol_c, pol_r, pt.beta, len_c, len_r)
    loss_type = "sigmoid" if pt.method == "dpo" else pt.method
    lengths = dict(chosen_lengths=len_c, rejected_lengths=len_r) if loss_type == "ipo" else {}
    return L.dpo_loss(pol_c, pol_r, ref_c, ref_r, pt.beta, loss_type, pt.label_smoothing, **lengths,
                      bco_delta=bco_delta if loss_type == "bco_pair" else None)


def lr_for(t: TrainingSection, step: int, total: int) -> float:
    """Linear warmup over warmup_steps, then cosine or linear decay to min_lr at `total`, or constant."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant" or total <= t.warmup_steps:
        return t.lr
    r = min(1.0, (step - t.warmup_steps) / (total - t.warmup_steps))
    decay = 0.5 * (1 + np.cos(np.pi * r)) if t.schedule == "cosine" else 1 - r
    return t.min_lr + float(decay) * (t.lr - t.min_lr)


# ----------------------------------------------------------------------------- the reference cache


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of a model's parameters and buffers (names, dtypes, shapes, bytes): the reference's identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name:  # the reference is the base model: adapters are disabled for it
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_reference_cache(path: Path, sizes: dict[str, int]) -> dict[str, Tensor] | None:
    """The cached reference log-probs {split: (n, 2) float32 [chosen, rejected]} if the file exists and fits."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        out = load_file(str(path))
    except Exception as e:
        raise UsageError(f"{path}: not a readable reference cache ({type(e).__name__}: {e}); delete it") from e
    if sorted(out) != sorted(sizes) or any(out[k].shape != (n, 2) for k, n in sizes.items()):
        raise UsageError(f"{path}: holds {({k: tuple(v.shape) for k, v in out.items()})}, expected "
                         f"{({k: (n, 2) for k, n in sizes.items()})}; delete it")
    return out


def save_reference_cache(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    from .fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@torch.no_grad()
def pair_logps_table(model: torch.nn.Module, ex: Examples, batch_size: int, device: torch.device,
                     autocast: Any) -> Tensor:
    """Summed response log-probs of every paired example under `model` (eval mode is the caller's): (n, 2) float32
    on the CPU, columns [chosen, rejected]. What a precomputed reference stores."""
    out = torch.empty(len(ex), 2)
    for s in range(0, len(ex), batch_size):
        idx = list(range(s, min(s + batch_size, len(ex))))
        ids, mask = collate(ex.pairs_of(idx))
        with autocast:
            logps, _ = sequence_logps(model, ids.to(device), mask.to(device))
        out[s:s + len(idx)] = logps.float().cpu().view(2, len(idx)).T
    return out


def write_final(path: Path, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any], summary: dict[str, Any],
                adapter: bool) -> None:
    """A finished run's folder: the LoRA adapters in PEFT's format (adapter=True; base_model_name_or_path =
    state["base_model"]) or the weights (model.safetensors), the tokenizer's files, state.json (+ the model config
    and the tokenizer dict, so nanolab.checkpoint.load_model_for_inference reads a full fine-tune) and
    metrics.json (the summary). Written aside and renamed: a final folder that exists is complete."""
    from safetensors.torch import save_model

    from .fileio import atomic_path, atomic_write
    from .lora import save_adapter
    from .tokenizers import write_tokenizer_files

    with atomic_path(path) as tmp:
        tmp.mkdir()
        if adapter:
            save_adapter(model, tmp, base_model_name_or_path=state.get("base_model"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        write_tokenizer_files(tokenizer, tmp)
        atomic_write(tmp / "metrics.json", json.dumps(summary, indent=1))
        atomic_write(tmp / "state.json", json.dumps({**state, "step": summary.get("step", state.get("step")),
                                                     "model_config": model.config.to_dict(),
                                                     "tokenizer": tokenizer.to_dict()}, indent=1))
