"""Checkpoints (crash safety, tied weights, no pickle), RNG states, the optimizer helpers, metrics and plots."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from nanolab import checkpoint as ck
from nanolab.models import build_model, preset
from nanolab.optim import build_adamw, clip_and_step, lr_at, param_groups, set_lr
from nanolab.tracking import Tracker, read_metrics, truncate_metrics


def tiny(family="gpt2", **kw):
    torch.manual_seed(0)
    return build_model(preset(f"{family}-char-tiny", n_layer=1, n_embd=16, n_head=2, block_size=16, **kw))


def trained(model):
    """An optimizer with non-trivial state after two steps."""
    opt = build_adamw(model, 1e-2, 0.1)
    x = torch.randint(0, 65, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_roundtrip_tied_weights_and_optimizer(tmp_path):
    model = tiny()
    opt = trained(model)
    path = ck.save_checkpoint(tmp_path, 7, model, opt, {"tokenizer": {"kind": "char", "chars": "ab"}, "note": 1})
    assert path.name == "step000007" and ck.latest_checkpoint(tmp_path) == path
    assert (tmp_path / "latest").read_text().strip() == "step000007"

    model2 = tiny()
    torch.nn.init.zeros_(model2.wte.weight)
    opt2 = build_adamw(model2, 1e-2, 0.1)
    state = ck.load_checkpoint(tmp_path, model2, opt2)
    assert state["step"] == 7 and state["note"] == 1 and state["model_config"]["n_embd"] == 16
    assert model2.lm_head.weight is model2.wte.weight  # the tie survives loading
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])

    m3, tok, st = ck.load_model_for_inference(path)
    assert not m3.training and tok.decode([0, 1]) == "ab" and st["step"] == 7
    assert torch.equal(m3.wte.weight, model.wte.weight)


def test_optimizer_saved_portable_and_tensor_lr(tmp_path):
    """A CUDA-graph run's optimizer holds its learning rate in a tensor and is `capturable`: set_lr fills the
    tensor in place, and the checkpoint stores a plain number and capturable=False (resumable on any device)."""
    model = tiny()
    opt = trained(model)
    lr = torch.tensor(1.0)
    for g in opt.param_groups:  # what make_capturable does on CUDA
        g["lr"], g["capturable"] = lr, True
    set_lr(opt, 2.5e-3)
    assert all(g["lr"] is lr for g in opt.param_groups) and lr.item() == pytest.approx(2.5e-3)
    ck.save_checkpoint(tmp_path, 1, model, opt, {})
    saved = torch.load(tmp_path / "step000001" / ck.OPTIM_FILE, weights_only=True)
    assert [(type(g["lr"]), g["capturable"]) for g in saved["param_groups"]] == [(float, False)] * 2
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([2.5e-3] * 2)
    assert all(g["lr"] is lr and g["capturable"] for g in opt.param_groups)  # the live optimizer is untouched
    opt2 = build_adamw(tiny(), 1e-2, 0.1)
    ck.load_checkpoint(tmp_path, tiny(), opt2)
    set_lr(opt2, 1e-3)
    assert [g["lr"] for g in opt2.param_groups] == [1e-3, 1e-3]


def test_clip_and_step():
    """Clipping to the global norm (or not, at 0), one step, gradients set to None, non-finite norms counted."""
    for clip, moved in ((1.0, 1.0), (0.0, 5.0)):
        w = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([w], lr=1.0)
        w.grad = torch.tensor([3.0, 4.0])  # norm 5
        bad = torch.zeros(())
        clip_and_step(opt, [w], clip, bad)
        assert w.grad is None and bad.item() == 0
        assert torch.linalg.vector_norm(w.detach()).item() == pytest.approx(moved, rel=1e-5)
    w.grad = torch.tensor([float("nan"), 1.0])
    clip_and_step(opt, [w], 1.0, bad)
    assert bad.item() == 1


def test_untied_family_roundtrip(tmp_path):
    model = tiny("olmo2")
    ck.save_checkpoint(tmp_path, 1, model)
    m2, tok, _ = ck.load_model_for_inference(tmp_path)
    assert tok is None and type(m2).__name__ == "OLMo2"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))


def test_interrupted_write_is_never_latest(tmp_path, monkeypatch):
    model = tiny()
    opt = trained(model)
    good = ck.save_checkpoint(tmp_path, 5, model, opt, {})

    def crash(*a, **k):
        raise OSError("disk full (simulated crash mid-write)")

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(tmp_path, 10, model, opt, {})
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "step000010").exists()

    # Debris a SIGKILL could leave: a temp folder of a dead writer (complete-looking files inside), a step folder
    # without state.json, and a pointer to a folder that does not exist.
    debris = tmp_path / ".tmp-step20-999999999"
    debris.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        (debris / name).write_bytes(b"partial")
    (tmp_path / "step000030").mkdir()
    (tmp_path / "step000030" / "model.safetensors").write_bytes(b"partial")
    assert ck.latest_checkpoint(tmp_path) == good
    (tmp_path / "latest").write_text("step000040\n")
    assert ck.latest_checkpoint(tmp_path) == good  # falls back to the newest complete folder
    assert ck.resolve_checkpoint(tmp_path) == good

    # the next save cleans the dead writer's temp folder
    ck.save_checkpoint(tmp_path, 15, model, opt, {})
    assert not debris.exists() and ck.latest_checkpoint(tmp_path).name == "step000015"


def test_keep_last_and_resave(tmp_path):
    model = tiny()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, None, {"i": step}, keep_last=2)
    assert [s for s, _ in ck.step_dirs(tmp_path)] == [3, 4]
    # re-saving an existing step (after resuming from an older pointer) replaces it
    (tmp_path / "latest").write_text("step000003\n")
    ck.save_checkpoint(tmp_path, 4, model, None, {"i": 44}, keep_last=1)
    assert [s for s, _ in ck.step_dirs(tmp_path)] == [4]
    assert ck.read_state(tmp_path)["i"] == 44
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, 5, model, keep_last=0)
    with pytest.raises(ValueError, match="JSON|not JSON|NaN|Out of range"):
        ck.save_checkpoint(tmp_path, 6, model, None, {"loss": math.nan})
    assert ck.latest_checkpoint(tmp_path).name == "step000004"


def test_loading_refuses_pickled_objects(tmp_path):
    model = tiny()
    opt = trained(model)
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    torch.save({"state": {}, "param_groups": [], "evil": os.system}, path / "optimizer.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        ck.load_checkpoint(path, tiny(), build_adamw(tiny(), 1e-3, 0.0))


def test_mismatched_model_and_missing_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, 1, tiny())
    other = build_model(preset("gpt2-char-tiny", n_layer=1, n_embd=32, n_head=2, block_size=16))
    with pytest.raises(ValueError, match="does not fit the model"):
        ck.load_checkpoint(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.resolve_checkpoint(tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete"):
        ck.resolve_checkpoint(tmp_path / "empty")


def test_rng_state_roundtrip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    saved = json.loads(json.dumps(ck.rng_state()))
    want = (random.random(), np.random.randn(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(saved)
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert want[0] == got[0] and np.array_equal(want[1], got[1]) and torch.equal(want[2], got[2])
    with pytest.raises(ValueError, match="malformed RNG state"):
        ck.set_rng_state({"python": {}})


def test_param_groups_and_schedule():
    model = tiny()  # GPT-2: tied wte/lm_head, LayerNorms with biases
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps}
    linear_w = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {id(model.wte.weight)}
    assert ids(decay["params"]) == linear_w and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(model.wte.weight) in ids(no_decay["params"]) and id(model.wpe.weight) in ids(no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in decay["params"])
    olmo = tiny("olmo2")
    d, _ = param_groups(olmo, 0.1)
    assert id(olmo.lm_head.weight) in ids(d["params"]) and id(olmo.wte.weight) not in ids(d["params"])

    lr = lambda s: lr_at(s, 1e-3, 1e-4, 10, 100)
    assert lr(0) == pytest.approx(1e-3 / 11) and lr(9) == pytest.approx(1e-3 * 10 / 11)
    assert lr(10) == pytest.approx(1e-3) and lr(55) == pytest.approx(5.5e-4) and lr(100) == pytest.approx(1e-4)
    assert lr(1000) == 1e-4 and all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_metrics_truncate_and_plot(tmp_path):
    t = Tracker(tmp_path, total=5, progress=False)
    for s in range(1, 6):
        t.log({"step": s, "loss": 5.0 - s, "lr": torch.tensor(0.5)})
    t.log({"step": 5, "val_loss": float("nan")})
    t.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5] and rows[0]["lr"] == 0.5 and rows[-1]["val_loss"] == "nan"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a torn last line (killed mid-write) is skipped
    assert truncate_metrics(tmp_path / "metrics.jsonl", 3) == 3
    t = Tracker(tmp_path, total=5, initial=2, progress=False)  # a resume at step 2 keeps steps <= 2
    t.log({"step": 3, "loss": 0.5, "val_loss": 0.7})
    t.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 4.0), (2, 3.0), (3, 0.5)]
    with pytest.raises(ValueError, match="integer 'step'"):
        Tracker(tmp_path / "x", progress=False).log({"loss": 1.0})

    pytest.importorskip("matplotlib")
    from nanolab.plot import main as plot_main

    out = tmp_path / "curves.png"
    assert plot_main([str(tmp_path), str(tmp_path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path), "--key", "nope", "-o", str(out)]) == 1
