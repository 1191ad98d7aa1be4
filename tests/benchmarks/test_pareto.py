"""The Pareto plot measures each setting's stored bits and draws the gaps it is given."""

import json

from helpers import run_benchmark


def test_pareto_measures_bits_and_plots_the_given_gaps(tmp_path):
    results = tmp_path / "convergence.json"
    verdicts = {"stdlib-gpt": {
        "exact": {"gap_to_exact": 0.0},
        "4-bit block": {"gap_to_exact": 0.0123},
        "8-bit derived": {"gap_to_exact": -0.0004},
        "not a setting": {"gap_to_exact": 1.0},
    }}  # fmt: skip
    results.write_text(json.dumps({"verdicts": verdicts}))
    out = tmp_path / "pareto.png"
    done = run_benchmark("pareto.py", "--results", str(results), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000
    points = json.loads(out.with_suffix(".json").read_text())["points"]["stdlib-gpt"]
    assert set(points) == {"exact", "4-bit block", "8-bit derived"}
    assert points["exact"]["bits_per_element"] == 32.0
    assert 2.5 < points["4-bit block"]["bits_per_element"] < 4.6
    assert 4.0 < points["8-bit derived"]["bits_per_element"] < 8.5
    assert points["4-bit block"]["gap"] == 1.23  # percent, for the language model
