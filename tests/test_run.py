"""nanolab/run.py, the scaffolding every script shares, tried as a new user would: a run folder locked for its
lifetime, resume rules, strict flags, exit codes for user mistakes / Ctrl-C / full disk / NaN, a truncated
checkpoint, and the logged throughput (an interval's average, not its last step)."""

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanolab import run
from nanolab.checkpoint import load_checkpoint
from nanolab.errors import Diverged, UsageError
from nanolab.fileio import atomic_path, atomic_write
from nanolab.models import build_model, preset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--eval_iters", "1",
        "--log_interval", "1", "--warmup_iters", "0", "--sample_len", "0", "--batch_size", "2"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"nanolab_{name}_script_for_run", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def train():
    return _script("train")


@pytest.fixture
def data(data_dir, monkeypatch):
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    return data_dir


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def cpu_env():
    return run.setup("cpu")


# ----------------------------------------------------------------------------- the run folder


def test_second_run_on_a_locked_folder_exits_2_naming_folder_and_pid(train, data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    rd = run.open_run(out, cpu_env(), "train", None, {})  # this process holds the lock now
    try:
        assert (out / run.RUN_MARKER).is_file() and run.read_marker(out)["script"] == "train"
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *TINY, "--max_iters", "1",
                               "--out_dir", str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{out} is in use by another run (pid {os.getpid()})" in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1  # one line, no traceback
        assert not (out / "metrics.jsonl").exists()  # the second run wrote nothing
    finally:
        run.release_runs()
    assert rd.resume_from is None
    assert train.main([*TINY, "--max_iters", "1", "--out_dir", str(out)]) == 0  # released: the folder is usable


def test_lock_of_a_killed_run_is_not_stale(tmp_path):
    out = tmp_path / "run"
    code = ("import os, sys, time; from nanolab import run; run.open_run(sys.argv[1], run.setup('cpu'), 'train', "
            "None, {}); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {proc.pid}\\)"):
            run.open_run(out, cpu_env(), "train", None, {})
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        run.open_run(out, cpu_env(), "train", None, {})  # the kernel dropped the dead process's lock
    finally:
        run.release_runs()


def test_resume_rules(train, data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert train.main([*TINY, "--max_iters", "2", "--out_dir", str(tmp_path / "typo"), "--resume"]) == 2
    assert "holds no checkpoint to resume" in capsys.readouterr().err  # a mistyped out_dir never starts fresh
    assert train.main([*TINY, "--max_iters", "2", "--out_dir", str(out), "--resume", "auto"]) == 0  # starts
    assert train.main([*TINY, "--max_iters", "3", "--out_dir", str(out), "--resume", "auto"]) == 0  # resumes
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]
    # --resume alone continues the run as it was started: the flags not given come from the checkpoint
    capsys.readouterr()
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", "4", "--sample_len", "0"]) == 0
    assert "resuming with the checkpoint's --batch_size 2, --block_size 16, --n_layer 1" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]
    # flags that change the run's meaning: one error naming every mismatch
    bad = [a if a != "2" else "3" for a in TINY]  # --n_head 3 and --batch_size 3
    assert train.main([*bad, "--max_iters", "5", "--out_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--batch_size 2 in the checkpoint, 3 now" in err and "--n_head 2 in the checkpoint, 3 now" in err
    # a folder of another script
    grpo_char = _script("grpo_char")
    assert grpo_char.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--horizon", "4", "--batch_size", "2",
                           "--group_size", "2", "--val_windows", "2", "--iters", "1", "--out_dir", str(out),
                           "--resume", "auto"]) == 2
    assert f"{out} is a run folder of train, not grpo_char" in capsys.readouterr().err


def test_strict_flags(train, capsys):
    def rejected(*argv):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, *argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "unrecognized arguments: --lr_decay 3" in rejected("--lr_decay", "3")  # no abbreviations
    assert "--min_lr 0.01 must be <= --learning_rate 0.001" in rejected("--min_lr", "0.01")
    assert "--warmup_iters must be >= 0" in rejected("--warmup_iters", "-1")
    assert "--grad_clip must be >= 0" in rejected("--grad_clip", "-1")
    assert "--n_layer must be > 0" in rejected("--n_layer", "0")
    assert "--beta2 must be in (0, 1)" in rejected("--beta2", "1")
    assert "--dropout must be in [0, 1)" in rejected("--dropout", "1")
    assert "--bias has no effect with an olmo2 model" in rejected("--model", "olmo2", "--bias", "false")
    assert "--activation has no effect with a mla model" in rejected("--preset", "mla-char-tiny", "--activation", "gelu")
    assert train.get_args(["--lr", "3e-3"]).learning_rate == 3e-3  # one name, nanoGPT's, with --lr as alias


# ----------------------------------------------------------------------------- main's exit codes


def test_main_exit_codes(capsys):
    def raising(exc):
        def fn(args):
            raise exc
        return fn

    assert run.main(raising(UsageError("--x 3: bad")), None) == 2
    assert capsys.readouterr().err == "error: --x 3: bad\n"
    assert run.main(raising(Diverged("loss became NaN")), None) == 1
    assert run.main(raising(KeyboardInterrupt()), None) == 130
    assert "interrupted" in capsys.readouterr().err
    assert run.main(raising(FileNotFoundError(2, "No such file or directory", "/no/such")), None) == 2
    assert "/no/such" in capsys.readouterr().err
    with pytest.raises(TypeError):  # a programming error keeps its traceback
        run.main(raising(TypeError("bug")), None)

    def full_disk(args):
        with atomic_path(Path(args) / "big.bin") as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    assert run.main(full_disk, "/tmp") == 1
    assert capsys.readouterr().err == "error: no space left writing /tmp/big.bin\n"
    assert not list(Path("/tmp").glob(".big.tmp-*"))  # nothing half-written left behind


