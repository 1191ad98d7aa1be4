"""The benchmark runs end to end (tiny shapes) and reports what the tables in docs/ are made of."""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_benchmark

import torchmesa
from torchmesa.apps.benchmark import CONFIGS, MESA_REPORTED, Setup, default_batch, mesa_table, table
from torchmesa.apps.models import SPECS, CheckpointedSequential, checkpoint_blocks


def _bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    done = run_benchmark("bench.py", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    stdout, report = _bench(
        tmp_path, "--models", "tiny-vit", "--batch", "4", "--warmup", "0", "--steps", "1"
    )
    assert "max batch" in stdout  # the printed table
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
        assert r["peak_bytes"] > 0 and r["step_seconds_median"] > 0
        assert r["samples_per_second"] == pytest.approx(4 / r["step_seconds_median"])
        assert r["held_after_forward_bytes"] > 0 and r["first_step_seconds"] > 0
    # forward of the compressed model holds less, measured by the process, not by track()
    assert mesa["held_after_forward_bytes"] < exact["held_after_forward_bytes"]
    assert {"when", "device", "torch", "command", "definitions", "precision"} <= set(report)
    for r in rows.values():  # the largest batch: on the line through the reported peaks
        per = (r["peak_bytes_2x_batch"] - r["peak_bytes"]) / r["batch"]
        budget = report["budget_gib"] * 2**30
        want = int((budget - (r["peak_bytes"] - per * r["batch"])) // per) if per > 0 else None
        assert r["max_batch_in_budget"] == want
    assert report["precision"] == "fp32"


@pytest.mark.slow
def test_bench_hugging_face_gpt2_under_bf16_autocast(tmp_path):
    configs = ["exact", "torchmesa-delayed", "checkpoint", "checkpoint+torchmesa"]
    _, report = _bench(
        tmp_path, "--models", "tiny-hf-gpt2", "--batch", "2", "--warmup", "0", "--steps", "1",
        "--precision", "bf16", "--configs", *configs,
    )  # fmt: skip
    assert report["precision"] == "bf16"
    rows = {r["config"]: r for r in report["rows"]}
    assert list(rows) == configs
    # bf16 activations: 8-bit codes are half their bytes, plus masks and kept tensors
    assert rows["torchmesa-delayed"]["saved_vs_exact"] < 0.6
    # Hugging Face's own checkpointing keeps block inputs; compressed inside our model
    assert rows["checkpoint+torchmesa"]["saved_bytes"] < rows["checkpoint"]["saved_bytes"]
    assert all(
        r["max_batch_in_budget"] is None or r["max_batch_in_budget"] > 0 for r in rows.values()
    )


def test_hugging_face_spec_trains_compressed_and_checkpointed():
    pytest.importorskip("transformers")
    spec = SPECS["tiny-hf-gpt2"]
    torch.manual_seed(0)
    plain = spec.build().train()
    batch = spec.batch(2)
    torch.manual_seed(1)
    exact_loss = spec.loss(plain, batch)
    model = torchmesa.compress(spec.checkpointed(spec.build()).train())
    model.load_state_dict(plain.state_dict())
    torch.manual_seed(1)  # the same dropout masks
    with torchmesa.track() as t:
        loss = spec.loss(model, batch)
    assert torch.equal(loss, exact_loss)
    assert 0 < t.stored_bytes < t.exact_bytes / 3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_decoder_spec_trains_compressed_and_checkpointed():
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


def _row(model: str, config: str, peak: int, exact: bool = True) -> dict:
    ratio = None if not exact else 1.0
    return {
        "model": model, "kind": "vit" if model.startswith("deit") else "decoder",
        "config": config, "batch": 128, "saved_bytes": 2**20,
        "saved_vs_exact": ratio, "held_vs_exact": ratio, "peak_bytes": peak,
        "peak_vs_exact": ratio, "step_time_vs_exact": ratio, "samples_per_second": 25.6,
        "first_step_seconds": 0.5,
        "max_batch_in_budget": 300,
    }  # fmt: skip


def test_mesa_table_sets_our_peaks_beside_the_papers():
    rows = [_row("deit-ti", "exact", 4000 * 2**20), _row("deit-ti", "torchmesa-ema", 1800 * 2**20)]
    rows += [_row("gpt2-s", "exact", 2**30), _row("gpt2-s", "torchmesa-ema", 2**29)]
    text = mesa_table(rows)
    assert "gpt2-s" not in text  # the paper's table is of vision models
    paper = MESA_REPORTED["deit-ti"]
    assert f"{paper[0]} -> {paper[1]}" in text
    assert "0.450" in text  # 1800 / 4000
    assert f"{paper[1] / paper[0]:.3f}" in text


def test_table_without_an_exact_row_prints_no_ratios():
    text = table([_row("deit-s", "torchmesa-delayed", 2**30, exact=False)], 16)
    assert " - " in text and "torchmesa-delayed" in text


def test_setup_measures_the_cpu_as_design_defines():
    setup = Setup("cpu", "bf16")
    assert setup.memory() > 0
    setup.reset_peak()
    assert setup.peak() >= setup.memory() * 0.9
    with setup.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16
    before = setup.in_use()
    held = torch.ones(2**20, dtype=torch.float64)  # 8 MiB, touched
    grown = setup.in_use() - before
    assert 8 * 2**20 <= grown < 9 * 2**20  # what the tensor holds, not pages that were free
    del held


def test_a_model_named_alone_gets_a_batch_this_machine_runs():
    assert default_batch("deit-s", "quick") == 8  # the preset's own
    assert default_batch("hf-gpt2", "quick") == 1  # not in quick: the full preset's
    assert default_batch("deit-b", "mesa") == 128
    assert default_batch("tiny-vit", "quick") == 8  # in no preset
