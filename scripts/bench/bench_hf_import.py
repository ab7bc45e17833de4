"""Benchmark nanolab.hf.import_hf against transformers' from_pretrained on a 1B-class checkpoint folder (CPU).

The bench writes a synthetic folder in the shape of meta-llama/Llama-3.2-1B (its published config.json; random
bf16 weights, 1,235,814,400 parameters = 2.47 GB, tied head, two safetensors shards with an index) to a temporary
folder, then loads it, each load in a fresh subprocess so the peak resident set (VmHWM) is that load's:

  nanolab        import_hf(folder)                                        bf16 kept, model built on the meta device
  transformers   AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)

Per loader, the best (and median load time) of --reps runs (alternating, the folder hot in the page cache after writing): load seconds,
the process' peak RSS, the RSS the load added (peak minus RSS after the imports and before the call); then every
weight is read once (a max over each parameter, what any first forward does) and the time and peak RSS are taken
again, with the anonymous / file-backed split of the resident memory. This matters for the comparison:
transformers 5 memory-maps the safetensors files and leaves bf16 weights as views of the mapping, so its load reads
almost nothing and the file pages become resident (file-backed, reclaimable) only when used; nanolab reads every
tensor into its own (anonymous) memory during the load, with plain reads that leave no file pages mapped.
A probe checksum of a few weights must agree between the two.

    python scripts/bench/bench_hf_import.py [--reps 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# meta-llama/Llama-3.2-1B config.json as published on the Hugging Face Hub
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
PROBES = ["model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "model.layers.15.self_attn.k_proj.weight",
          "model.norm.weight"]


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """transformers' LlamaForCausalLM tensor names and shapes for config `c` (tied: no lm_head.weight)."""
    d, hd, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                   p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                   p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                   p + "mlp.down_proj.weight": (d, inter)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def write_folder(folder: str, config: dict, shards: int = 2) -> int:
    """config.json + `shards` safetensors files of random bf16 weights + the index; returns the weight bytes."""
    from safetensors.torch import save_file

    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = hf_shapes(config)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    names, weight_map, done, s = list(shapes), {}, 0, 0
    g = torch.Generator().manual_seed(0)
    while names:  # fill shard s up to 1/shards of the bytes (the embedding alone is a fifth of them)
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors, budget = {}, total * (s + 1) / shards
        while names and (done < budget or not tensors):
            n = names.pop(0)
            tensors[n] = torch.empty(shapes[n], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            done += tensors[n].numel() * 2
            weight_map[n] = file
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
        s += 1
    assert s == shards, f"wrote {s} shards, wanted {shards}"
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


CHILD = r"""
import json, sys, time
import torch

def mem():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))}

which, folder, probes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if which == "nanolab":
    from nanolab.hf import import_hf
    from nanolab.models import build_model, preset
    with torch.device("meta"):  # torch's meta-device machinery is loaded once per process: count it as an import
        build_model(preset("llama-char-tiny"))
    load = lambda: import_hf(folder)
else:
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
before = mem()
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
after = mem()
t1 = time.perf_counter()
with torch.no_grad():  # first use: every weight read once (a lazily memory-mapped loader reads the file only now)
    for p in model.parameters():
        p.max()
touch = time.perf_counter() - t1
used = mem()
if which == "nanolab":
    from nanolab.hf import _names_for
    names = {theirs: ours for ours, (theirs, _) in _names_for(model.config).items()}
    sd = model.state_dict()
    get = lambda n: sd[names[n]]
else:
    sd = model.state_dict()
    get = lambda n: sd[n]
probe = [float(get(n).float().flatten()[::997][:64].sum()) for n in probes]
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"seconds": seconds, "touch": touch, "peak": after["VmHWM"], "added": after["VmHWM"] - before["VmRSS"],
                  "used_peak": used["VmHWM"], "anon": used["RssAnon"], "file": used["RssFile"], "probe": probe,
                  "dtypes": dtypes, "params": sum(p.numel() for p in model.parameters())}))
"""


def run_child(which: str, folder: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    out = subprocess.run([sys.executable, "-c", CHILD, which, folder, json.dumps(PROBES)], capture_output=True,
                         text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{which} load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="fresh-process loads per loader (best time, min peak)")
    p.add_argument("--keep", default=None, help="write the folder here and keep it (default: a temp folder)")
    args = p.parse_args()
    if not os.path.exists("/proc/self/status"):
        sys.exit("this bench reads peak RSS from /proc/self/status (Linux)")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads")
    root = args.keep or tempfile.mkdtemp(prefix="bench_hf_import_")
    folder = os.path.join(root, "llama3.2-1b-synthetic")
    try:
        if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
            size = sum(torch.Size(s).numel() * 2 for s in hf_shapes(LLAMA32_1B).values())
        else:
            t0 = time.perf_counter()
            size = write_folder(folder, LLAMA32_1B)
            print(f"wrote {folder}: {gb(size)} GB of bf16 weights in 2 shards, {time.perf_counter() - t0:.1f} s")
        runs: dict[str, list[dict]] = {"nanolab": [], "transformers": []}
        for _ in range(args.reps):
            for which in runs:
                r = run_child(which, folder)
                runs[which].append(r)
                print(f"  {which}: load {r['seconds']:.2f} s + first read {r['touch']:.2f} s, peak "
                      f"{gb(r['peak'])} GB after the load, {gb(r['used_peak'])} GB after the read, {r['dtypes']}")
        best = {w: {"seconds": min(r["seconds"] for r in rs), "total": min(r["seconds"] + r["touch"] for r in rs),
                    "median": statistics.median(r["seconds"] for r in rs),
                    "peak": min(r["peak"] for r in rs), "added": min(r["added"] for r in rs),
                    "used_peak": min(r["used_peak"] for r in rs), "anon": rs[-1]["anon"], "file": rs[-1]["file"],
                    "probe": rs[-1]["probe"], "params": rs[-1]["params"]} for w, rs in runs.items()}
        ours, theirs = best["nanolab"], best["transformers"]
        agree = ours["probe"] == theirs["probe"] and ours["params"] == theirs["params"]
        print(f"\n## import of a Llama-3.2-1B-shaped folder ({gb(size)} GB bf16, 2 shards), best of {args.reps}\n")
        print("| loader | load (s) | median load (s) | load + first read of every weight (s) | peak RSS after load (GB) "
              "| RSS added by the load (GB) | peak RSS after the read (GB) | then anon / file-backed (GB) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in (("nanolab import_hf", ours), ("transformers from_pretrained", theirs)):
            print(f"| {name} | {r['seconds']:.2f} | {r['median']:.2f} | {r['total']:.2f} | {gb(r['peak'])} | "
                  f"{gb(r['added'])} | {gb(r['used_peak'])} | {gb(r['anon'])} / {gb(r['file'])} |")
        print(f"| ratio transformers / nanolab | {theirs['seconds'] / ours['seconds']:.2f}x | "
              f"{theirs['median'] / ours['median']:.2f}x | "
              f"{theirs['total'] / ours['total']:.2f}x | {theirs['peak'] / ours['peak']:.2f}x | "
              f"{theirs['added'] / ours['added']:.2f}x | {theirs['used_peak'] / ours['used_peak']:.2f}x | |")
        print(f"\nweights {gb(size)} GB; RSS added / weights: nanolab {ours['added'] / size:.2f}, transformers "
              f"{theirs['added'] / size:.2f}; same parameters and probe values: {agree}")
        if not agree:
            sys.exit("the two loaders disagree on the weights")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
