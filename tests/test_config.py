"""nanolab.config: env substitution, key-path errors, overrides, typed validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from nanolab.config import ConfigError, apply_overrides, dump_config, from_dict, load_config, parse_overrides


@dataclass
class Training:
    num_steps: int
    lr: float = 1e-3
    warmup: int | None = None
    compile: bool = False


@dataclass
class AddTexts:
    type: Literal["add-texts"]
    path: str
    repetitions: int = 1


@dataclass
class Noise:
    type: Literal["noise"]
    std: float


@dataclass
class Schema:
    name: str
    training: Training
    experiments: list[AddTexts | Noise] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        if self.training.num_steps < 0:
            raise ValueError(f"training.num_steps must be >= 0, got {self.training.num_steps}")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """\
name: run-${RUN:-default}   # ${NOT_SUBSTITUTED_IN_COMMENTS}
training:
  num_steps: 10
experiments:
  - type: add-texts
    path: ${DATA}/t.jsonl
  - {type: noise, std: 0.5}
"""


def test_load_env_defaults_unions(tmp_path):
    cfg = load_config(write(tmp_path, BASE), Schema, env={"DATA": "/d"})
    assert cfg.name == "run-default"
    assert cfg.training == Training(num_steps=10)
    assert cfg.experiments == [AddTexts("add-texts", "/d/t.jsonl"), Noise("noise", 0.5)]
    assert isinstance(cfg.training.lr, float)
    # round trip through YAML
    assert from_dict(Schema, __import__("yaml").safe_load(dump_config(cfg))) == cfg


def test_missing_env_var_names_variable_and_file(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"c\.yaml: experiments\.0\.path: environment variable \$\{DATA\}"):
        load_config(p, Schema, env={})


def test_env_value_is_typed(tmp_path):
    p = write(tmp_path, "name: x\ntraining: {num_steps: '${N}', warmup: '${W:-}'}\n")
    cfg = load_config(p, Schema, env={"N": "42"})
    assert cfg.training.num_steps == 42 and cfg.training.warmup is None


def test_unknown_key_path(tmp_path):
    p = write(tmp_path, "name: x\ntraining: {num_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"training\.num_stepz: unknown key \(known: num_steps, lr, warmup"):
        load_config(p, Schema)


def test_missing_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.num_steps: missing required key"):
        load_config(write(tmp_path, "name: x\ntraining: {}\n"), Schema)
    with pytest.raises(ConfigError, match=r"training\.num_steps: expected int, got str 'ten'"):
        load_config(write(tmp_path, "name: x\ntraining: {num_steps: ten}\n"), Schema)
    with pytest.raises(ConfigError, match=r"training\.compile: expected bool, got int"):
        load_config(write(tmp_path, "name: x\ntraining: {num_steps: 1, compile: 1}\n"), Schema)
    with pytest.raises(ConfigError, match=r"name: expected str, got int 7 \(quote it"):
        load_config(write(tmp_path, "name: 7\ntraining: {num_steps: 1}\n"), Schema)
    with pytest.raises(ConfigError, match=r"experiments\.1\.type: type 'nois'; known types: add-texts, noise"):
        load_config(write(tmp_path, "name: x\ntraining: {num_steps: 1}\nexperiments: [{type: add-texts, "
                                    "path: p}, {type: nois}]\n"), Schema)
    with pytest.raises(ConfigError, match=r"mode: expected one of 'a', 'b', got 'c'"):
        load_config(write(tmp_path, "name: x\ntraining: {num_steps: 1}\nmode: c\n"), Schema)
    with pytest.raises(ConfigError, match=r"<root>: training.num_steps must be >= 0"):
        load_config(write(tmp_path, "name: x\ntraining: {num_steps: -1}\n"), Schema)


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, Schema, ["--training.num_steps", "100", "--training.compile=true", "name=007",
                                  "--experiments.1.std", "2", "--training.warmup", "null", "--tags.a", "1"],
                      env={"DATA": "/d"})
    assert cfg.training.num_steps == 100 and cfg.training.compile is True
    assert load_config(p, Schema, ["--training.lr", "1e-4"], env={"DATA": "/d"}).training.lr == 1e-4
    assert from_dict(Schema, {"name": "x", "training": {"num_steps": 1, "lr": "3E-2"}}).training.lr == 0.03
    assert cfg.name == "007"  # a str field keeps the text
    assert cfg.experiments[1].std == 2.0 and cfg.training.warmup is None and cfg.tags == {"a": "1"}
    with pytest.raises(ConfigError, match=r"\(with overrides\): training\.num_stepz: unknown key"):
        load_config(p, Schema, ["--training.num_stepz", "1"], env={"DATA": "/d"})
    with pytest.raises(ConfigError, match=r"has no value"):
        parse_overrides(["--training.num_steps"])
    with pytest.raises(ConfigError, match=r"experiments\.5: '5' is not an index"):
        apply_overrides({"experiments": []}, ["--experiments.5.std", "1"])
