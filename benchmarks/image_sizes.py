"""Convolutional and hybrid networks at the image sizes people train, beyond the zoo's 64x64.

The zoo trains each model on 64x64 images; a miss can hide there (a channel whose
variance sits near BatchNorm's eps, a value near a hardswish kink, a divisor as small as
its eps). For each model and size (timm, untrained, cross-entropy, one step, the test
suite's rule for near-zero gradients, ``tests/helpers.py``): the bytes stored against
exact's, the worst gradient cosine and where, and beside it how far exact training under
bf16 autocast is from exact fp32 on the same step (worst cosine and where): a parameter
whose gradient cancels so finely that bf16 loses it too. ``--compiled`` adds the same step under
``torch.compile`` against compiled exact for the models in COMPILED (a minute or two
each to compile); ``--checkpointed`` the models in CHECKPOINTED trained with timm's
checkpointing switch, where backward runs each segment again from its stored input.
Needs timm: run it in the second environment.

    .venv-zoo/bin/python benchmarks/image_sizes.py               # about a minute
    .venv-zoo/bin/python benchmarks/image_sizes.py --compiled    # about 5 minutes more

Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import torchmesa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))
from catalog import _timm
from helpers import compare, grad_cosines

# (timm model, image size, batch)
CASES = (
    ("mobilenetv3_small_100", 64, 4), ("mobilenetv3_small_100", 128, 8),
    ("mobilenetv3_small_100", 224, 4), ("fastvit_t8", 64, 4), ("fastvit_t8", 128, 4),
    ("fastvit_t8", 224, 2), ("efficientnet_b0", 128, 8), ("efficientnet_b0", 224, 4),
    ("resnet18", 224, 4), ("efficientvit_b0", 64, 4), ("efficientvit_b0", 128, 4),
    ("efficientvit_b0", 224, 2),
)  # fmt: skip
COMPILED = (("resnet18", 128, 8), ("mobilenetv3_small_100", 128, 8), ("efficientvit_b0", 64, 4))
# trained with timm's own checkpointing switch (set_grad_checkpointing)
CHECKPOINTED = (("resnet18", 128, 8), ("mobilenetv3_small_100", 128, 8),
                ("deit_tiny_patch16_224", 224, 4))  # fmt: skip


def bf16_exact(name: str, image: int, batch: int) -> tuple[float, str]:
    """Exact training under bf16 autocast against exact fp32, one step: the worst
    gradient cosine and its parameter."""
    model, run = _timm(name, image, batch)()
    reference = copy.deepcopy(model)
    for m, dtype in ((reference, None), (model, torch.bfloat16)):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            run(m)[1].backward()
    cosines = grad_cosines(reference, model)
    worst = min(cosines, key=lambda n: cosines[n][0])
    return cosines[worst][0], worst


def measure(name: str, image: int, batch: int, checkpointed: bool = False) -> dict:
    model, run = _timm(name, image, batch)()  # the zoo's model and batch at another size
    if checkpointed:  # exact's copy checkpoints too: the same gradients
        model.set_grad_checkpointing(True)
    bf16_cosine, bf16_worst = bf16_exact(name, image, batch)
    res = compare(model, run)
    return {
        "model": name, "image": image, "batch": batch, "compiled": False,
        "checkpointed": checkpointed,
        "ratio": res.ratio, "min_cosine": res.min_cosine, "worst_param": res.worst_param,
        "forward_equal": res.forward_equal,
        "near_zero_max_error": max(res.null_params.values(), default=0.0),
        "bf16_exact_min_cosine": bf16_cosine, "bf16_exact_worst_param": bf16_worst,
    }  # fmt: skip


def measure_compiled(name: str, image: int, batch: int) -> dict:
    model, run = _timm(name, image, batch)()
    exact = copy.deepcopy(model)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's notes on graph breaks
        compiled, compiled_exact = torch.compile(torchmesa.compress(model)), torch.compile(exact)
        (out, loss), (out_exact, loss_exact) = run(compiled), run(compiled_exact)
    loss.backward()
    loss_exact.backward()
    cosines = grad_cosines(exact, model)
    worst = min(cosines, key=lambda n: cosines[n][0])
    torchmesa.decompress(model)
    return {
        "model": name, "image": image, "batch": batch, "compiled": True,
        "checkpointed": False, "ratio": None,
        "min_cosine": cosines[worst][0], "worst_param": worst,
        "forward_equal": torch.equal(out, out_exact), "near_zero_max_error": None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiled", action="store_true", help="add the compiled cases")
    parser.add_argument("--checkpointed", action="store_true",
                        help="add the cases trained with timm's checkpointing")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/image-sizes-cpu.json")
    args = parser.parse_args()
    started = time.time()
    rows = [measure(*case) for case in CASES]
    if args.compiled:
        rows += [measure_compiled(*case) for case in COMPILED]
    if args.checkpointed:
        rows += [measure(*case, checkpointed=True) for case in CHECKPOINTED]
    print(f"{'model':24s} {'image':>5s} {'batch':>5s} {'path':10s} {'ratio':>6s}  "
          f"{'min cosine':>10s}  {'bf16 exact':>10s}  worst parameter")  # fmt: skip
    for r in rows:
        ratio = f"{r['ratio']:5.2f}x" if r["ratio"] is not None else "     -"
        path = "compiled" if r["compiled"] else "checkpoint" if r["checkpointed"] else "eager"
        bf16 = r.get("bf16_exact_min_cosine")
        bf16_text = f"{bf16:10.5f}" if bf16 is not None else f"{'-':>10s}"
        print(f"{r['model']:24s} {r['image']:5d} {r['batch']:5d} {path:10s} {ratio}  "
              f"{r['min_cosine']:10.5f}  {bf16_text}  {r['worst_param']}")  # fmt: skip
    command = ".venv-zoo/bin/python benchmarks/image_sizes.py"
    report = {
        "command": command
        + (" --compiled" if args.compiled else "")
        + (" --checkpointed" if args.checkpointed else ""),
        "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
