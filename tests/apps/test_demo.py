"""The demo (`make demo`): a real short run on scikit-learn's digits, both models learn."""

import json

import pytest

pytest.importorskip("sklearn")

from torchmesa.apps import cli, datasets  # noqa: E402


@pytest.mark.slow
def test_short_run_learns_and_compresses(tmp_path, report):
    out = tmp_path / "demo.json"
    argv = ["demo", "--epochs", "8", "--json", str(out), "--plot", "none", "--no-progress"]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"exact", "torchmesa"}
    for name, r in result["results"].items():
        assert r["test_accuracy"] > 0.6, name  # chance is 0.1; 8 epochs reach ~0.77
        assert r["step_seconds_median"] > 0
    assert result["saved_ratio"] > 3.8
    assert result["data"] == {"train": 1437, "test": 360}
    report.append(
        "demo 8 epochs: test accuracy exact {:.1%} / torchmesa {:.1%}, saved {:.2f}x smaller, "
        "step time {:.2f}x".format(
            result["results"]["exact"]["test_accuracy"],
            result["results"]["torchmesa"]["test_accuracy"],
            result["saved_ratio"],
            result["step_time_ratio"],
        )
    )


def test_bad_arguments_are_refused(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 1
    assert "--epochs, --steps and --batch-size must be at least 1" in capsys.readouterr().err


def test_digits_split_is_fixed():
    a = datasets.load_digits(0)
    b = datasets.load_digits(0)
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].shape == (1437, 1, 8, 8) and float(a[0].max()) <= 1.0
