"""The peers benchmark runs end to end on a tiny GPT-2 (dropout on): every row measured,
the table and the JSON written, torchmesa's rows placed against the peers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


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


def _peers_module():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks/peers.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_a_peer_with_wrong_gradients_is_no_alternative():
    """A peer smaller and faster than a torchmesa row dominates it only if it trains like
    exact; one with wrong gradients is named as such instead."""
    bench = _peers_module()

    def row(name, mesa, peak, seconds, cosine):
        return {"row": name, "torchmesa": mesa, "peak_per_sample_bytes": peak,
                "time_per_sample_s": seconds, "worst_grad_cosine": cosine}  # fmt: skip

    rows = [row("exact", False, 10, 1.0, 1.0), row("budget", False, 3, 1.0, 0.63),
            row("smaller-faster", False, 4, 1.1, 0.9995), row("torchmesa", True, 5, 1.2, 0.9999),
            row("torchmesa-small", True, 2, 1.3, 0.9999)]  # fmt: skip
    assert bench.wrong_gradients(rows) == ["budget"]
    assert bench.dominated(rows) == {"torchmesa": ["smaller-faster"], "torchmesa-small": []}


@pytest.mark.slow
def test_compiled_rows_are_compared_with_compiled_exact(tmp_path):
    """With dropout on, compiled rows draw Inductor's masks: torchmesa compiled under a
    memory budget trains like compiled exact (it drew new masks in backward before)."""
    out = tmp_path / "peers.json"
    done = run_benchmark("peers.py", "--model", "tiny-hf-gpt2", "--batch", "8", "--steps", "1",
                         "--rows", "torchmesa-compiled-0.2", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert got["exact"]["cosine_against"] == "exact"
    assert got["torchmesa-compiled-0.2"]["cosine_against"] == "compiled exact"
    assert got["torchmesa-compiled-0.2"]["worst_grad_cosine"] > 0.999
