"""``timm:NAME`` through the real console script, in the environment that has timm
(``.venv-zoo``; ``make test`` runs ``pytest -m zoo`` there, see the Makefile)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.zoo
SCRIPT = shutil.which("torchmesa", path=str(Path(sys.executable).parent))


def cli(*args, timeout=600):
    assert SCRIPT, "the torchmesa console script is not installed next to this Python"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_profile_a_timm_model():
    done = cli("profile", "timm:resnet18", "--batch-size", "2", "--image-size", "64", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "timm:resnet18"
    assert report["batch"] == {"input": [2, 3, 64, 64]}
    assert report["ratio"] > 2.2  # 8-bit codes, 16-bit BatchNorm inputs (2.32 at batch 2)


def test_fit_a_timm_model(tmp_path):
    # A ViT: timm checkpoints its blocks. (test_resnet's stages hold one block each, so
    # checkpointing them saves about nothing: 108 against exact's 116 on the CI machine.)
    out = tmp_path / "fit.json"
    done = cli("fit", "timm:test_vit", "--image-size", "64", "--memory", "160MiB",
               "--configs", "exact", "torchmesa", "checkpoint", "--json", str(out),
               "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert 0 < results["exact"]["largest"] < results["torchmesa"]["largest"]
    assert results["checkpoint"]["largest"] > results["exact"]["largest"]
    assert "timm:test_vit: the largest batch that trains in 0.16 GiB" in done.stdout


def test_an_unknown_timm_model_names_close_ones():
    done = cli("profile", "timm:resnet_18")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "timm:resnet_18: timm" in done.stderr and "has no such model" in done.stderr


def test_timm_checkpointing_keeps_the_gradients():
    from torchmesa.apps.sources import Sizes, resolve

    w = resolve("timm:vit_tiny_patch16_224", Sizes(image_size=32))
    batch = w.batch(2)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = w.build().train()
        if checkpointed:
            model = w.checkpointed(model)
        w.loss(model, batch).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b)
