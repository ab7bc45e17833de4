"""Benchmark DPO preference tuning with LoRA: TRL's DPOTrainer + PEFT (the baseline) against nanolab.

Both sides train the same thing: GPT-2 (nanolab preset gpt2-124m, random init from --seed, or --hf_dir) with a LoRA
adapter (r 16, alpha 32, dropout 0) on the attention's fused q/k/v projection `c_attn`, the sigmoid DPO loss with
beta 0.1 against the adapter-disabled model as the reference, AdamW at a constant lr 5e-4 (no warm-up), 8 pairs
per step, no gradient accumulation, bf16 autocast on CUDA (fp32 weights), on Anthropic HH-RLHF harmless-base pairs
(data/prepare_preferences.py). Sequences: the prompt is cut to its last 256 tokens, then prompt + response to 512
tokens keeping the start, and the response ends with <|endoftext|> (TRL appends it to every response; nanolab's
row must do the same for the sequences to match).

What is measured, per side:
  steps/s     steady state by the wall clock of two whole runs of different lengths (--steps and --steps // 3):
              (long - short) / (t_long - t_short), so process start, imports, data preparation, model load and
              the final save cancel out. "in-run steps/s" is the rate between step ends inside the long run (after
              the first third of its steps), a cross-check.
  tokens/s    steps/s x the mean tokens per step: prompt + chosen and prompt + rejected sequences as trained (the
              prompt is counted in both), no padding, after the cut above; counted with the GPT-2 BPE by
              tokens_per_step(), the same function for both rows. TRL's own count (attention-mask tokens, its
              logged num_tokens) is printed next to it as a check.
  peak memory torch.cuda.max_memory_allocated() at the end of the long run's process (in-process for both rows).
  curve       loss, reward accuracy and margin as logged every --logging_steps steps (TRL's row: the mean over
              the steps since the previous log), to check both sides learn alike.

The TRL row runs TRL's own entry point, the `trl.scripts.dpo` module (what `trl dpo` launches through
`accelerate launch`), in a subprocess, via runpy in a small launcher that only observes: it records step-end
times and the trainer's log history, and writes them with the peak GPU memory at exit. The data reaches it as a local folder
holding train.jsonl (--dataset_name), the model as a transformers folder written by nanolab.hf.export_hf plus GPT-2
tokenizer files built from tiktoken's cached BPE files (no download).

TRL (1.16) has no max_prompt_length: it truncates prompt + response to max_length keeping the start, and drops
pairs whose prompt alone fills max_length. So the prompt cut is applied to the data file both sides read
(prepare_data), and max_length 512 then cuts the response end exactly like
nanolab.preference_data.tokenize_pair(max_prompt_length=256, max_length=512). TRL's gradient checkpointing (on by
default in DPOConfig) is turned off here: it trades speed for memory, which a 124M model does not need
(--trl_gradient_checkpointing turns it back on).

    python scripts/bench/bench_dpo.py --device cpu --quick --trl_only      # CPU smoke of the TRL path (~1 min)
    python scripts/bench/bench_dpo.py --device cuda --trl_only             # the TRL row on a GPU
    python scripts/bench/bench_dpo.py --device cuda                        # TRL row + nanolab row, ratios

Offline: TIKTOKEN_CACHE_DIR must hold tiktoken's GPT-2 files, and --hh_input (default: the first of
../shared/data/hh-rlhf/harmless-base-test.jsonl.gz and bench_gpu/data/hh-rlhf/harmless-base-test.jsonl.gz next
to the repository) the raw HH-RLHF file. Needs trl and datasets (not nanolab dependencies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HH_FILE = "harmless-base-test.jsonl.gz"
HH_CANDIDATES = (REPO.parent / "shared" / "data" / "hh-rlhf" / HH_FILE,
                 REPO / "bench_gpu" / "data" / "hh-rlhf" / HH_FILE)
# tiktoken's GPT-2 encoding is built from these two public files (its cache names them by the SHA-1 of the URL);
# they are the original GPT-2 vocabulary and merges, which transformers' GPT2Tokenizer reads as vocab.json and
# merges.txt.
GPT2_BPE_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_BPE_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
EOT = 50256  # <|endoftext|>


@dataclasses.dataclass
class Recipe:
    """The hyper-parameters both rows use."""

    batch_size: int = 8  # preference pairs per optimizer step (gradient accumulation 1)
    lr: float = 5e-4  # constant, no warm-up
    beta: float = 0.1  # sigmoid DPO loss
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("c_attn",)
    max_length: int = 512  # prompt + response
    max_prompt_length: int = 256  # applied to the data file (keep the prompt's end)
    bf16: bool = True  # autocast; weights stay fp32
    seed: int = 0
    logging_steps: int = 10
    max_grad_norm: float = 1.0  # transformers' default clipping; nanolab's row should clip the same


# --- data ----------------------------------------------------------------------------------------------------------
def gpt2_tokenizer():
    """nanolab's GPT-2 BPE (tiktoken 'gpt2'; ids equal to transformers' GPT-2 tokenizer on ordinary text)."""
    from nanolab.tokenizers import tokenizer_from_dict

    return tokenizer_from_dict({"kind": "gpt2"})


def cut_prompt(tok, prompt: str, max_prompt_length: int) -> str:
    """The prompt text cut to (at most) its last `max_prompt_length` tokens. The cut text is re-encoded and the cut
    moved right until it encodes to at most that many tokens (a cut inside a multi-byte character or a merge can
    otherwise re-encode longer), so a reader that cuts again at max_prompt_length changes nothing."""
    ids = tok.encode(prompt)
    if len(ids) <= max_prompt_length:
        return prompt
    start = len(ids) - max_prompt_length
    while True:
        text = tok.decode(ids[start:])
        if len(tok.encode(text)) <= max_prompt_length:
            return text
        start += 1


def find_hh_input() -> Path:
    for p in HH_CANDIDATES:
        if p.is_file():
            return p
    raise SystemExit(f"HH-RLHF file not found in {', '.join(map(str, HH_CANDIDATES))}: pass --hh_input")


def prepare_data(work_dir: str | os.PathLike, max_prompt_length: int = 256, max_samples: int | None = None,
                 hh_input: str | os.PathLike | None = None) -> Path:
    """Write the HH-RLHF harmless-base pairs as WORK/dpo_data/train.jsonl ({"prompt", "chosen", "rejected"}), the
    file both rows train on, and return its path. The pairs come from data/prepare_preferences.py (run as a
    subprocess, its own split rule); then each prompt is cut to its last `max_prompt_length` GPT-2 tokens
    (cut_prompt). The folder holds only that file, so `datasets.load_dataset(folder)` sees one "train" split."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "hh_pairs.jsonl"
    cmd = [sys.executable, str(REPO / "data" / "prepare_preferences.py"), "--source", "hh-rlhf",
           "--input", str(hh_input or find_hh_input()), "--out", str(raw)]
    if max_samples:
        cmd += ["--max-samples", str(max_samples)]
    subprocess.run(cmd, check=True, env=_env_with_repo(), stdout=subprocess.DEVNULL)
    tok = gpt2_tokenizer()
    out_dir = work / "dpo_data"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out = out_dir / "train.jsonl"
    with open(raw, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            row = json.loads(line)
            row["prompt"] = cut_prompt(tok, row["prompt"], max_prompt_length)
            g.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def read_rows(data_path: str | os.PathLike) -> list[dict]:
    with open(data_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pair_tokens(tok, row: dict, max_length: int, max_prompt_length: int) -> int:
    """Tokens one pair puts through the model: len(prompt + chosen) + len(prompt + rejected), each response ending
    in <|endoftext|>, the prompt cut to its last max_prompt_length tokens and each sequence cut to max_length
    keeping its start (the rule both rows train with; no padding counted)."""
    p = tok.encode(row["prompt"])[-max_prompt_length:] if max_prompt_length else tok.encode(row["prompt"])
    room = max(max_length - len(p), 0)
    n = 0
    for key in ("chosen", "rejected"):
        n += len(p) + len((tok.encode(row[key]) + [EOT])[:room])
    return n


def tokens_per_step(data_path: str | os.PathLike, recipe: Recipe) -> float:
    """Mean tokens trained per optimizer step: the mean of pair_tokens over the data file x the pairs per step."""
    tok = gpt2_tokenizer()
    counts = [pair_tokens(tok, r, recipe.max_length, recipe.max_prompt_length) for r in read_rows(data_path)]
    return recipe.batch_size * sum(counts) / len(counts)


# --- model ---------------------------------------------------------------------------------------------------------
def write_gpt2_hf_tokenizer(hf_dir: str | os.PathLike) -> None:
    """Make `hf_dir` loadable by transformers.AutoTokenizer as GPT-2's tokenizer, offline: vocab.json and merges.txt
    are the GPT-2 files tiktoken caches (read through tiktoken's cache, TIKTOKEN_CACHE_DIR), then transformers loads
    them and saves its own files (tokenizer.json, tokenizer_config.json). Checks the ids against nanolab's."""
    from tiktoken.load import read_file_cached
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    gpt2_tokenizer()  # a clear error when the BPE files are not cached
    for name, remote in GPT2_BPE_FILES.items():
        (hf_dir / name).write_bytes(read_file_cached(GPT2_BPE_BASE + remote))
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_tok.model_max_length = 1024
    hf_tok.save_pretrained(hf_dir)
    probe = "\n\nHuman: Can you help me, please?\n\nAssistant: I'm not sure I can... héllo  wörld 1234"
    ours = gpt2_tokenizer().encode(probe)
    if hf_tok(probe)["input_ids"] != ours or hf_tok.eos_token_id != EOT:
        raise RuntimeError(f"{hf_dir}: the transformers GPT-2 tokenizer written there does not match nanolab's")


def export_model(work_dir: str | os.PathLike, preset: str = "gpt2-124m", seed: int = 0, **overrides) -> Path:
    """Build the nanolab preset (random init after torch.manual_seed(seed); `overrides` change config fields) and
    write it as a transformers folder WORK/hf_model (nanolab.hf.export_hf, fp32 weights) with GPT-2 tokenizer files.
    Both rows start from this folder (nanolab's through nanolab.hf.import_hf), so from identical weights."""
    from nanolab.hf import export_hf
    from nanolab.models import build_model
    from nanolab.models import preset as make_preset

    torch.manual_seed(seed)
    model = build_model(make_preset(preset, **overrides))
    hf_dir = Path(work_dir) / "hf_model"
    export_hf(model, hf_dir)  # a GPT-2 BPE tokenizer has no files to write: the next line writes transformers'
    write_gpt2_hf_tokenizer(hf_dir)
    return hf_dir


# --- the TRL row ---------------------------------------------------------------------------------------------------
# Runs TRL's own `trl.scripts.dpo` module as __main__, unchanged; it only adds a step-end clock and, at exit, writes
# the trainer's log history, the step-end times and the peak CUDA memory to $BENCH_DPO_STATS.
LAUNCHER = r'''
import atexit, json, os, runpy, sys, time
import transformers

stats = {"step_end_s": [], "log_history": []}


class StepClock(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        stats["step_end_s"].append(time.perf_counter())


train = transformers.Trainer.train


def observed_train(self, *args, **kwargs):
    self.add_callback(StepClock())
    try:
        return train(self, *args, **kwargs)
    finally:
        stats["log_history"] = self.state.log_history


def dump():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["peak_allocated"] = torch.cuda.max_memory_allocated()
        stats["peak_reserved"] = torch.cuda.max_memory_reserved()
    with open(os.environ["BENCH_DPO_STATS"], "w") as f:
        json.dump(stats, f)


transformers.Trainer.train = observed_train
atexit.register(dump)
runpy.run_module("trl.scripts.dpo", run_name="__main__", alter_sys=True)
'''


def _env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _peft_regex(names: tuple[str, ...]) -> str:
    """One regex for the LoRA targets. TRL's ModelConfig turns a one-item --lora_target_modules list into a plain
    string, which PEFT then matches against the WHOLE module name (re.fullmatch), so a bare "c_attn" matches nothing;
    this regex matches every module whose last name is one of `names`, as a list would."""
    return r".*\.(" + "|".join(re.escape(n) for n in names) + ")"


def trl_cli_args(hf_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike, steps: int,
                 recipe: Recipe, device: str, gradient_checkpointing: bool = False) -> list[str]:
    """The command-line flags of trl.scripts.dpo (TRL 1.16: ScriptArguments + DPOConfig + ModelConfig) for the
    recipe. LoRA comes from ModelConfig's --use_peft flags; PEFT sets fan_in_fan_out itself for GPT-2's Conv1D."""
    a = ["--model_name_or_path", str(hf_dir), "--dtype", "float32",
         "--dataset_name", str(data_dir), "--dataset_train_split", "train",
         "--output_dir", str(out_dir), "--max_steps", str(steps),
         "--per_device_train_batch_size", str(recipe.batch_size), "--gradient_accumulation_steps", "1",
         "--learning_rate", str(recipe.lr), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
         "--max_grad_norm", str(recipe.max_grad_norm),
         "--beta", str(recipe.beta), "--loss_type", "sigmoid",
         "--max_length", str(recipe.max_length), "--truncation_mode", "keep_start",
         "--use_peft", "--lora_r", str(recipe.lora_r), "--lora_alpha", str(recipe.lora_alpha),
         "--lora_dropout", str(recipe.lora_dropout), "--lora_target_modules", _peft_regex(recipe.lora_targets),
         "--bf16", str(recipe.bf16 and device.startswith("cuda")),
         "--gradient_checkpointing", str(gradient_checkpointing),
         "--seed", str(recipe.seed), "--logging_steps", str(recipe.logging_steps),
         "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]
    if not device.startswith("cuda"):
        a += ["--use_cpu", "True"]
    return a


def _run_trl_once(hf_dir: Path, data_dir: Path, out_dir: Path, steps: int, recipe: Recipe, device: str,
                  gradient_checkpointing: bool) -> dict:
    """One whole TRL run in a fresh process: its wall time (launch to exit) and what the launcher recorded."""
    shutil.rmtree(out_dir, ignore_errors=True)  # no datasets cache or output left from an earlier invocation
    out_dir.mkdir(parents=True)
    launcher = out_dir / "launch_trl_dpo.py"
    launcher.write_text(LAUNCHER)
    stats_file = out_dir / "stats.json"
    env = _env_with_repo()
    # A fresh datasets cache per run: the second run must redo the tokenization the first did, or the start-up
    # costs would not cancel.
    env.update(BENCH_DPO_STATS=str(stats_file), HF_DATASETS_CACHE=str(out_dir / "datasets_cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(launcher), *trl_cli_args(hf_dir, data_dir, out_dir / "trainer_out", steps, recipe,
                                                       device, gradient_checkpointing)]
    log = out_dir / "trl.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out_dir).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"TRL run ({steps} steps) exited {rc}; the end of {log}:\n{tail}")
    stats = json.loads(stats_file.read_text())
    stats["wall_s"] = wall
    stats["steps"] = steps
    return stats


def curve_of(log_history: list[dict]) -> list[dict]:
    """The per-log training rows (not the closing summary), with the keys both rows report."""
    keys = {"loss": "loss", "rewards/accuracies": "reward_acc", "rewards/margins": "margin",
            "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected", "num_tokens": "num_tokens"}
    return [{"step": r["step"], **{ours: r[k] for k, ours in keys.items() if k in r}}
            for r in log_history if "loss" in r and "train_runtime" not in r]


def run_trl(hf_dir: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike, steps: int,
            recipe: Recipe, device: str = "cuda", short_steps: int | None = None,
            gradient_checkpointing: bool = False) -> dict:
    """The TRL row: two whole runs of TRL's DPO script (short_steps, default steps // 3, then steps), each a
    subprocess timed by the wall clock. Returns steps_per_s = (steps - short) / (t_long - t_short), the in-run rate,
    the peak CUDA memory of the long run, its logged curve and TRL's own token count per step."""
    data_dir = Path(data_path).parent
    short = short_steps or max(1, steps // 3)
    if short >= steps:
        raise ValueError(f"the short run ({short} steps) must be shorter than the long one ({steps})")
    out = Path(out_dir)
    runs = [_run_trl_once(Path(hf_dir), data_dir, out / f"trl_{n}_steps", n, recipe, device, gradient_checkpointing)
            for n in (short, steps)]
    s, lg = runs
    dt = lg["wall_s"] - s["wall_s"]
    ends = lg["step_end_s"]
    k = len(ends) // 3
    in_run = (len(ends) - 1 - k) / (ends[-1] - ends[k]) if len(ends) - 1 > k else math.nan
    curve = curve_of(lg["log_history"])
    last_tokens = next((r["num_tokens"] for r in reversed(lg["log_history"]) if "num_tokens" in r), None)
    return {"name": "TRL DPOTrainer + PEFT LoRA", "steps_short": short, "steps_long": steps,
            "wall_short_s": s["wall_s"], "wall_long_s": lg["wall_s"],
            "steps_per_s": (steps - short) / dt if dt > 0 else math.nan, "in_run_steps_per_s": in_run,
            "peak_mem_bytes": lg.get("peak_allocated"), "curve": curve,
            "logged_tokens_per_step": (last_tokens / curve[-1]["step"]) if last_tokens and curve else None}


# --- the nanolab row -----------------------------------------------------------------------------------------------
def nanolab_config(hf_dir: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike, steps: int,
                   recipe: Recipe, device: str, **post_training) -> dict:
    """scripts/dpo.py's config for the recipe: the same model, data, LoRA, loss, optimizer and sequences as TRL's
    row (EOS appended to each response, the prompt cut to its end, no validation split)."""
    return {"models": [{"name": "gpt2", "path": str(hf_dir)}],
            "dataset": {"path": str(data_path), "validation_split": 0},
            "post_training": {"method": "dpo", "beta": recipe.beta, "reference": "adapter-disabled", **post_training},
            "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout,
                     "targets": list(recipe.lora_targets)},
            "training": {"max_steps": steps, "batch_size": recipe.batch_size, "lr": recipe.lr, "schedule": "constant",
                         "warmup_steps": 0, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999,
                         "grad_clip": recipe.max_grad_norm, "max_prompt_length": recipe.max_prompt_length,
                         "max_length": recipe.max_length, "append_eos": True,
                         "dtype": "bfloat16" if recipe.bf16 else "float32", "device": device},
            "finetuning": {"save_steps": 0, "eval_steps": 0},
            "logging": {"log_steps": recipe.logging_steps},
            "output_dir": str(out_dir), "seed": recipe.seed}


def _run_nanolab_once(cfg: dict, out_dir: Path) -> dict:
    """One whole scripts/dpo.py run in a fresh process: its wall time, metrics rows and final summary."""
    import yaml

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cfg = {**cfg, "output_dir": str(out_dir / "runs")}
    config = out_dir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = out_dir / "dpo.log"
    env = {**_env_with_repo(), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(REPO / "scripts" / "dpo.py"), "--config", str(config)], stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=out_dir).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"scripts/dpo.py exited {rc}; the end of {log}:\n{log.read_text(errors='replace')[-4000:]}")
    run_dir = out_dir / "runs" / cfg["models"][0]["name"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "final" / "metrics.json").read_text())
    return {"wall_s": wall, "rows": [r for r in rows if "loss" in r], "summary": summary}


