"""The kernel benchmark and the step-cost breakdown run end to end and report every figure."""

import importlib.util
import json
import platform
from pathlib import Path

import pytest
from helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _kernels_module():
    spec = importlib.util.spec_from_file_location(
        "kernels_bench", ROOT / "benchmarks" / "kernel_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_side_by_side_reports_ratios_to_the_first_function(monkeypatch):
    kernels = _kernels_module()
    clock = [0.0]
    slow = [1.0]  # the machine's speed, moved between rounds

    def work(seconds, base=False):
        def fn():
            if base:
                slow[0] = 3.0 if slow[0] == 1.0 else 1.0
            clock[0] += seconds * slow[0]

        return fn

    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    fns = {"copy": work(0.002, base=True), "twice": work(0.004), "half": work(0.001)}
    out = kernels.side_by_side(fns, "cpu", 5, warm=False)
    assert out["twice"] == pytest.approx(2.0) and out["half"] == pytest.approx(0.5)
    assert out["copy"] == pytest.approx(0.006)  # the base in seconds: the median round's


def test_kernel_benchmark_reports_every_ratio(tmp_path):
    out = tmp_path / "kernels.json"
    done = run_benchmark("kernel_speed.py", "--repeats", "1", "--cold-mib", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "worst fused dequantize (cold) / copy" in done.stdout
    report = json.loads(out.read_text())
    assert report["command"].endswith("--cold-mib 32 --out " + str(out))
    assert len(report["rows"]) == 6  # three DeiT-S tensors, fp32 and bf16
    if platform.libc_ver()[0] == "glibc":
        assert report["steady_allocator"] is True
    for row in report["rows"]:
        for key in ("quantize", "delayed_quantize", "dequantize"):
            assert row[f"fused_{key}_vs_copy"] > 0 and row[f"fused_{key}_cold_vs_copy"] > 0
        assert row["copy_cold_ms"] > 0
    assert len(report["blocks"]) == 16  # two tensors, two dtypes, four block settings
    for row in report["blocks"]:
        assert row["quantize_vs_copy"] > 0 and row["dequantize_cold_vs_copy"] > 0
        assert 3.2 < row["bits_per_element"] < 4.6
    assert "worst 4-bit fp16 rotated float32 / copy (hot)" in done.stdout
    assert [m["dtype"] for m in report["masks"]] == ["float32", "bool"]
    assert all(m["pack_vs_copy"] > 0 and m["unpack_vs_copy"] > 0 for m in report["masks"])


def test_step_costs_split_the_step_into_kernels_and_the_rest(tmp_path):
    out = tmp_path / "costs.json"
    done = run_benchmark("step_costs.py", "--model", "tiny-vit", "--warmup", "1", "--steps", "2",
                         "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hooks outside the kernels" in done.stdout
    report = json.loads(out.read_text())
    kernels = report["kernel_seconds_per_step"]
    # delayed scaling's step (quantize, measure, move the estimate) is one C call
    assert kernels["tm_quantize_delayed"] > 0 and kernels["tm_dequantize"] > 0
    assert "tm_ema" not in kernels and "tm_scale" not in kernels
    hooks = report["hook_seconds_per_step"]
    assert hooks["pack"] + hooks["unpack"] > sum(kernels.values())
    assert report["outside_kernels_seconds_per_step"] > 0 and report["step_time_vs_exact"] > 0
    assert report["hooks_only_step_seconds"] > 0 and report["hooks_only_vs_exact"] > 0
    assert "hooks only (nothing stored)" in done.stdout


def test_step_costs_of_the_default_setting_on_the_demo_model(tmp_path):
    out = tmp_path / "costs.json"
    args = ("--model", "vit-digits", "--batch", "16", "--config", "torchmesa")
    done = run_benchmark("step_costs.py", *args, "--warmup", "1", "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "vit-digits" and report["config"] == "torchmesa"
    assert report["kernel_seconds_per_step"]["tm_dequantize"] > 0  # each batch's own ranges
    assert "tm_quantize_delayed" not in report["kernel_seconds_per_step"]
    # the default rebuilds norms, GELUs and probabilities in backward: timed apart, and
    # the Python around the kernels and the reruns is what is left of the hooks
    parts = report["part_seconds_per_step"]
    assert parts["rerun a norm or activation"] > 0 and parts["rebuild probabilities"] > 0
    assert parts["decide"] > 0 and parts["recognise a derived tensor"] > 0
    rest = report["outside_kernels_and_reruns_seconds_per_step"]
    assert 0 < rest < report["outside_kernels_seconds_per_step"]
    assert "hooks outside kernels and reruns" in done.stdout
    calls = report["calls_per_step"]
    assert 0 < calls["exact"] < calls["torchmesa"]  # the hooks' Python, counted
