"""The peak model runs on a tiny GPT-2: per setting, what forward held, both peaks and
what is alive at them."""

import json

import pytest
from helpers import run_benchmark


@pytest.mark.slow
def test_the_peak_model_places_each_peak(tmp_path):
    out = tmp_path / "peaks.json"
    done = run_benchmark("peak_model.py", "--models", "tiny-hf-gpt2", "--batch", "8",
                         "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"exact", "torchmesa", "mesa"}
    for name, r in rows.items():
        top = max(r["forward"]["peak_mib_per_sample"], r["backward"]["peak_mib_per_sample"])
        assert r["transient_mib_per_sample"] == pytest.approx(top - r["held_mib_per_sample"])
        assert r["forward"]["peak_mib_per_sample"] >= r["held_mib_per_sample"] > 0, name
        assert r["backward"]["op"] and r["backward"]["alive_mib_per_sample_by_op"], name
    # torchmesa holds codes where exact holds the activations
    assert rows["torchmesa"]["held_mib_per_sample"] < 0.5 * rows["exact"]["held_mib_per_sample"]
    assert "backward peak at" in done.stdout