def _peak(summary: dict) -> int | None:
    return summary.get("peak_cuda_bytes") or summary.get("peak_rss_bytes")


def run_nanolab(hf_dir: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike, steps: int,
                recipe: Recipe, device: str = "cuda", short_steps: int | None = None) -> dict:
    """The nanolab row: scripts/dpo.py on nanolab_config(), timed like run_trl (two whole runs by the wall clock;
    the in-run rate from the metrics rows' time_s after the first third of the run; the peak CUDA memory of the
    long run's process, torch.cuda.max_memory_allocated, or its peak RSS on the CPU)."""
    short = short_steps or max(1, steps // 3)
    out = Path(out_dir)
    s, lg = (_run_nanolab_once(nanolab_config(hf_dir, data_path, out, n, recipe, device), out / f"nanolab_{n}_steps")
             for n in (short, steps))
    dt = lg["wall_s"] - s["wall_s"]
    rows = lg["rows"]
    k = len(rows) // 3
    in_run = ((rows[-1]["step"] - rows[k]["step"]) / (rows[-1]["time_s"] - rows[k]["time_s"])
              if len(rows) - 1 > k else math.nan)
    curve = [{"step": r["step"], "loss": r["loss"], "reward_acc": r["rewards/accuracies"],
              "margin": r["rewards/margins"], "logps_chosen": r["logps/chosen"], "logps_rejected": r["logps/rejected"]}
             for r in rows]
    per_step = [r["tokens_per_s"] * (r["time_s"] - p["time_s"]) / (r["step"] - p["step"])
                for p, r in zip(rows, rows[1:])]
    return {"name": "nanolab scripts/dpo.py (LoRA)", "steps_short": short, "steps_long": steps,
            "wall_short_s": s["wall_s"], "wall_long_s": lg["wall_s"],
            "steps_per_s": (steps - short) / dt if dt > 0 else math.nan, "in_run_steps_per_s": in_run,
            "peak_mem_bytes": _peak(lg["summary"]), "curve": curve,
            "logged_tokens_per_step": sum(per_step) / len(per_step) if per_step else None}


def memory_rows(hf_dir: Path, data_path: Path, out_dir: Path, steps: int, recipe: Recipe, device: str) -> None:
    """Peak memory of scripts/dpo.py with LoRA: no reference at all (SimPO, reference-free: one model's training
    footprint, the baseline), the adapter-disabled reference (no second copy), and a separate frozen reference
    model (the same weights loaded twice). Each a fresh process of `steps` steps."""
    configs = [("LoRA, no reference (SimPO): one model's training footprint", {"method": "simpo", "beta": 2.0}),
               ("LoRA + adapter-disabled reference (DPO)", {}),
               ("LoRA + separate frozen reference model (DPO)", {"reference": str(hf_dir)})]
    rows, base = [], None
    for label, post in configs:
        cfg = nanolab_config(hf_dir, data_path, out_dir, steps, recipe, device, **post)
        r = _run_nanolab_once(cfg, out_dir / f"memory_{len(rows)}")
        peak = _peak(r["summary"])
        base = base or peak
        rows.append((label, _gib(peak), _ratio(peak, base), f"{r['wall_s']:.1f}"))
    what = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS of the process"
    table(f"Peak memory of scripts/dpo.py ({what}), {steps} steps of {recipe.batch_size} pairs", rows,
          ("configuration", "peak GiB", "x one model", "wall s"))


# --- report --------------------------------------------------------------------------------------------------------
def table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n## {title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None or not base or math.isnan(x) or math.isnan(base):
        return "-"
    return f"{x / base:.2f}x"


def report(results: list[dict], tokens_step: float, recipe: Recipe, title: str) -> None:
    """The speed table (ratios against the first row, TRL) and the learning curves side by side."""
    base = results[0]
    rows = []
    for r in results:
        final = r["curve"][-1] if r["curve"] else {}
        rows.append((r["name"], f"{r['wall_short_s']:.1f} / {r['wall_long_s']:.1f}",
                     f"{r['steps_per_s']:.2f}", _ratio(r["steps_per_s"], base["steps_per_s"]),
                     f"{r['in_run_steps_per_s']:.2f}", f"{tokens_step * r['steps_per_s']:,.0f}",
                     "-" if r.get("logged_tokens_per_step") is None else f"{r['logged_tokens_per_step']:,.0f}",
                     _gib(r["peak_mem_bytes"]), _ratio(r["peak_mem_bytes"], base["peak_mem_bytes"]),
                     f"{final.get('loss', math.nan):.4f}", f"{final.get('reward_acc', math.nan):.3f}"))
    table(title, rows, ("row", f"wall s ({base['steps_short']} / {base['steps_long']} steps)", "steps/s",
                        "x TRL", "in-run steps/s", f"tokens/s ({tokens_step:,.0f}/step)", "logged tokens/step",
                        "peak GiB", "x TRL mem", "last loss", "last reward acc"))
    steps = sorted({c["step"] for r in results for c in r["curve"]})
    by = [{c["step"]: c for c in r["curve"]} for r in results]
    crow = []
    for s in steps:
        cells: list[str] = [str(s)]
        for b in by:
            c = b.get(s, {})
            cells += [f"{c.get(k, math.nan):.4f}" if k in c else "-" for k in ("loss", "reward_acc", "margin")]
        crow.append(tuple(cells))
    header = ["step"]
    for r in results:
        short = r["name"].split()[0]
        header += [f"{short} loss", f"{short} reward acc", f"{short} margin"]
    table(f"Learning curve (mean over each {recipe.logging_steps}-step logging window, long run)", crow,
          tuple(header))


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--steps", type=int, default=None, help="steps of the long run (default 200; --quick 6); the "
                                                           "short run has steps // 3")
    p.add_argument("--batch_size", type=int, default=None, help="pairs per step (default 8; --quick 2)")
    p.add_argument("--preset", default="gpt2-124m", help="nanolab model preset (random init)")
    p.add_argument("--seed", type=int, default=0, help="init and training seed")
    p.add_argument("--hf_dir", default=None,
                   help="start from this transformers GPT-2 folder (e.g. a checkpoint exported with "
                        "nanolab.hf.export_hf) instead of a random preset; GPT-2 tokenizer files are added to it")
    p.add_argument("--hh_input", default=None, help=f"raw HH-RLHF file (default: the first of "
                                                    f"{', '.join(str(c) for c in HH_CANDIDATES)})")
    p.add_argument("--work_dir", default=None, help="where data, model and runs go (default: a new temp folder)")
    p.add_argument("--logging_steps", type=int, default=None, help="log every N steps (default 10; --quick 1)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--trl_gradient_checkpointing", action="store_true",
                   help="keep DPOConfig's default gradient checkpointing on for the TRL row")
    p.add_argument("--trl_only", action="store_true", help="only the TRL row")
    p.add_argument("--nanolab_only", action="store_true", help="only the nanolab row (no trl needed)")
    p.add_argument("--memory", action="store_true",
                   help="also the peak-memory table: LoRA with no reference, the adapter-disabled reference, and a "
                        "separate frozen reference model (scripts/dpo.py, --memory_steps steps each)")
    p.add_argument("--memory_only", action="store_true", help="only the peak-memory table")
    p.add_argument("--memory_steps", type=int, default=5, help="steps of each memory run (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke: a 2-layer x 128 GPT-2 (the preset shrunk), 6 steps of 2 pairs over exactly "
                        "12 pairs (one epoch, so TRL's token count must equal ours), max_length 128, prompt 64, fp32; "
                        "its steps/s is noise (start-up varies by more than 4 steps cost)")
    args = p.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    recipe = Recipe(seed=args.seed, bf16=not args.fp32 and args.device.startswith("cuda"))
    overrides: dict = {}
    steps = args.steps or 200
    max_samples = None
    if args.quick:
        steps = args.steps or 6
        recipe = dataclasses.replace(recipe, batch_size=2, max_length=128, max_prompt_length=64, bf16=False,
                                     logging_steps=1)
        overrides = dict(n_layer=2, n_head=4, n_embd=128)
    if args.batch_size:
        recipe = dataclasses.replace(recipe, batch_size=args.batch_size)
    if args.logging_steps:
        recipe = dataclasses.replace(recipe, logging_steps=args.logging_steps)
    if args.quick:
        max_samples = recipe.batch_size * steps
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    work.mkdir(parents=True, exist_ok=True)

    print(f"torch {torch.__version__}, transformers {_version('transformers')}, trl {_version('trl')}, "
          f"peft {_version('peft')}, datasets {_version('datasets')}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
                                     f", {torch.get_num_threads()} threads") + f"; work dir {work}")
    print(f"recipe: {recipe}")
    t0 = time.perf_counter()
    data_path = prepare_data(work, recipe.max_prompt_length, max_samples, args.hh_input)
    tokens_step = tokens_per_step(data_path, recipe)
    n_pairs = len(read_rows(data_path))
    if args.hf_dir:
        hf_dir = Path(args.hf_dir)
        if not (hf_dir / "tokenizer.json").is_file():
            write_gpt2_hf_tokenizer(hf_dir)
        model_note = str(hf_dir)
    else:
        hf_dir = export_model(work, args.preset, args.seed, **overrides)
        model_note = f"{args.preset}{' ' + str(overrides) if overrides else ''}, random init, seed {args.seed}"
    print(f"data: {n_pairs:,} pairs -> {data_path} ({tokens_step:,.0f} tokens per step of {recipe.batch_size} "
          f"pairs); model: {model_note} -> {hf_dir}; prepared in {time.perf_counter() - t0:.1f} s")

    where = (f"{torch.cuda.get_device_name()}, bf16 autocast" if args.device.startswith("cuda") and recipe.bf16
             else args.device + ", fp32")
    if not args.memory_only:
        results = []
        if not args.nanolab_only:
            results.append(run_trl(hf_dir, data_path, work, steps, recipe, args.device,
                                   gradient_checkpointing=args.trl_gradient_checkpointing))
        if not args.trl_only:
            results.append(run_nanolab(hf_dir, data_path, work, steps, recipe, args.device))
        report(results, tokens_step, recipe,
               f"DPO + LoRA r{recipe.lora_r} on c_attn, {model_note}, {recipe.batch_size} pairs/step, max_length "
               f"{recipe.max_length} (prompt {recipe.max_prompt_length}), {where}; steady state from two whole runs")
    if args.memory or args.memory_only:
        memory_rows(hf_dir, data_path, work, args.memory_steps, recipe, args.device)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
