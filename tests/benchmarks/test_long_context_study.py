"""The long-context benchmark runs end to end and reports every part (its smoke test)."""

import json

from helpers import run_benchmark


def test_long_context_quick_reports_every_part_and_setting(tmp_path):
    out = tmp_path / "long.json"
    done = run_benchmark("long_context.py", "--quick", "--parts", "fidelity", "rows", "storage",
                         "speed", "convergence", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    settings = {"rebuild", "log", "linear"}
    assert {r["setting"] for r in report["fidelity"]} == settings
    assert all(r["forward_equal"] and r["min_cosine"] > 0.99 for r in report["fidelity"])
    assert [r["ranges"] for r in report["rows"]] == ["head", "row"]
    assert all(r["min_cosine"] > 0.99 for r in report["rows"])
    storage = report["storage"][0]
    assert storage["linear"] > 2 * max(storage["rebuild"], storage["log"])  # even at 128 tokens
    assert set(report["speed"]["eager"]) == {"exact_seconds", "quartiles", *settings}
    assert set(report["convergence"][0]) == {"seed", "exact", *settings}
    parts = ("worst gradient cosine", "a range per row", "relative error of dq", "step time")
    for part in (*parts, "validation"):
        assert part in done.stdout
