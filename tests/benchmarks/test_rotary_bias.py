"""The rotary-bias study runs end to end and reports both arms (its smoke test)."""

import json

from helpers import run_benchmark


def test_rotary_bias_quick_reports_trained_and_frozen_key_biases(tmp_path):
    out = tmp_path / "rotary.json"
    done = run_benchmark("rotary_bias.py", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    runs = {r["key_biases_frozen"]: r for r in report["runs"]}
    assert set(runs) == {False, True}
    assert runs[True]["drift_key_biases"] == 0.0  # frozen: they never moved
    assert runs[False]["drift_key_biases"] > 0.0
    assert len(runs[False]["key_bias_cosines_along_exact"]) == 6  # every step of 6
    assert all(0.9 < c <= 1.0 for c in runs[False]["key_bias_cosines_along_exact"])
    assert "mean |validation-loss gap|" in done.stdout
