"""The benchmark runs end to end (tiny shapes) and reports what README tables are made of."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchmesa.benchmark import CONFIGS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "bench.py"),
        "--models", "tiny-vit", "--batch", "4",
        "--warmup", "0", "--steps", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "max batch" in done.stdout  # the printed table
    report = json.loads(out.read_text())
    rows = {(r["model"], r["config"]): r for r in report["rows"]}
    assert len(rows) == len(CONFIGS)
    exact, mesa = rows["tiny-vit", "exact"], rows["tiny-vit", "torchmesa-ema"]
    assert exact["saved_vs_exact"] == 1.0
    assert mesa["saved_vs_exact"] < 0.5
    checkpointed = rows["tiny-vit", "checkpoint"]["saved_bytes"]
    assert checkpointed > 0  # block inputs are counted
    # inside a compressed model, checkpoint's kept block inputs are compressed too
    assert rows["tiny-vit", "checkpoint+torchmesa"]["saved_bytes"] < checkpointed / 2
    for r in (exact, mesa):
        assert r["peak_delta_bytes"] > 0 and r["step_seconds_median"] > 0
    assert {"when", "device", "torch", "command", "definitions"} <= set(report)


def test_decoder_spec_trains_compressed_and_checkpointed():
    import torch

    import torchmesa
    from torchmesa.models import SPECS, CheckpointedSequential, checkpoint_blocks

    spec = SPECS["tiny-decoder"]
    torch.manual_seed(0)
    plain = spec.build()
    batch = spec.batch(2)
    exact_loss = spec.loss(plain, batch)
    model = torchmesa.compress(checkpoint_blocks(spec.build()))
    assert isinstance(model.blocks, CheckpointedSequential)
    model.load_state_dict(plain.state_dict())
    with torchmesa.track() as t:
        loss = spec.loss(model, batch)
    assert torch.equal(loss, exact_loss)
    inputs = t.by_module["blocks"]  # each checkpointed block's input, kept compressed
    assert inputs.tensors == 2 and inputs.exact_bytes == 2 * 2 * 64 * 64 * 4
    assert inputs.stored_bytes < inputs.exact_bytes / 3.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
