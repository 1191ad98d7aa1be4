"""benchmarks/linear_attention.py at one size (it needs timm: the second environment)."""

import json

import pytest
from helpers import run_benchmark

pytestmark = pytest.mark.zoo


def test_the_linear_attention_benchmark_finds_which_saves_need_more_bits(tmp_path):
    out = tmp_path / "linear.json"
    done = run_benchmark("linear_attention.py", "--cases", "64x4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["forward_equal"] for r in rows.values())
    # 8-bit codes miss; the product's and the division's saves kept exact recover it,
    # at almost the same bytes (they are small), and neither alone does; the rule keeps
    # them (and holds their codes too)
    off = rows["8-bit codes (rule off)"]
    assert off["min_cosine"] < 0.99
    assert rows["q product and division kept"]["min_cosine"] > 0.999
    assert rows["q product kept"]["min_cosine"] < 0.999
    assert rows["division kept"]["min_cosine"] < 0.999
    assert rows["q product and division kept"]["ratio"] > 0.97 * off["ratio"]
    rule = rows["torchmesa (rule on)"]
    assert rule["min_cosine"] > 0.999 and rule["ratio"] > 0.85 * off["ratio"]
