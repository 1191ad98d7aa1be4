"""The soak benchmark runs end to end (few steps) and reports every check it makes."""

import json

import pytest
from helpers import run_benchmark


@pytest.mark.slow
def test_soak_smoke(tmp_path):
    out = tmp_path / "soak.json"
    done = run_benchmark("soak.py", "--steps", "40", "--batch", "4", "--seq", "32",
                         "--dim", "32", "--max-loss-gap", "0.05", "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert done.returncode == (0 if report["passed"] else 1), done.stderr
    assert "memory growth over the second half" in done.stdout
    assert set(report["checks"]) == {
        "memory_growth_below_limit",
        "same_bytes_held_after_every_forward",
        "nothing_held_after_backward",
        "no_record_alive_at_the_end",
        "estimator_sites_fixed",
        "loss_within_tolerance",
    }
    assert report["passed"], report["checks"]
    assert report["held_after_forward_bytes"][0] > 0
    assert {"when", "device", "torch", "command", "settings"} <= set(report)


def test_soak_refuses_too_few_steps():
    done = run_benchmark("soak.py", "--steps", "3", timeout=120)
    assert done.returncode == 2 and "--steps must be at least 10" in done.stderr
