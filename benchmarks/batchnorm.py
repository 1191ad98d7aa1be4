"""BatchNorm inputs: 8-bit codes, a 16-bit copy (the default) or exact, on timm's CNNs.

For each network (timm, untrained, 64x64 images, batch 4, cross-entropy) and each
``Config(batch_norm=...)``: the bytes stored against exact's, the worst gradient cosine
over the parameters whose gradient is not near zero (the test suite's rule,
``tests/helpers.py``), the worst BatchNorm weight gradient's cosine and relative error,
and the largest error of a near-zero gradient, per element, relative to the model's
typical gradient (the suite asks for under 1e-2). Needs timm: run it in the second environment.

    OMP_NUM_THREADS=1 .venv-zoo/bin/python benchmarks/batchnorm.py    # about 15 seconds

(One thread: the figures of docs/fidelity.md; with two, summation order moves the fifth decimal.)

Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torchmesa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import compare

MODELS = ("resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100", "mobilevit_xxs")
SETTINGS = ("quantize", "half", "exact")


def measure(name: str, setting: str) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)

    def run(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        out = m(x)
        return out, F.cross_entropy(out, y)

    res = compare(model, run, torchmesa.Config(batch_norm=setting))
    bn = {n: v for n, v in res.cosines.items() if n.endswith("weight") and "bn" in n}
    worst_bn = min(bn, key=lambda n: bn[n][0])
    return {
        "model": name,
        "batch_norm": setting,
        "ratio": res.ratio,
        "stored_bytes": res.stored_bytes,
        "exact_bytes": res.exact_bytes,
        "min_cosine": res.min_cosine,
        "worst_param": res.worst_param,
        "near_zero_max_error": max(res.null_params.values(), default=0.0),
        "worst_batch_norm_weight": worst_bn,
        "batch_norm_cosine": bn[worst_bn][0],
        "batch_norm_rel_error": bn[worst_bn][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results/batchnorm-cpu.json")
    args = parser.parse_args()
    started = time.time()
    rows = [measure(m, s) for m in args.models for s in SETTINGS]
    print(f"{'model':24s} {'batch_norm':10s} {'ratio':>6s}  {'min cosine':>10s}  "
          f"{'worst BatchNorm weight: cosine':>30s}  rel. error  near-zero error")  # fmt: skip
    for r in rows:
        print(f"{r['model']:24s} {r['batch_norm']:10s} {r['ratio']:5.2f}x  "
              f"{r['min_cosine']:10.5f}  {r['batch_norm_cosine']:30.5f}  "
              f"{r['batch_norm_rel_error']:9.3f}  {r['near_zero_max_error']:14.1e}")  # fmt: skip
    report = {
        "command": "OMP_NUM_THREADS=1 .venv-zoo/bin/python benchmarks/batchnorm.py",
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
