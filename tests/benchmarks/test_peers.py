"""The peers benchmark runs end to end on a tiny GPT-2 (dropout on): every row measured,
the table and the JSON written, torchmesa's rows placed against the peers."""

import json

import pytest
from helpers import run_benchmark


@pytest.mark.slow
def test_peers_measures_each_row_against_exact(tmp_path):
    out = tmp_path / "peers.json"
    rows = ["checkpoint", "selective", "torchmesa", "checkpoint+torchmesa"]
    done = run_benchmark("peers.py", "--model", "tiny-hf-gpt2", "--batch", "8", "--steps", "2",
                         "--rows", *rows, "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worst cosine" in done.stdout and "exact timed again last" in done.stdout
    report = json.loads(out.read_text())
    got = {r["row"]: r for r in report["rows"]}
    assert list(got) == ["exact", *rows]  # exact always first: every ratio's reference
    for name, r in got.items():
        assert r["worst_grad_cosine"] > 0.999, name  # the same dropout masks in every row
        assert r["time_per_sample_s"] > 0 and r["peak_per_sample_bytes"] > 0, name
        assert r["transient_per_sample_bytes"] == pytest.approx(
            r["peak_per_sample_bytes"] - r["held_per_sample_bytes"]
        )
    # what each keeps after forward, per sample: checkpointing a block's input, selective
    # checkpointing its products too, torchmesa 8-bit codes
    exact = got["exact"]["held_per_sample_bytes"]
    assert got["checkpoint"]["held_per_sample_bytes"] < got["selective"]["held_per_sample_bytes"]
    assert got["selective"]["held_per_sample_bytes"] < exact
    assert got["torchmesa"]["held_per_sample_bytes"] < 0.4 * exact
    assert got["checkpoint+torchmesa"]["held_per_sample_bytes"] < 0.4 * exact
    assert set(report["dominated"]) == {"torchmesa", "checkpoint+torchmesa"}
