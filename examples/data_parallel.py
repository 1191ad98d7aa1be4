"""Data-parallel training with torchmesa, launched by torchrun: DDP or FSDP2.

    torchrun --nproc_per_node 2 examples/data_parallel.py --engine ddp
    torchrun --nproc_per_node 2 examples/data_parallel.py --engine fsdp --steps 20

Compress each rank's model first, then wrap it: ``DistributedDataParallel`` or FSDP2's
``fully_shard``. torchmesa compresses activations only; the parameters FSDP gathers for a
layer are parameters, which torchmesa never quantizes. Runs on CPUs (gloo) or GPUs (nccl).
With ``--out DIR`` each rank writes its losses, saved-activation bytes and final
parameters there (the tests compare them across ranks and with one process).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import torchmesa


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 128), nn.GELU(),
        nn.Linear(128, 10),
    )  # fmt: skip


def batches(steps: int, size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches, the same on every rank; each rank trains on its slice."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(steps)]  # fmt: skip


def wrap(model: nn.Module, engine: str) -> nn.Module:
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole: FSDP's shards are gathered."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = full.detach().clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="folder for each rank's results")
    args = parser.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = wrap(torchmesa.compress(make_model()), args.engine)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, exact_bytes, stored_bytes = [], [], []
        for x, y in batches(args.steps):
            with torchmesa.track() as t:
                loss = F.cross_entropy(model(x[rank::world]), y[rank::world])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            exact_bytes.append(t.exact_bytes)
            stored_bytes.append(t.stored_bytes)
        params = full_parameters(model)
        if rank == 0:
            ratio = exact_bytes[-1] / stored_bytes[-1]
            print(f"{args.engine}: {world} ranks, {args.steps} steps, last loss {losses[-1]:.4f}, "
                  f"saved activations {ratio:.2f}x smaller")  # fmt: skip
        if args.out:
            result = {"losses": losses, "exact_bytes": exact_bytes, "stored_bytes": stored_bytes,
                      "params": params}  # fmt: skip
            torch.save(result, os.path.join(args.out, f"{args.engine}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
