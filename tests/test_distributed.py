"""DDP on the CPU (gloo, 2 processes): compressed ranks agree, and match exact training."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchmesa

WORLD = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )  # fmt: skip


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DDP(torchmesa.compress(make_model()))
        x, y = batch()
        with torchmesa.track() as t:
            loss = F.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD])
        loss.backward()
        grads = [p.grad for p in model.module.parameters()]
        torch.save({"grads": grads, "ratio": t.ratio}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_exact(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for a, b in zip(ranks[0]["grads"], ranks[1]["grads"]):
        assert torch.equal(a, b)  # DDP averaged the same gradients onto every rank
    assert all(r["ratio"] > 3.5 for r in ranks)
    exact = make_model()
    x, y = batch()
    F.cross_entropy(exact(x), y).backward()
    for (name, p), g in zip(exact.named_parameters(), ranks[0]["grads"]):
        cos = F.cosine_similarity(p.grad.flatten().double(), g.flatten().double(), dim=0)
        assert cos > 0.999, (name, float(cos))
