"""The kernel benchmark and the step-cost breakdown run end to end and report every figure."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_reports_every_ratio(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--repeats", "1",
        "--cold-mib", "32", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "worst fused dequantize (cold) / copy" in done.stdout
    report = json.loads(out.read_text())
    assert report["command"].endswith("--cold-mib 32 --out " + str(out))
    assert len(report["rows"]) == 6  # three DeiT-S tensors, fp32 and bf16
    for row in report["rows"]:
        for key in ("quantize", "delayed_quantize", "dequantize"):
            assert row[f"fused_{key}_vs_copy"] > 0 and row[f"fused_{key}_cold_vs_copy"] > 0
        assert row["copy_cold_ms"] > 0


def test_step_costs_split_the_step_into_kernels_and_the_rest(tmp_path):
    out = tmp_path / "costs.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "step_costs.py"), "--model", "tiny-vit",
        "--warmup", "1", "--steps", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
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