def test_ctrl_c_leaves_the_last_checkpoint_loadable(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *TINY, "--max_iters", "100000",
                             "--eval_interval", "0", "--checkpoint_interval", "20", "--out_dir", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NANOLAB_DATA_DIR": str(data_dir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    model = build_model(preset("gpt2-char-tiny", vocab_size=65, n_layer=1, n_head=2, n_embd=16, block_size=16))
    state = load_checkpoint(out, model)
    assert state["step"] % 20 == 0 and state["step"] > 0


def test_truncated_checkpoint_is_named(train, data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert train.main([*TINY, "--max_iters", "2", "--out_dir", str(out)]) == 0
    f = out / "step000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert train.main([*TINY, "--max_iters", "4", "--out_dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: not a readable safetensors file" in err and err.count("\n") == 1


def test_nan_at_an_eval_is_diverged_not_a_crash(data, tmp_path, monkeypatch, capsys, one_thread):
    grpo_char = _script("grpo_char")
    monkeypatch.setattr(run, "mean_loss", lambda *a, **k: float("nan"))
    out = tmp_path / "run"
    assert grpo_char.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--horizon", "4", "--batch_size", "2",
                           "--group_size", "2", "--val_windows", "2", "--iters", "2", "--out_dir", str(out)]) == 1
    assert "val_ce became NaN/inf at step 0" in capsys.readouterr().err
    assert not list(out.glob("step*"))


def test_save_refuses_nonfinite_state(tmp_path):
    rd = run.RunDir(tmp_path, "train", {}, None)
    model = build_model(preset("gpt2-char-tiny", vocab_size=8, n_layer=1, n_head=1, n_embd=8, block_size=4))
    with pytest.raises(Diverged, match="metrics.val_loss"):
        run.save(rd, cpu_env(), 1, model, None, {"metrics": {"val_loss": float("inf")}})
    assert not list(tmp_path.glob("step*"))


# ----------------------------------------------------------------------------- small pieces


def test_due_and_save_due():
    assert [s for s in range(7) if run.due(s, 3)] == [0, 3, 6]
    assert not any(run.due(s, 0) for s in range(5)) and not run.due(3, None)
    # checkpoint_interval None: at each eval; always at the end; never at a resumed run's first step; 0: never
    assert [s for s in range(1, 8) if run.save_due(s, 0, s == 7, None, 3)] == [3, 6, 7]
    assert not run.save_due(4, 4, False, 2, 3)
    assert not run.save_due(7, 0, True, 0, 3)
    assert [s for s in range(1, 6) if run.save_due(s, 0, s == 5, 2, 0)] == [2, 4, 5]


def test_atomic_write_replaces_whole_files_and_folders(tmp_path):
    f = tmp_path / "a" / "x.json"
    atomic_write(f, "one")
    atomic_write(f, b"two")
    assert f.read_text() == "two"
    d = tmp_path / "folder"
    for text in ("old", "new"):
        with atomic_path(d) as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(text)
    assert (d / "f.txt").read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert f.read_text() == "two" and sorted(p.name for p in f.parent.iterdir()) == ["x.json"]


def test_throughput_is_the_interval_average():
    """A slow step inside a log interval counts: the rate is steps / (their wall time), eval time excluded."""
    now = [0.0]
    meter = run.Throughput(torch.device("cpu"), clock=lambda: now[0])
    for dt in (0.1, 0.1, 2.0, 0.1, 0.1):  # the third step is slow
        now[0] += dt
        meter.tick()
    with meter.paused():
        now[0] += 5.0  # an eval: not training time
    assert meter.lap() == (5, pytest.approx(2.4))
    now[0] += 0.3
    meter.tick()
    with meter.paused(False):  # an iteration that evaluates nothing: nothing excluded (and no device sync)
        now[0] += 0.1
    assert meter.lap() == (1, pytest.approx(0.4))


def test_train_logs_the_wall_clock_rate(train, data, tmp_path, monkeypatch, one_thread):
    """A slow batch between two logs lowers the logged tokens/s to the interval's average (the old log timed only
    the last step before the log, so a slow step elsewhere in the interval never showed)."""
    import nanolab.data as data_mod

    calls, real_next = {"n": 0}, data_mod.BatchIterator.__next__

    def slow_next(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the second training batch of the first interval
            time.sleep(1.0)
        return real_next(self)

    monkeypatch.setattr(data_mod.BatchIterator, "__next__", slow_next)
    out = tmp_path / "run"
    args = [*TINY, "--max_iters", "8", "--eval_interval", "0", "--out_dir", str(out)]
    args[args.index("--log_interval") + 1] = "4"
    assert train.main(args) == 0
    logged = [r["tokens_per_s"] for r in rows(out) if "tokens_per_s" in r]
    tokens_per_step = 2 * 16
    assert logged[0] < 4 * tokens_per_step / 1.0  # the slow step is inside the first interval's time
    assert logged[1] > 3 * logged[0]  # the second interval has no slow step
