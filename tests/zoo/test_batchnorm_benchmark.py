"""benchmarks/batchnorm.py, on one small network (it needs timm: the second environment)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.zoo
ROOT = Path(__file__).resolve().parents[2]


def test_batchnorm_benchmark_compares_the_three_settings(tmp_path):
    out = tmp_path / "bn.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "batchnorm.py"), "--models", "resnet18",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {r["batch_norm"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"quantize", "half", "exact"}
    # 16-bit copies cost bytes beside 8-bit codes, and exact costs more still
    assert rows["quantize"]["ratio"] > rows["half"]["ratio"] > rows["exact"]["ratio"] > 1.0
    assert rows["half"]["batch_norm_rel_error"] < rows["quantize"]["batch_norm_rel_error"]
