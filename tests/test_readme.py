"""Every command in the README runs: the quick tour's code blocks run in order (shrunk to a tiny model and a few
steps by flags appended after the README's own, so the README's flags are still parsed and used), and every
command quoted inline parses its flags (the GPU and nanoGPT ones cannot run on this machine)."""

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")

TINY_CHAR = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32"]
# appended to a README command of each script: later flags win in argparse, so the command itself is still used
SHRINK = {
    "scripts/grpo_char.py": [*TINY_CHAR, "--iters", "2", "--batch_size", "4", "--val_windows", "4",
                             "--eval_interval", "0"],
    "scripts/ppo.py": [*TINY_CHAR, "--iters", "2", "--batch_size", "8", "--val_windows", "4", "--eval_interval", "0"],
    "scripts/grpo.py": [*TINY_CHAR, "--iters", "1", "--batch_size", "2", "--group_size", "2", "--max_new_tokens",
                        "4", "--val_windows", "2", "--eval_interval", "0"],
    "scripts/train.py": [*TINY_CHAR, "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1",
                         "--batch_size", "2", "--sample_len", "8", "--block_size", "32"],
    "scripts/sample.py": ["--max_new_tokens", "16"],
    "scripts/pretrain_experiment.py": ["--training.num_steps", "4", "--training.checkpoint_interval", "2",
                                       "--training.batch_size", "2", "--experiments.items.0.start_step", "2",
                                       "--model.overrides.n_layer", "1", "--model.overrides.n_embd", "32",
                                       "--model.overrides.n_head", "2"],
    "scripts/dpo.py": ["--training.max_steps", "2", "--training.batch_size", "2", "--finetuning.eval_steps", "2",
                       "--training.max_length", "32", "--training.max_prompt_length", "16",
                       "--dataset.max_samples", "40"],
    "data/prepare_preferences.py": ["--n", "100"],
    "scripts/denoise.py": [*TINY_CHAR, "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1",
                           "--batch_size", "2", "--block_size", "32"],
    "-m nanolab.plot": [],
}


def code_block_commands() -> list[str]:
    """The python / torchrun lines of the README's bash code blocks (the install lines excepted), comments cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a line continued with a backslash is one command
            line = line.split("  #")[0].strip()
            if line.startswith(("python ", "torchrun ")) and "pytest" not in line:
                out.append(line)
    return out


def inline_commands() -> list[str]:
    return [c for c in re.findall(r"`((?:python|torchrun) [^`]+)`", README) if "pytest" not in c]


def script_of(argv: list[str]) -> str:
    if argv[:2] == ["-m", "nanolab.plot"]:
        return "-m nanolab.plot"
    return next(a for a in argv if a.endswith(".py"))


def test_readme_lists_the_quick_tour():
    cmds = code_block_commands()
    assert len(cmds) >= 9 and "python scripts/grpo_char.py --horizon 70" in cmds
    for c in cmds:
        assert script_of(shlex.split(c)[1:]) in SHRINK, f"README command without a test shrink: {c}"


def test_quick_tour_commands_run_in_order(data_dir, tmp_path):
    """In a fresh folder (scripts/ and examples/ linked in), as a new user would: train, DDP, resume, sample,
    the RL scripts, the insertion experiment and the plot, each exiting 0."""
    for name in ("scripts", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepare_preferences.py").symlink_to(REPO / "data" / "prepare_preferences.py")
    env = {**os.environ, "NANOLAB_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "NANOLAB_RUNS": str(tmp_path),
           "NANOLAB_THREADS": "1"}
    shared_bpe = REPO.parent / "shared" / "data" / "tiktoken"  # the offline GPT-2 BPE files, where CI has them
    if "TIKTOKEN_CACHE_DIR" not in env and shared_bpe.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(shared_bpe)
    for cmd in code_block_commands():
        argv = shlex.split(cmd)
        exe = [sys.executable] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
        proc = subprocess.run([*exe, *argv[1:], *SHRINK[script_of(argv[1:])]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "loss.png").stat().st_size > 1000


def parse_only(script: Path, args: list[str], monkeypatch) -> int:
    """Run a script in this process up to its argument parsing: 0 once its flags parsed, else argparse's exit code
    (unknown flags fail; dotted ones are pretrain_experiment's config overrides)."""
    parse_known = argparse.ArgumentParser.parse_known_args  # parse_args calls it too

    def parsed(self, a=None, namespace=None):
        extra = parse_known(self, a, namespace)[1]
        sys.exit(3 if [e for e in extra if e.startswith("--") and "." not in e] else 0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parsed)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    return e.value.code or 0


@pytest.mark.parametrize("cmd", inline_commands())
def test_inline_commands_parse(cmd, monkeypatch, capsys):
    """Each command quoted in the text names a script that exists and flags it accepts (only parsed: the run itself
    may need a GPU or a nanoGPT checkout)."""
    argv = shlex.split(cmd)[1:]
    script = script_of(argv)
    if script == "-m nanolab.plot":
        return
    assert (REPO / script).is_file(), cmd
    args = argv[argv.index(script) + 1:]
    monkeypatch.chdir(REPO)
    assert parse_only(REPO / script, args, monkeypatch) == 0, f"{cmd}\n{capsys.readouterr().err[-2000:]}"
    assert parse_only(REPO / script, [*args, "--no_such_flag"], monkeypatch) != 0  # the check can fail
