"""scripts/train.py end to end on a tiny model: DDP equivalence, exact resume after SIGKILL, NaN stop, --help."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--eval_iters", "2",
        "--log_interval", "1", "--warmup_iters", "5", "--learning_rate", "3e-3"]




@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("nanolab_train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod




def env(data_dir):
    return {**os.environ, "NANOLAB_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def weights(run_dir):
    return load_file(str(Path(run_dir) / (Path(run_dir) / "latest").read_text().strip() / "model.safetensors"))


def test_help(train, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--max_iters", "--gradient_accumulation_steps", "--resume", "--init_from", "--keep_last", "--wandb"):
        assert flag in out


def test_ddp_two_ranks_match_one_process(train, data_dir, tmp_path, monkeypatch, one_thread):
    """2 gloo ranks x batch 2 == 1 process x batch 4: same logged losses (all-reduced) and final weights."""
    common = TINY + ["--max_iters", "6", "--eval_interval", "3", "--sample_len", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN),
         *common, "--batch_size", "2", "--out_dir", str(tmp_path / "ddp")],
        env=env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    assert train.main(common + ["--batch_size", "4", "--out_dir", str(tmp_path / "single")]) == 0
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "2 x cpu" in out

    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [r[0] for r in ddp] == [r[0] for r in single] and len(ddp) == 9  # 6 train rows + 3 evals
    for (_, l1, v1), (_, l2, v2) in zip(ddp, single):
        assert (l1 is None) == (l2 is None) and (l1 is None or abs(l1 - l2) < 1e-5)
        assert (v1 is None) == (v2 is None) and (v1 is None or abs(v1 - v2) < 1e-5)
    w_ddp, w_single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name, t in w_single.items():
        torch.testing.assert_close(w_ddp[name], t, atol=1e-5, rtol=0)


def test_sigkill_then_resume_is_bitwise_exact(train, data_dir, tmp_path, monkeypatch, one_thread):
    """Kill a run at a random moment after its first checkpoint; --resume must end bitwise equal to a run
    that was never interrupted (dropout on: the RNG states are restored too)."""
    args = TINY + ["--max_iters", "200", "--eval_interval", "50", "--checkpoint_interval", "25", "--dropout", "0.1",
                   "--sample_len", "4", "--keep_last", "2", "--batch_size", "4"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args, "--out_dir", str(killed)], env=env(data_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    try:
        deadline = time.time() + 90
        while not (killed / "latest").exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 90 s"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.2))
        assert proc.poll() is None, "training finished before it could be killed; raise --max_iters"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    step_killed = int((killed / "latest").read_text().strip()[4:])
    assert 25 <= step_killed < 200

    # The uninterrupted reference runs meanwhile-free, in this process, with the same arguments.
    assert train.main(args + ["--out_dir", str(tmp_path / "ref")]) == 0
    assert train.main(args + ["--out_dir", str(killed), "--resume"]) == 0
    ref, got = weights(tmp_path / "ref"), weights(killed)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"{name} differs after resume from step {step_killed}"
    assert losses(killed) == losses(tmp_path / "ref")  # metrics truncated on resume: no duplicated rows
    assert len([p for p in killed.iterdir() if p.name.startswith("step")]) == 2  # --keep_last 2


def test_nan_stops_and_keeps_last_good_checkpoint(train, data_dir, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    base = TINY + ["--max_iters", "40", "--eval_interval", "0", "--batch_size", "2", "--sample_len", "0"]
    # Divergence for real: an absurd learning rate, before any checkpoint exists.
    rc = train.main(base + ["--learning_rate", "1e6", "--warmup_iters", "0", "--checkpoint_interval", "5",
                            "--out_dir", str(tmp_path / "lr")])
    assert rc == 1 and "NaN/inf" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "lr").iterdir() if p.name.startswith(("step", ".tmp"))]

    # A NaN loss from the 13th training forward on: steps 1..12 are fine, checkpoints at 5 and 10 stay.
    import nanolab.models.base as base_mod

    calls, real = {"n": 0}, base_mod.lm_loss

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] >= 13 else loss

    monkeypatch.setattr(base_mod, "lm_loss", poisoned)
    out = tmp_path / "nan"
    rc = train.main(base + ["--checkpoint_interval", "5", "--log_interval", "5", "--out_dir", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "step000010" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step")) == ["step000005", "step000010"]
    assert (out / "latest").read_text().strip() == "step000010"


def test_init_from_checkpoint_and_hf_folder(train, data_dir, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    base = TINY + ["--batch_size", "2", "--sample_len", "0", "--eval_interval", "4"]
    src = tmp_path / "src"
    assert train.main(base + ["--max_iters", "4", "--out_dir", str(src)]) == 0
    capsys.readouterr()
    assert train.main(base + ["--max_iters", "4", "--out_dir", str(src)]) == 2  # never silently mix two runs
    assert "already holds checkpoints" in capsys.readouterr().err
    # dims have no effect with --init_from: an error, not silently ignored
    with pytest.raises(SystemExit) as e:
        train.main(base + ["--max_iters", "0", "--init_from", str(src), "--out_dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "--n_layer, --n_head, --n_embd has no effect with --init_from" in capsys.readouterr().err
    # --init_from a run folder: step 0 of the new run evaluates exactly the source's final weights
    base = base[6:]  # without --n_layer/--n_head/--n_embd
    assert base[0] == "--block_size"
    assert train.main(base + ["--max_iters", "0", "--init_from", str(src), "--out_dir", str(tmp_path / "ft")]) == 0
    assert losses(tmp_path / "ft")[0][2] == losses(src)[-1][2]

    from nanolab.checkpoint import load_model_for_inference
    from nanolab.hf import export_hf

    model, _, _ = load_model_for_inference(src)
    export_hf(model, str(tmp_path / "hf"))
    assert train.main(base + ["--max_iters", "0", "--init_from", str(tmp_path / "hf"),
                              "--out_dir", str(tmp_path / "ft_hf")]) == 0
    assert abs(losses(tmp_path / "ft_hf")[0][2] - losses(src)[-1][2]) < 1e-5


def test_text_file_replaces_shakespeare(train, tmp_path, one_thread, capsys):
    """--text_file: any text, split 90/10, its own characters as the vocabulary; a bad file is one error."""
    text = "".join(f"{a}+{b}={a + b}\n" for a in range(40) for b in range(40))
    (tmp_path / "arith.txt").write_text(text)
    args = TINY + ["--batch_size", "2", "--sample_len", "0", "--eval_interval", "4", "--max_iters", "4",
                   "--text_file", str(tmp_path / "arith.txt"), "--data_dir", str(tmp_path / "data")]
    assert train.main(args + ["--out_dir", str(tmp_path / "run")]) == 0
    from nanolab.checkpoint import read_state

    tok = read_state(tmp_path / "run")["tokenizer"]
    assert tok["kind"] == "char" and set(tok["chars"]) == set(text)
    (folder,) = (tmp_path / "data").glob("text-*/char/meta.json")
    meta = json.loads(folder.read_text())
    assert meta["num_tokens"]["train"] + meta["num_tokens"]["val"] == len(text)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe" * 100)
    bad = [a if a != str(tmp_path / "arith.txt") else str(tmp_path / "bad.txt") for a in args]
    assert train.main(bad + ["--out_dir", str(tmp_path / "bad")]) == 2
    assert "cannot read it as UTF-8" in capsys.readouterr().err
