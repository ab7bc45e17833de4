"""Small helpers the test files share (pytest puts this folder on sys.path: `from helpers import ...`)."""

import importlib.util
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py imported as a module (its main(argv) then runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"nanolab_{name}_script", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def checkpoint_weights(run_dir) -> dict[str, torch.Tensor]:
    """A run's latest checkpoint's weights, single-file or sharded (load_checkpoint reads both)."""
    from nanolab.checkpoint import load_checkpoint, read_state
    from nanolab.models import build_model

    state = read_state(run_dir)
    model = build_model(state["model_config"])
    load_checkpoint(state["path"], model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reversal_rows(n: int, seed: int = 0) -> list[dict]:
    """SFT rows that reverse a string: prompts and responses of 2..12 letters (+ '=' and '.'), so lengths differ."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        s = "".join(r.choice("abcdefgh") for _ in range(r.randint(2, 12)))
        rows.append({"prompt": s + "=", "response": s[::-1] + "."})
    return rows


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so norms/biases are not ones/zeros (a mapping error must show in the logits);
    returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()
