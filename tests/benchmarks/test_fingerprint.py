"""The fingerprint a refactor is checked with is the same run to run and sees a change."""

import json

from helpers import run_benchmark


def _fingerprint(tmp_path, name):
    out = tmp_path / f"{name}.json"
    done = run_benchmark("fingerprint.py", "--configs", "default", "bits4", "--out", str(out))
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
