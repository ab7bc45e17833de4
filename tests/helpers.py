"""Small helpers the test files share (pytest puts this folder on sys.path: `from helpers import ...`)."""

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py imported as a module (its main(argv) then runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"nanolab_{name}_script", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so norms/biases are not ones/zeros (a mapping error must show in the logits);
    returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()
