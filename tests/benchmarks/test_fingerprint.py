"""The fingerprint a refactor is checked with is the same run to run and sees a change."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fingerprint(tmp_path, name):
    out = tmp_path / f"{name}.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "fingerprint.py"),
        "--configs", "default", "bits4", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_the_fingerprint_repeats_and_tells_configs_apart(tmp_path):
    first, second = _fingerprint(tmp_path, "a"), _fingerprint(tmp_path, "b")
    assert first == second and len(first) == 6
    for model in ("block-{}-fp32", "block-{}-bf16", "conv-{}"):
        eight, four = first[model.format("default")], first[model.format("bits4")]
        assert eight["hash"] != four["hash"]
        stored, exact = eight["stored_exact_bytes"][-1]
        assert four["stored_exact_bytes"][-1][0] < stored < exact
