"""Run by tests/test_fsdp.py under torchrun (or alone): LoRA adapters on a tiny GPT-2, then FSDP2 when there are
several ranks; three AdamW steps with clipping on a fixed global batch split over the ranks. Rank 0 writes the
losses and every full (unsharded) parameter to the file named by argv[1]."""

import sys

import torch

from nanolab import dist
from nanolab.fsdp import local_norm, shard_model
from nanolab.lora import apply_lora
from nanolab.models import build_model, preset
from nanolab.optim import build_adamw


def main(out: str) -> None:
    rank, _, world, device = dist.setup_distributed("cpu", timeout_s=60)
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny", vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=16,
                               dropout=0.0))
    apply_lora(model, r=4, alpha=8)
    if world > 1:
        shard_model(model, device)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    opt = build_adamw(model, 1e-2, 0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x = torch.randint(0, 32, (4, 16), generator=g)
        rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
        _, loss = model(x[rows], x[rows].roll(1, 1))
        loss.backward()
        norm = local_norm(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.05))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(dist.all_reduce_mean(loss.detach())))
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"losses": losses, "params": full, "trainable": trainable, "norm": float(norm)}, out)
    dist.cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
