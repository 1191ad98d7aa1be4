"""The saved-bytes benchmark behind the README's headline table runs end to end."""

import json

from helpers import run_benchmark


def test_saved_ratios_reports_bytes_and_worst_cosines_per_setting(tmp_path):
    out = tmp_path / "saved.json"
    done = run_benchmark(
        "saved_ratios.py", "--models", "tiny-hf-gpt2", "--grads", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"exact", "torchmesa-dynamic", "torchmesa", "torchmesa-4bit"}
    assert rows["exact"]["saved_vs_exact"] == 1.0 and "worst_grad_cosine" not in rows["exact"]
    assert rows["torchmesa"]["saved_vs_exact"] < rows["torchmesa-dynamic"]["saved_vs_exact"] < 0.5
    assert rows["torchmesa"]["worst_grad_cosine"] > 0.999
    assert rows["torchmesa"]["worst_grad_parameter"] in done.stdout or "worst cosine" in done.stdout
