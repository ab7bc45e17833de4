"""GPU correctness: the CUDA-graph decode path against eager decoding and full recomputation; a training step
replayed from a CUDA graph (nanolab.graphs.GraphedStep) against the same step run eagerly.

Skipped where there is no CUDA device (CI's machines have none); run on a GPU machine with
`python -m pytest -q tests/test_gpu.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_weights
from safetensors.torch import load_file

from nanolab.graphs import GraphedStep
from nanolab.models import build_model, preset
from nanolab.optim import build_adamw, set_lr
from nanolab.sampler import Engine, generate

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAMILIES = ["gpt2-char-tiny", "olmo2-char-tiny", "mla-char-tiny"]


def _greedy_full_recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq], device="cuda"))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_graph_greedy_equals_eager_and_full_recompute(name):
    torch.manual_seed(0)
    model = build_model(preset(name, block_size=96)).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    graph = generate(model, prompts, 40, temperature=0.0, cuda_graph=True)
    eager = generate(model, prompts, 40, temperature=0.0, cuda_graph=False)
    engine = Engine(model)
    compiled = [engine.generate(prompts, 40, temperature=0.0, cuda_graph=True, compile=True) for _ in range(2)]
    assert len(engine._decoder.graphs) == 1  # the second call replayed the first call's compiled graph
    engine.release()
    assert torch.equal(graph.tokens, eager.tokens)
    assert all(torch.equal(c.tokens, eager.tokens) for c in compiled)
    with torch.no_grad():
        for r, p in enumerate(prompts):
            assert graph.tokens[r].tolist() == _greedy_full_recompute(model, p, 40)


@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_graph_sampling_is_seeded_and_logprobs_match(name):
    torch.manual_seed(0)
    model = build_model(preset(name, block_size=96)).cuda().eval()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 30, temperature=1.0, seed=3, return_logprobs=True, group_size=4)  # fresh graph
    engine = Engine(model)
    b, c = (engine.generate(prompts, 30, temperature=1.0, seed=3, return_logprobs=True, group_size=4)
            for _ in range(2))
    assert len(engine._decoder.graphs) == 1  # c replayed b's graph
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert torch.equal(a.logprobs, c.logprobs) and c.tokens.data_ptr() != b.tokens.data_ptr()
    # log-probs against one full forward over prompt + completion
    with torch.no_grad():
        for r in range(a.num_rows):
            p, c = a.prompts[r], a.tokens[r].tolist()
            logits, _ = model(torch.tensor([p + c], device="cuda"))
            ref = torch.log_softmax(logits[0, len(p) - 1:-1].float(), -1).gather(1, a.tokens[r][:, None])[:, 0]
            torch.testing.assert_close(a.logprobs[r], ref, atol=2e-4, rtol=0)


def test_bf16_autocast_training_step_decreases_loss():
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny")).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(0, 65, (8, 64), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_autocast_graph_reads_bf16_weight_copies_refreshed_per_call():
    """Under autocast the captured step reads bf16 copies of the Linear weights (no per-step casts): the same
    tokens as eager autocast decoding, and an in-place weight update reaches the copies at the next call."""
    torch.manual_seed(0)
    model = build_model(preset("olmo2-char-tiny", block_size=96)).cuda().eval()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6]]
    engine = Engine(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = generate(model, prompts, 30, temperature=0.0, cuda_graph=False)
        graph = engine.generate(prompts, 30, temperature=0.0, cuda_graph=True)
        assert torch.equal(graph.tokens, eager.tokens)
        dec = engine._decoder
        assert dec.shadow and all(t.dtype == torch.bfloat16 for t in dec.shadow.values())
        with torch.no_grad():
            model.lm_head.weight.neg_()  # untied in OLMo-2, so it has a bf16 copy
        graph2 = engine.generate(prompts, 30, temperature=0.0, cuda_graph=True)  # the same decoder and graph
        assert engine._decoder is dec and len(dec.graphs) == 1
        eager2 = generate(model, prompts, 30, temperature=0.0, cuda_graph=False)
    assert torch.equal(graph2.tokens, eager2.tokens) and not torch.equal(graph2.tokens, graph.tokens)


def test_graphed_training_step_equals_eager_steps():
    """Eight AdamW steps (capturable, tensor lr changed every step, clipping) replayed from a graph after two eager
    warm-up calls leave the parameters bitwise equal to eight eager steps on a copy; the inputs are new tensors
    every step (copied into the graph's buffers) and the returned loss is each step's own."""
    torch.manual_seed(0)
    models = [build_model(preset("gpt2-char-tiny")).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_adamw(m, 1e-3, 0.1, (0.9, 0.99), "cuda", capturable=True) for m in models]

    def make_step(model, opt):
        def step(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return (loss.detach(),)
        return step

    eager, graphed = make_step(models[0], opts[0]), GraphedStep(make_step(models[1], opts[1]), warmup=2)
    for i in range(8):
        x = torch.randint(0, 65, (8, 64), device="cuda")
        for opt in opts:
            set_lr(opt, 1e-3 * (i + 1))
        (loss_e,), (loss_g,) = eager(x, x.roll(1, 1)), graphed(x, x.roll(1, 1))
        assert torch.equal(loss_e, loss_g), i
    assert len(graphed.graphs) == 1
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


def _grpo_char_cuda(out, *flags):
    cmd = [sys.executable, str(REPO / "scripts" / "grpo_char.py"), "--batch_size", "8", "--horizon", "16",
           "--log_interval", "1", "--val_windows", "8", "--device", "cuda", "--out_dir", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_weights(out):
    return load_file(str(out / (out / "latest").read_text().strip() / "model.safetensors"))


def test_grpo_char_graph_update_resumes_exactly(tmp_path):
    """With the update replayed from a CUDA graph, checkpoints mid-run (eval, sample and save between replays) and
    a resumed run (optimizer loaded, made capturable again, graph re-captured) end bitwise where an uninterrupted
    run of the same length ends."""
    full, part = tmp_path / "full", tmp_path / "part"
    _grpo_char_cuda(full, "--iters", "8", "--eval_interval", "4")
    _grpo_char_cuda(part, "--iters", "4", "--eval_interval", "4")
    _grpo_char_cuda(part, "--iters", "8", "--eval_interval", "4", "--resume")
    w_full, w_part = _final_weights(full), _final_weights(part)
    assert all(torch.equal(w_full[k], w_part[k]) for k in w_full)


def test_grpo_char_graph_update_equals_eager_update(tmp_path):
    """scripts/grpo_char.py with the update replayed from a CUDA graph logs the same metrics and ends with the same
    weights as with --no-graph_update (the same kernels, eagerly launched)."""
    runs = {}
    keep = ("reward", "kl", "entropy", "loss", "clip_frac", "adv_abs", "val_ce")
    for flag in ("--graph_update", "--no-graph_update"):
        out = tmp_path / flag.strip("-")
        rows = _grpo_char_cuda(out, "--iters", "6", "--eval_interval", "0", "--ppo_epochs", "2", flag)
        runs[flag] = ([{k: r[k] for k in keep if k in r} for r in rows], _final_weights(out))
    (rows_g, w_g), (rows_e, w_e) = runs["--graph_update"], runs["--no-graph_update"]
    assert len(rows_g) == len(rows_e) >= 7
    assert rows_g == rows_e
    assert w_g.keys() == w_e.keys() and all(torch.equal(w_g[k], w_e[k]) for k in w_g)


def test_grpo_char_deterministic_compiled_runs_are_bitwise_equal(tmp_path):
    """--deterministic makes two --compile runs (compiled decode step, loss and policy; graphed update) of the same
    seed log the same metrics and end with the same weights (without it, two compiled runs of the default 4 x 128
    model parted after 4 iterations on an H200)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        rows = _grpo_char_cuda(out, "--iters", "6", "--eval_interval", "0", "--n_layer", "1", "--n_embd", "32",
                               "--n_head", "2", "--compile", "--deterministic")
        runs.append(([{k: v for k, v in r.items() if k != "s_per_iter"} for r in rows], _final_weights(out)))
    (rows_a, w_a), (rows_b, w_b) = runs
    assert rows_a == rows_b and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_equals_ddp_on_two_gpus_with_nccl(data_dir, tmp_path):
    """train.py on 2 GPUs (NCCL), float32 (no mixed-precision policy): --fsdp equals DDP within 1e-5 in every
    logged loss and in the final weights (the same per-rank batches and kernels; only the reductions differ)."""
    flags = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
             "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1",
             "--gradient_accumulation_steps", "2", "--grad_clip", "0.5", "--sample_len", "0", "--device", "cuda",
             "--dtype", "float32"]
    env = {**os.environ, "NANOLAB_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    rows, weights = {}, {}
    for name in ("fsdp", "ddp"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "scripts" / "train.py"), *flags, "--out_dir", str(out)] + (["--fsdp"] if name == "fsdp" else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        rows[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights[name] = checkpoint_weights(out)
    assert (tmp_path / "fsdp" / "step000006" / ".metadata").is_file()  # sharded, as FSDP writes
    assert [r["step"] for r in rows["fsdp"]] == [r["step"] for r in rows["ddp"]]
    for a, b in zip(rows["fsdp"], rows["ddp"]):
        for key in ("loss", "val_loss"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) <= 1e-5, (key, a, b)
    for k, t in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][k], t, atol=1e-5, rtol=0, msg=k)
