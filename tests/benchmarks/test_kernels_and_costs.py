"""The kernel benchmark runs end to end and reports hot and cold ratios to a copy."""

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
