"""The block-fidelity benchmark runs end to end and orders the settings as it should."""

import json

from helpers import run_benchmark


def test_block_fidelity_reports_every_setting(tmp_path):
    out = tmp_path / "fidelity.json"
    done = run_benchmark("block_fidelity.py", "--steps", "5", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    error = {name: r["gradient_relative_error"] for name, r in rows.items()}
    assert error["8-bit (default)"] < error["4-bit block, attention 8"] < error["4-bit block"]
    assert rows["4-bit block"]["stored_vs_exact"] < rows["8-bit (default)"]["stored_vs_exact"]
    assert all(0 < r["bits_per_element"] < 8 for r in rows.values())
