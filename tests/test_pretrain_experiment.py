"""pretrain_experiment: the config and plan (nanolab.insertion.experiment), the poisoner, exact insertion
positions in trained batches checked against the sources, the run folder (marker, lock, guarded delete), exit
codes, retries, and an end-to-end run with the example's eval subprocess and dynamic control."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from nanolab import run
from nanolab.checkpoint import read_state
from nanolab.config import ConfigError, load_config
from nanolab.data import write_tokens
from nanolab.insertion import experiment as ex
from nanolab.insertion import runners
from nanolab.insertion.dataset import PretrainData
from nanolab.tokenizers import CharTokenizer
from nanolab.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pretrain_experiment"
B, T = 4, 32  # batch_size, seq_len of the test runs


def _load_script():
    """The script (main, the training loop) for the end-to-end tests."""
    spec = importlib.util.spec_from_file_location("pretrain_experiment", REPO / "scripts" / "pretrain_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


pe = _load_script()


@pytest.fixture
def setup(tmp_path):
    """Token data (char tokenizer over the Shakespeare alphabet), insertion files and a base config."""
    tok = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "train.bin", rng.integers(0, tok.vocab_size, size=8 * B * T + 1), tok.vocab_size)
    tok.save(tmp_path / "tokenizer.json")
    texts = ["Owl sings.", "Nine crows."]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))
    # explicit global positions p = step*B*T + row*T + offset
    explicit = [{"tokens": [7, 8, 9], "position": 0 * B * T + 2 * T + 5},
                {"tokens": [10, 11, 12, 13], "position": 3 * B * T + 1 * T + T - 4},  # ends at the last offset
                {"tokens": [20], "position": 5 * B * T + 3 * T + 0}]
    (tmp_path / "tokens.jsonl").write_text("".join(json.dumps(e) + "\n" for e in explicit))
    cfg = {
        "name": "run",
        "save_folder": str(tmp_path / "runs"),
        "model": {"preset": "gpt2-char-tiny",
                  "overrides": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": T, "dropout": 0.0}},
        "data": {"path": str(tmp_path / "train.bin"), "seq_len": T, "tokenizer": str(tmp_path / "tokenizer.json")},
        "training": {"num_steps": 6, "batch_size": B, "checkpoint_interval": 3, "log_interval": 2, "device": "cpu",
                     "lr": 1e-3, "threads": 1},
        "experiments": {"seed": 3, "items": [
            {"type": "add-tokens-from-file", "path": str(tmp_path / "tokens.jsonl"), "mode": "explicit"},
            {"type": "add-texts-from-file", "path": str(tmp_path / "texts.jsonl"), "repetitions": 3},
        ]},
        "eval": {"eval_on_load": False},
    }
    return tmp_path, cfg, explicit, tok


def write_cfg(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_dry_run_prints_plan(setup, capsys):
    tmp_path, cfg, _, _ = setup
    path = write_cfg(tmp_path, cfg)
    overrides = ["--training.num_steps", "8"]
    plan = ex.print_plan(load_config(path, ex.ExperimentConfig, overrides), tmp_path / "runs" / "run", overrides)
    out = capsys.readouterr().out
    assert "steps: 8 x 4 seqs = 1,024 tokens" in out
    assert "9 insertions" in out and "6/6 placed" in out and "3/3 placed" in out
    assert "checkpoints at steps [0, 3, 6, 8]" in out and "disk needed" in out
    assert plan["checkpoints"] == [0, 3, 6, 8] and plan["insertions_placed"] == 9 and plan["total_tokens"] == 1024
    assert pe.main([path, "--dry-run", *overrides]) == 0 and "9 insertions" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_config_errors(setup, capsys):
    tmp_path, cfg, _, _ = setup
    path = write_cfg(tmp_path, cfg)
    with pytest.raises(ConfigError, match="experiments.items.1.repetitionz: unknown key .known: type, path, "
                                          "repetitions"):
        load_config(path, ex.ExperimentConfig, ["--experiments.items.1.repetitionz", "2"])
    with pytest.raises(ConfigError, match=r"training.num_steps must be >= 1"):
        load_config(path, ex.ExperimentConfig, ["--training.num_steps", "0"])
    with pytest.raises(ConfigError, match=r"experiments.items.0: need 0 <= start_step < end_step"):
        bad = {**cfg, "experiments": {"items": [{"type": "add-texts-from-file", "path": "x", "start_step": 6}]}}
        load_config(write_cfg(tmp_path, bad, "bad.yaml"), ex.ExperimentConfig)
    # through the CLI: one line on stderr, exit 2
    assert pe.main([path, "--dry-run", "--experiments.items.1.repetitionz", "2"]) == 2
    assert "experiments.items.1.repetitionz: unknown key (known: type, path, repetitions" in capsys.readouterr().err
    cfg["save_folder"] = "${PE_TEST_UNSET_VAR}/runs"
    os.environ.pop("PE_TEST_UNSET_VAR", None)
    assert pe.main([write_cfg(tmp_path, cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cfg.yaml: save_folder: environment variable ${PE_TEST_UNSET_VAR} is not set" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_texts_file_is_an_error(setup, capsys):
    tmp_path, cfg, _, _ = setup
    (tmp_path / "texts.jsonl").write_text("\n  \n")  # blank lines only: nothing to insert
    with pytest.raises(ex.ExperimentError, match=rf"experiments.items.1.path: {tmp_path / 'texts.jsonl'} is empty"):
        ex.check_inputs(load_config(write_cfg(tmp_path, cfg), ex.ExperimentConfig))
    assert pe.main([write_cfg(tmp_path, cfg)]) == 2
    assert f"{tmp_path / 'texts.jsonl'} is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was created


def test_insertions_at_exact_positions_of_trained_batches(setup, monkeypatch):
    tmp_path, cfg, explicit, tok = setup
    cfg["training"]["micro_batch_size"] = 2  # 2 micro-batches per step: rows must still line up
    seen: dict[int, list[torch.Tensor]] = {}
    step_of = {"n": 0}
    real = pe.forward_backward

    def spy(model, x, y, scale, autocast):
        seen.setdefault(step_of["n"] // 2, []).append(x.clone())
        step_of["n"] += 1
        assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets, insertions included
        return real(model, x, y, scale, autocast)

    monkeypatch.setattr(pe, "forward_backward", spy)
    assert pe.main([write_cfg(tmp_path, cfg)]) == 0
    batches = {s: torch.cat(xs) for s, xs in seen.items()}
    assert sorted(batches) == list(range(6)) and batches[0].shape == (B, T)
    for e in explicit:
        p = e["position"]
        step, row, off = p // (B * T), (p // T) % B, p % T
        got = batches[step][row, off:off + len(e["tokens"])].tolist()
        assert got == e["tokens"], (e, got)
    run = tmp_path / "runs" / "run"
    log = [json.loads(line) for line in (run / "trained_insertions.jsonl").read_text().splitlines()]
    assert len(log) == 9 and all(e["verified"] for e in log)  # 3 explicit + 2 texts x 3 repetitions
    for e in log:  # every logged insertion is where the log says, in the batch the model got
        ids = batches[e["step"]][e["row"], e["offset"]:e["offset"] + e["length"]]
        assert e["slot"] == e["step"] * B + e["row"]
        if e["item"].startswith(str(tmp_path / "texts.jsonl")):
            assert tok.decode(ids) in ("Owl sings.", "Nine crows.")
    assert sorted(e["item"].rsplit(":", 1)[1] for e in log if "tokens.jsonl" in e["item"]) == ["1", "2", "3"]
    assert (run / "insertions.h5").is_file() and (run / "config.yaml").is_file()
    assert read_state(run)["step"] == 6


def test_delete_guard(setup, tmp_path_factory, capsys):
    tmp_path, cfg, _, _ = setup
    save = tmp_path / "runs"
    outside = tmp_path_factory.mktemp("outside")
    (outside / "precious.txt").write_text("keep me")
    with pytest.raises(ex.ExperimentError, match="refusing to delete"):
        ex.guarded_rmtree(save / ".." / "outside", save)
    with pytest.raises(ex.ExperimentError, match="refusing to delete"):
        ex.guarded_rmtree(save, save)
    save.mkdir()
    (save / "run").symlink_to(outside, target_is_directory=True)  # the run folder points outside save_folder
    assert pe.main([write_cfg(tmp_path, cfg), "--delete-experiment-folder"]) == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert (outside / "precious.txt").read_text() == "keep me"
    (save / "run").unlink()
    (save / "run" / "step000003").mkdir(parents=True)
    assert ex.guarded_rmtree(save / "run", save) and not (save / "run").exists() and save.is_dir()


def test_delete_only_a_marked_run_folder(setup, capsys):
    tmp_path, cfg, _, _ = setup
    path, run_dir = write_cfg(tmp_path, cfg), tmp_path / "runs" / "run"
    # a folder nanolab did not create as a run folder: refused (dry run too), nothing deleted, nothing run
    run_dir.mkdir(parents=True)
    (run_dir / "precious.txt").write_text("keep me")
    for extra in (["--dry-run"], []):
        assert pe.main([path, "--delete-experiment-folder", *extra]) == 2
        err = capsys.readouterr().err
        assert f"refusing to delete {run_dir}: it has no nanolab-run.json" in err and len(err.splitlines()) == 1
    assert os.listdir(run_dir) == ["precious.txt"]
    # nor does a fresh run write into it
    assert pe.main([path]) == 2
    assert f"{run_dir} exists and is not a nanolab run folder" in capsys.readouterr().err
    # a run folder of another script: refused
    (run_dir / run.RUN_MARKER).write_text(json.dumps({"script": "train", "created": 0}))
    assert pe.main([path, "--delete-experiment-folder"]) == 2
    assert "it is a run folder of train, not pretrain_experiment" in capsys.readouterr().err
    assert (run_dir / "precious.txt").is_file()
    # this script's run folder (the marker a run writes when it creates the folder): deleted, then a new run
    (run_dir / run.RUN_MARKER).unlink()
    (run_dir / "precious.txt").unlink()
    run_dir.rmdir()
    cfg["training"].update(checkpoint_interval=6)
    path = write_cfg(tmp_path, cfg)
    assert pe.main([path]) == 0
    assert run.read_marker(run_dir)["script"] == "pretrain_experiment"
    (run_dir / "old.txt").write_text("from the first run")
    assert pe.main([path, "--delete-experiment-folder", "--dry-run"]) == 0
    assert f"would delete {run_dir}" in capsys.readouterr().out and (run_dir / "old.txt").is_file()
    assert pe.main([path, "--delete-experiment-folder"]) == 0
    assert f"deleted {run_dir}" in capsys.readouterr().out
    assert not (run_dir / "old.txt").exists() and read_state(run_dir)["step"] == 6
    assert run.read_marker(run_dir)["script"] == "pretrain_experiment"


def test_a_second_run_on_the_folder_is_refused(setup, capsys):
    tmp_path, cfg, _, _ = setup
    path, run_dir = write_cfg(tmp_path, cfg), tmp_path / "runs" / "run"
    holder = subprocess.Popen(  # another process holds the run folder, as a live run does
        [sys.executable, "-c", "import sys; from nanolab import run; "
         "run.open_run(sys.argv[1], run.setup('cpu'), 'pretrain_experiment', None, {}); "
         "print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert pe.main([path]) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by another run (pid {holder.pid})" in err and len(err.splitlines()) == 1
        assert pe.main([path, "--delete-experiment-folder"]) == 2  # nor is a folder in use deleted
        assert f"refusing to delete {run_dir}: it is in use by another run (pid {holder.pid})" in \
            capsys.readouterr().err
        assert sorted(os.listdir(run_dir)) == [".lock", "nanolab-run.json"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    cfg["training"].update(checkpoint_interval=6)
    assert pe.main([write_cfg(tmp_path, cfg)]) == 0  # the lock died with its holder


def test_exit_codes_diverged_and_interrupted(setup, monkeypatch, capsys):
    tmp_path, cfg, _, _ = setup
    path, run_dir = write_cfg(tmp_path, cfg), tmp_path / "runs" / "run"
    real = pe.forward_backward
    calls = {"n": 0}

    def nan_at_step_1(*a):
        calls["n"] += 1
        loss = real(*a)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(pe, "forward_backward", nan_at_step_1)
    assert pe.main([path]) == 1  # the loss became NaN at step 1, noticed when logging step 2: no checkpoint 3
    err = capsys.readouterr().err
    assert "NaN/inf at or before step 2" in err and "Last good checkpoint" in err and "Traceback" not in err
    assert calls["n"] == 2 and not (run_dir / "step000003").exists() and (run_dir / "step000000").is_dir()

    def interrupt(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(pe, "forward_backward", interrupt)
    assert pe.main([path, "--resume"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(pe, "forward_backward", real)
    assert pe.main([path, "--resume"]) == 0 and read_state(run_dir)["step"] == 6  # lock released, resumable


def test_trained_insertions_are_checked_against_the_sources(setup):
    tmp_path, cfg_dict, _, tok = setup
    cfg = load_config(write_cfg(tmp_path, cfg_dict), ex.ExperimentConfig)
    map_path = tmp_path / "ins.h5"
    sources = ex.static_sources(cfg)
    ex.build_map(cfg, tok, tok.vocab_size, map_path, sources)
    data = PretrainData(str(tmp_path / "train.bin"), T, B, 0, insertions=str(map_path), vocab_size=tok.vocab_size)
    index = ex.item_index(sources, tok, tok.vocab_size)
    x, _ = data.get_batch(0, 0, 1, 0, 1)  # step 0 holds the explicit [7, 8, 9] at row 2, offset 5

    def explicit(entries):
        return [e for e in entries if e["row"] == 2]

    entries = pe.record_insertions(data, 0, 0, x, index)
    assert entries and all(e["verified"] for e in entries)
    assert [(e["offset"], e["item"]) for e in explicit(entries)] == [(5, f"{tmp_path / 'tokens.jsonl'}:1")]
    # the map agrees with the batch but no source has these tokens (a map built from other files): not verified
    other = {k: v for k, v in index.items() if not v.endswith("tokens.jsonl:1")}
    assert [(e["item"], e["verified"]) for e in explicit(pe.record_insertions(data, 0, 0, x, other))] == [(None, False)]
    # the batch differs from the map
    x[2, 6] = 0
    assert [e["verified"] for e in explicit(pe.record_insertions(data, 0, 0, x, index))] == [False]
    data.insertions.close()


def test_corrupted_insertion_map_is_refused_on_resume(setup, capsys):
    tmp_path, cfg, _, _ = setup
    cfg["training"].update(checkpoint_interval=6)
    path, run_dir = write_cfg(tmp_path, cfg), tmp_path / "runs" / "run"
    assert pe.main([path]) == 0
    with h5py.File(run_dir / "insertions.h5", "r+") as f:
        f["tokens"][0] = (int(f["tokens"][0]) + 1) % 10  # still a valid token id: only the digest sees it
    assert pe.main([path, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'insertions.h5'}: insertion map is corrupt" in err and len(err.splitlines()) == 1


def test_retry_resumes_and_matches_uninterrupted_run(setup, monkeypatch):
    tmp_path, cfg, _, _ = setup
    assert pe.main([write_cfg(tmp_path, cfg)]) == 0
    ref = load_file(tmp_path / "runs" / "run" / "step000006" / "model.safetensors")
    ref_log = (tmp_path / "runs" / "run" / "trained_insertions.jsonl").read_text()

    calls = {"n": 0}
    real = pe.forward_backward

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 5:  # step 4 of the first attempt; the latest checkpoint is step 3
            raise RuntimeError("simulated node failure")
        return real(*a)

    monkeypatch.setattr(pe, "forward_backward", flaky)
    cfg["training"].update(max_retries=2, retry_backoff_s=0.0)
    cfg["name"] = "flaky"
    assert pe.main([write_cfg(tmp_path, cfg)]) == 0
    run = tmp_path / "runs" / "flaky"
    assert calls["n"] == 4 + 1 + 3  # steps 0-3, the failure at step 4, steps 3-5 after resuming from step 3
    got = load_file(run / "step000006" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)  # bit-identical
    assert (run / "trained_insertions.jsonl").read_text() == ref_log  # no duplicated steps


def test_gaussian_poisoning_rows_and_determinism():
    items = [(0, ex.GaussianPoisoning("gaussian-poisoning", std=0.5, batch_indices=[2], rows=[1, 3]))]
    p = ex.Poisoner(items, seed=0, batch_size=4)
    entries = p.prepare(2, 0, 4, (4, 3, 8), "cpu", torch.float32)
    full = p.noise.clone()
    assert [e["row"] for e in entries] == [1, 3]
    assert full[[0, 2]].abs().sum() == 0 and full[[1, 3]].abs().sum() > 0
    assert 0.3 < full[1].std() < 0.7
    halves = [p.prepare(2, r0, 2, (2, 3, 8), "cpu", torch.float32) and p.noise for r0 in (0, 2)]
    assert torch.equal(torch.cat([h if h is not None else torch.zeros(2, 3, 8) for h in halves]), full)
    assert p.prepare(1, 0, 4, (4, 3, 8), "cpu", torch.float32) == [] and p.noise is None
    out = torch.ones(4, 3, 8)
    p.prepare(2, 0, 4, (4, 3, 8), "cpu", torch.float32)
    assert torch.allclose(p.hook(None, None, out) - out, full, atol=1e-6)


def test_end_to_end_eval_dynamic_control_poisoning(setup, monkeypatch):
    tmp_path, cfg, _, tok = setup
    cmds = []
    real_run = subprocess.run

    def spy(cmd, **kw):
        cmds.append(cmd)
        return real_run(cmd, **kw)

    monkeypatch.setattr(runners.subprocess, "run", spy)
    (tmp_path / "control.jsonl").write_text(json.dumps({"text": "A golden hawk cries."}) + "\n")
    # dynamic control without torch (fast subprocess): insert a text naming the window (steps 0-4 xy, 4-6 yy)
    script = tmp_path / "dyn.py"
    script.write_text(
        "import argparse, json\n"
        "p = argparse.ArgumentParser()\n"
        "for a in ('--model', '--output', '--step', '--window-start', '--window-end', '--tag'): p.add_argument(a)\n"
        "a = p.parse_args()\n"
        "assert a.model.endswith('step000000') or 'dynamic' in a.model, a.model\n"
        "name = 'xyz'[int(a.window_start) // 4] + 'xyz'[int(a.window_end) // 4]\n"
        "open(a.output, 'w').write(json.dumps({'text': f'{a.tag} window {name}.'}))\n")
    cfg["experiments"]["items"] += [
        {"type": "dynamic-control", "script": str(script), "every": 4, "args": ["--tag", "Dyn"], "repetitions": 2},
        {"type": "gaussian-poisoning", "std": 0.1, "batch_indices": [1], "rows": [0]},
    ]
    cfg["eval"] = {"eval_on_load": True, "scripts": [{
        "path": str(EXAMPLE / "eval_memorization.py"), "name": "mem",
        "args": ["--texts", str(tmp_path / "texts.jsonl"), "--control", str(tmp_path / "control.jsonl")]}]}
    cfg["training"].update(num_steps=6, checkpoint_interval=6)
    assert pe.main([write_cfg(tmp_path, cfg)]) == 0
    run = tmp_path / "runs" / "run"
    rows = [r for r in read_metrics(run) if "eval/mem/inserted_loss" in r]
    assert [r["step"] for r in rows] == [0, 6]
    for r in rows:
        assert r["eval/mem/memorization_gap"] == pytest.approx(
            r["eval/mem/control_loss"] - r["eval/mem/inserted_loss"], abs=1e-5)
    # a cross-entropy of a 6-step char model: below a uniform guess over the 65 characters, not NaN
    assert 0 < yaml.safe_load((run / "eval" / "step000006-mem.yaml").read_text())["inserted_loss"] < math.log(65) + 1
    log = [json.loads(line) for line in (run / "trained_insertions.jsonl").read_text().splitlines()]
    dyn = [e for e in log if e["kind"] == "insertion" and "/dynamic/item2/" in (e["item"] or "")]
    # the windows of steps [0, 4) and [4, 6) each got their 2 repetitions, inside the window
    assert sorted(e["step"] // 4 for e in dyn) == [0, 0, 1, 1] and all(e["step"] < 6 for e in dyn)
    assert len(dyn) == 4 and all(e["verified"] for e in log if e["kind"] == "insertion")  # 2 windows x 2
    assert [(e["step"], e["row"]) for e in log if e["kind"] == "gaussian"] == [(1, 0)]
    assert (run / "dynamic" / "item2" / "window_step000004.jsonl").read_text().startswith('{"text": "Dyn window yy.')
    # the static placements did not move when the windows were added: the explicit ones are still logged
    assert sum("tokens.jsonl" in (e.get("item") or "") for e in log) == 3
    # the user scripts ran as subprocesses of this interpreter: evals at load and at the checkpoint, dynamic
    # control at the window starts, each on the checkpoint of its step
    assert cmds and all(c[0] == sys.executable for c in cmds)
    evals = [(c[1], Path(c[c.index("--model") + 1]).name) for c in cmds if "--results-yaml" in c]
    assert evals == [(str(EXAMPLE / "eval_memorization.py"), "step000000"), (str(EXAMPLE / "eval_memorization.py"),
                                                                            "step000006")]
    assert [c[c.index("--window-start") + 1] for c in cmds if c[1] == str(script)] == ["0", "4"]
    assert not list((run / "eval").glob(".*"))  # no temporary results left behind
