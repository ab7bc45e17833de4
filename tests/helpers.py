"""Small helpers the test files share (pytest puts this folder on sys.path: `from helpers import ...`)."""

import torch


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so norms/biases are not ones/zeros (a mapping error must show in the logits);
    returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()
