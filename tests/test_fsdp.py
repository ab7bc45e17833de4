"""FSDP2 on CPU (gloo, 2 processes): training equals one process, sharded checkpoints resume on 2 and on 1 rank,
convert to a single file, and a rank killed mid-run makes the other exit non-zero instead of hanging."""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_weights, reversal_rows
from safetensors.torch import load_file

from nanolab.checkpoint import read_state
from nanolab.errors import UsageError
from nanolab.models import build_model, preset

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
CONVERT = REPO / "scripts" / "convert_checkpoint.py"
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--eval_iters", "2",
        "--log_interval", "1", "--warmup_iters", "2", "--learning_rate", "3e-3", "--sample_len", "0"]
RUN = TINY + ["--max_iters", "6", "--eval_interval", "3", "--gradient_accumulation_steps", "2", "--grad_clip", "0.5"]


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train():
    return load_script(TRAIN, "nanolab_train_script_fsdp")


def env(data_dir):
    return {**os.environ, "NANOLAB_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(data_dir, *args, nproc: int = 2, script: Path = TRAIN) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), str(script), *args], env=env(data_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def assert_close_runs(a, b, atol):
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(a), losses(b), strict=True):
        assert s1 == s2
        assert (l1 is None) == (l2 is None) and (l1 is None or abs(l1 - l2) <= atol), (s1, l1, l2)
        assert (v1 is None) == (v2 is None) and (v1 is None or abs(v1 - v2) <= atol), (s1, v1, v2)
    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def back_to_step3(src: Path, dst: Path) -> None:
    """A copy of a finished run folder as if it had stopped right after saving step 3."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(dst / "step000006")
    (dst / "latest").write_text("step000003\n")


def test_fsdp_matches_one_process_resumes_on_2_and_1_ranks_and_converts(train, data_dir, tmp_path, monkeypatch,
                                                                        one_thread):
    """2 FSDP ranks x batch 2 (accumulation 2, clipping) == 1 process x batch 4 within 1e-5; the sharded step-3
    checkpoint resumed on 2 ranks and on 1 rank ends within 1e-6 of the uninterrupted FSDP run; the converter's
    single file holds the same weights and reads back through load_checkpoint."""
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    proc = torchrun(data_dir, *RUN, "--batch_size", "2", "--fsdp", "--checkpoint_interval", "3", "--out_dir",
                    str(fsdp))
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    assert train.main(RUN + ["--batch_size", "4", "--out_dir", str(single)]) == 0
    out = finish(proc)
    assert "2 x cpu (FSDP)" in out
    assert sorted(p.name for p in (fsdp / "step000006").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"]
    assert not list(fsdp.glob(".tmp-*"))
    assert len(losses(fsdp)) == 6 + 3
    assert_close_runs(fsdp, single, 1e-5)

    # resume the sharded step-3 checkpoint on 2 ranks (FSDP) and, meanwhile, on 1 process (global batch kept: 4)
    two, one = tmp_path / "resume2", tmp_path / "resume1"
    back_to_step3(fsdp, two)
    back_to_step3(fsdp, one)
    proc = torchrun(data_dir, *RUN, "--fsdp", "--out_dir", str(two), "--resume")
    assert train.main(RUN + ["--fsdp", "--out_dir", str(one), "--resume"]) == 0
    out = finish(proc)
    assert "resuming from" in out
    assert read_state(one)["meaning"]["batch_size"] == 4 and read_state(one)["args"]["batch_size"] == 4
    assert read_state(two)["args"]["batch_size"] == 2
    assert_close_runs(two, fsdp, 1e-6)
    assert_close_runs(one, fsdp, 1e-6)

    # the converter: a single-file checkpoint (with optimizer) of the same weights
    conv = load_script(CONVERT, "nanolab_convert_script")
    assert conv.main([str(fsdp), str(tmp_path / "conv"), "--optimizer"]) == 0
    got = load_file(str(tmp_path / "conv" / "step000006" / "model.safetensors"))
    ref = checkpoint_weights(fsdp)
    for name, t in got.items():
        assert torch.equal(t, ref[name]), name
    assert {p.name for p in (tmp_path / "conv" / "step000006").iterdir()} == {
        "model.safetensors", "optimizer.pt", "state.json"}
    assert conv.main([str(single), str(tmp_path / "conv2")]) == 2  # already single-file: one-line error


def test_denoise_fsdp_matches_ddp_and_resumes_sharded(data_dir, tmp_path):
    """denoise.py --fsdp (MDLM, accumulation 2, clipping) on 2 ranks equals DDP on 2 ranks (the same per-rank noise
    streams) within 1e-5, writes sharded checkpoints, and its sharded step-3 checkpoint resumed on 2 ranks ends
    within 1e-6 of the uninterrupted run."""
    script = REPO / "scripts" / "denoise.py"
    flags = [*TINY[:-2], "--max_iters", "6", "--eval_interval", "3", "--gradient_accumulation_steps", "2",
             "--grad_clip", "0.5", "--batch_size", "2", "--objective", "mdlm", "--eval_t_draws", "2"]
    sharded, ddp, two = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resume2"
    out = finish(torchrun(data_dir, *flags, "--fsdp", "--out_dir", str(sharded), script=script))
    assert "2 x cpu (FSDP)" in out
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (sharded / "step000006").iterdir()}
    finish(torchrun(data_dir, *flags, "--out_dir", str(ddp), script=script))
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (sharded, ddp)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] and len(rows[0]) == 6 + 3
    for a, b in zip(*rows):
        for key in ("loss", "val_nelbo_bits_per_char"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) <= 1e-5, (key, a, b)
    wa, wb = checkpoint_weights(sharded), checkpoint_weights(ddp)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0, msg=name)
    back_to_step3(sharded, two)
    assert "resuming from" in finish(torchrun(data_dir, *flags, "--fsdp", "--out_dir", str(two), "--resume",
                                              script=script))
    again = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [r["step"] for r in rows[0]]
    assert all(abs(a.get("loss", 0) - b.get("loss", 0)) <= 1e-6 for a, b in zip(again, rows[0]))
    for name, t in checkpoint_weights(two).items():
        torch.testing.assert_close(t, wa[name], atol=1e-6, rtol=0, msg=name)


def test_sft_fsdp_matches_one_process(data_dir, tmp_path, monkeypatch):
    """sft.py --fsdp, full fine-tuning: 2 ranks x 2 examples x accumulation 2 == 1 process x 4 x 2 within 1e-5
    (the loss is normalised by the step's response tokens, so the split does not matter): losses, val losses and
    the final weights; 9 validation examples leave one rank without a last batch (it must still take part in
    every sharded forward)."""
    rows = [json.dumps(r) + "\n" for r in reversal_rows(60)]
    (tmp_path / "train.jsonl").write_text("".join(rows[:51]))
    (tmp_path / "val.jsonl").write_text("".join(rows[51:]))
    flags = ["--data", str(tmp_path / "train.jsonl"), "--val_data", str(tmp_path / "val.jsonl"), "--init_from",
             "scratch", "--preset", "gpt2-char-tiny", "--n_layer", "2", "--n_embd", "16", "--n_head", "2",
             "--tokenizer", "char", "--dtype", "float32", "--device", "cpu", "--max_iters", "4", "--eval_interval",
             "2", "--log_interval", "1", "--learning_rate", "3e-3", "--warmup_iters", "1", "--grad_clip", "0.5",
             "--gradient_accumulation_steps", "2"]
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    proc = torchrun(data_dir, *flags, "--batch_size", "2", "--fsdp", "--out_dir", str(sharded),
                    script=REPO / "scripts" / "sft.py")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sft = load_script(REPO / "scripts" / "sft.py", "nanolab_sft_fsdp")
    assert sft.main(flags + ["--batch_size", "4", "--out_dir", str(single)]) == 0
    assert "2 x cpu (FSDP)" in finish(proc)
    assert (sharded / "step000004" / ".metadata").is_file()
    rows_ = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (sharded, single)]
    assert [r["step"] for r in rows_[0]] == [r["step"] for r in rows_[1]]
    assert sum("val_loss" in r for r in rows_[0]) == 3
    for a, b in zip(*rows_):
        for key in ("loss", "val_loss", "grad_norm"):
            assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) <= 1e-5, (key, a, b)
    wa, wb = checkpoint_weights(sharded), checkpoint_weights(single)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0, msg=name)
    with pytest.raises(SystemExit) as e:  # LoRA's adapter-only and merged checkpoints are single files
        sft.main(flags + ["--fsdp", "--lora_r", "4", "--out_dir", str(tmp_path / "lora")])
    assert e.value.code == 2


def test_fsdp_composes_with_gradient_checkpointing(data_dir, tmp_path):
    """train.py --fsdp --gradient_checkpointing (dropout on: the recompute must replay the same masks) gives the
    run without recomputation, within 1e-6, on 2 gloo ranks."""
    flags = [*RUN, "--batch_size", "2", "--fsdp", "--dropout", "0.1"]
    plain, recompute = tmp_path / "plain", tmp_path / "recompute"
    finish(torchrun(data_dir, *flags, "--out_dir", str(plain)))
    finish(torchrun(data_dir, *flags, "--gradient_checkpointing", "--out_dir", str(recompute)))
    assert read_state(recompute)["args"]["gradient_checkpointing"] is True
    assert_close_runs(recompute, plain, 1e-6)


def test_fsdp_mixed_precision_follows_the_run_dtype(monkeypatch):
    """run.wrap_model gives FSDP2 bf16 parameters only to a bf16 run on CUDA: --dtype float32 stays float32."""
    import contextlib

    from nanolab import fsdp as fsdp_mod
    from nanolab import run

    seen = []
    monkeypatch.setattr(fsdp_mod, "shard_model", lambda model, device, mp, offload: seen.append(mp) or model)
    for device, dtype, want in (("cuda", "bfloat16", True), ("cuda", "float32", False), ("cpu", "float32", False)):
        env = run.Env(0, 0, 2, torch.device(device), dtype, contextlib.nullcontext())
        run.wrap_model(torch.nn.Linear(2, 2), env, fsdp=True)
        assert seen[-1] is want, (device, dtype)


def test_resume_batch_follows_world_size(train):
    saved = {"path": "x", "world_size": 2, "meaning": {"batch_size": 4}}
    args = argparse.Namespace(batch_size=12, flags_given=[])
    assert train.fit_batch_to_world(args, 4, saved) == 4 and args.batch_size == 2
    args = argparse.Namespace(batch_size=3, flags_given=["batch_size"])
    with pytest.raises(UsageError, match="global batch 8"):
        train.fit_batch_to_world(args, 2 * 1 + 1, saved)
    with pytest.raises(UsageError, match="does not divide"):
        train.fit_batch_to_world(argparse.Namespace(batch_size=1, flags_given=[]), 3, saved)
    args = argparse.Namespace(batch_size=12, flags_given=[])
    assert train.fit_batch_to_world(args, 2, saved) == 12 and args.batch_size == 12  # same world: open_run's rules


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_lost_rank_makes_the_other_exit_nonzero(data_dir, tmp_path, how):
    """Two ranks started without torchrun (no agent to tear the group down). SIGKILL rank 1 mid-training: rank 0's
    next collective fails at once (connection reset). SIGSTOP it (a hung peer): rank 0's collective times out after
    --dist_timeout. Either way rank 0 exits non-zero well within 60 s instead of hanging."""
    out_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in (0, 1):
        e = {**env(data_dir), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
             "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(
            [sys.executable, str(TRAIN), *TINY, "--max_iters", "100000", "--eval_interval", "0", "--batch_size",
             "2", "--fsdp", "--dist_timeout", "6", "--out_dir", str(out_dir)],
            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 60
        metrics = out_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in procs), "a rank exited before training"
            assert time.time() < deadline, "no training steps after 60 s"
            time.sleep(0.05)
        procs[1].send_signal(how)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode not in (0, None), err[-2000:]
        assert time.time() - t0 < (5 if how == signal.SIGKILL else 40)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_lora_under_fsdp_matches_one_process(tmp_path, one_thread):
    """apply_lora before fully_shard: only the adapters train (frozen base weights stay bitwise equal), and 2
    ranks x 2 rows equal 1 process x 4 rows within 1e-5 (losses, clipped gradient norm, every parameter)."""
    worker = REPO / "tests" / "fsdp_lora_worker.py"
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(tmp_path / "two.pt")], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    load_script(worker, "nanolab_fsdp_lora_worker").main(str(tmp_path / "one.pt"))  # meanwhile, in this process
    finish(proc)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two["trainable"] == one["trainable"] and all("lora_" in n for n in one["trainable"])
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"])) < 1e-5
    assert abs(two["norm"] - one["norm"]) < 1e-5
    torch.manual_seed(0)
    for name, t in one["params"].items():
        torch.testing.assert_close(two["params"][name], t, atol=1e-5, rtol=0, msg=name)
    base = {n: t for n, t in one["params"].items() if "lora_" not in n}
    fresh = dict(build_model(preset("gpt2-char-tiny", vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=16,
                                    dropout=0.0)).named_parameters())
    for name, t in base.items():  # the same init (seed 0 before build_model), untouched by training
        assert torch.equal(t, fresh[name]) and torch.equal(two["params"][name], fresh[name]), name
