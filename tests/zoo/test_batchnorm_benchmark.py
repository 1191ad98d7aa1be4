"""benchmarks/batchnorm.py, on one small network (it needs timm: the second environment)."""

import json

import pytest
from helpers import run_benchmark

pytestmark = pytest.mark.zoo


def test_batchnorm_benchmark_compares_the_three_settings(tmp_path):
    out = tmp_path / "bn.json"
    done = run_benchmark("batchnorm.py", "--models", "resnet18", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["batch_norm"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"quantize", "half", "exact"}
    # 16-bit copies cost bytes beside 8-bit codes, and exact costs more still
    assert rows["quantize"]["ratio"] > rows["half"]["ratio"] > rows["exact"]["ratio"] > 1.0
    assert rows["half"]["batch_norm_rel_error"] < rows["quantize"]["batch_norm_rel_error"]
