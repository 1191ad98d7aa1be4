"""A bitwise fingerprint of what torchmesa stores and the gradients it gives, per config.

For a refactor that must not change codes or figures: run it before and after and compare
the JSON (``cmp``). Each case trains a small model three SGD steps through the public API
and hashes every gradient and each step's stored and exact bytes: a changed code, range,
rounding draw or stored tensor changes the hash. Two models (attention with fused QKV,
LayerNorm, GELU and dropout; a channels-last Conv2d/BatchNorm2d net), ten configs (8/4/2
bits, stochastic rounding, dynamic/EMA/delayed ranges, per-tensor/token/channel-group
groups), fp32 and bf16 autocast.

    python benchmarks/fingerprint.py --out /tmp/before.json    # then again, and cmp
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn

import torchmesa

CONFIGS = {
    "default": torchmesa.Config(),
    "bits4": torchmesa.Config(bits=4),
    "bits2": torchmesa.Config(bits=2),
    "stochastic": torchmesa.Config(rounding="stochastic"),
    "stochastic4": torchmesa.Config(bits=4, rounding="stochastic"),
    "dynamic": torchmesa.Config(estimator="dynamic"),
    "ema": torchmesa.Config(estimator="ema"),
    "delayed": torchmesa.Config(estimator="delayed"),
    "per-tensor": torchmesa.Config(groups=torchmesa.PerTensor()),
    "per-token": torchmesa.Config(groups=torchmesa.PerToken()),
    "channel-groups": torchmesa.Config(groups=torchmesa.PerChannelGroup(8)),
}


class Block(nn.Module):
    """A pre-norm Transformer block with fused QKV, dropout and a composite activation."""

    def __init__(self, d: int = 48, heads: int = 4) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads, self.drop = heads, nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) / 4).softmax(-1)
        x = x + self.proj((self.drop(a) @ v).transpose(1, 2).reshape(b, t, d))
        y = F.gelu(self.fc1(self.n2(x)))
        return x + self.fc2(self.drop(F.relu(y) * torch.tanh(y)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def fingerprint(model: nn.Module, x: torch.Tensor, config: torchmesa.Config, bf16: bool) -> dict:
    """Three SGD steps of ``model`` compressed with ``config``: a hash of every gradient,
    and each step's stored and exact bytes."""
    torch.manual_seed(0)
    model = torchmesa.compress(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    digest, steps = hashlib.sha256(), []
    for _ in range(3):
        with torchmesa.track() as tracker, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().pow(2).mean().backward()
        steps.append([tracker.stored_bytes, tracker.exact_bytes])
        for p in model.parameters():
            assert p.grad is not None
            digest.update(p.grad.float().numpy().tobytes())
        opt.step()
        opt.zero_grad()
    return {"hash": digest.hexdigest()[:16], "stored_exact_bytes": steps}


def run(names: list[str]) -> dict:
    results = {}
    for name in names:
        for bf16 in (False, True):
            torch.manual_seed(1)
            blocks, x = nn.Sequential(Block(), Block()), torch.randn(3, 17, 48)
            precision = "bf16" if bf16 else "fp32"
            results[f"block-{name}-{precision}"] = fingerprint(blocks, x, CONFIGS[name], bf16)
        torch.manual_seed(2)
        net, x = ConvNet(), torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        results[f"conv-{name}"] = fingerprint(net, x, CONFIGS[name], False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", required=True, help="JSON path")
    args = parser.parse_args()
    results = run(args.configs)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    for case, r in results.items():
        print(f"{case:28} {r['hash']}  stored/exact {r['stored_exact_bytes'][-1]}")
    print(f"wrote {args.out} ({len(results)} cases)")


if __name__ == "__main__":
    main()
