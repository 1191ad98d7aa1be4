"""The demo (`make demo`): a real short run on scikit-learn's digits, both models learn."""

import json

import pytest

pytest.importorskip("sklearn")

from torchmesa.apps import cli, datasets, demo


@pytest.mark.slow
def test_short_run_learns_and_compresses(tmp_path, report):
    out = tmp_path / "demo.json"
    argv = ["demo", "--epochs", "8", "--seeds", "0", "1", "--json", str(out), "--plot", "none",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["settings"]["seed"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert set(run["results"]) == {"exact", "torchmesa"}
        for name, r in run["results"].items():
            assert r["test_accuracy"] > 0.5, name  # chance is 0.1; 8 epochs reach 0.6-0.8
            assert r["step_seconds_median"] > 0
    score = result["score"]
    assert score["name"] == "test_accuracy" and len(score["exact"]) == 2
    assert score["difference"] == [
        c - e for e, c in zip(score["exact"], score["torchmesa"], strict=False)
    ]
    assert result["saved_ratio"] > 3.8
    fits = result["fits"]  # in exact's activation memory at batch 64, a batch about 6x larger
    assert fits["exact_batch"] == 64 and fits["torchmesa_batch"] > 3.8 * 64
    assert result["data"] == {"train": 1437, "test": 360}
    report.append(
        "demo 8 epochs, seeds 0 and 1: test accuracy exact {} / torchmesa {}, saved {:.2f}x "
        "smaller, batch {} in exact's memory for 64, step time {:.2f}x".format(
            ", ".join(f"{a:.1%}" for a in score["exact"]),
            ", ".join(f"{a:.1%}" for a in score["torchmesa"]),
            result["saved_ratio"], fits["torchmesa_batch"], result["step_time_ratio"],
        )
    )  # fmt: skip


def test_the_first_screen_leads_with_the_win_and_gives_the_spread():
    runs = [
        {"results": {"exact": {"saved_bytes": 20 * 2**20}, "torchmesa": {"saved_bytes": 3 * 2**20}}}
    ]
    report = {
        "title": "TinyViT", "settings": {"epochs": 20, "batch_size": 64, "seeds": [0, 1, 2]},
        "data": {"train": 1437}, "runs": runs, "saved_ratio": 6.67, "step_time_ratio": 1.45,
        "fits": {"exact_batch": 64, "torchmesa_batch": 441},
        "score": {"name": "test_accuracy", "exact": [0.881, 0.931, 0.967],
                  "torchmesa": [0.861, 0.950, 0.936], "difference": [-0.02, 0.019, -0.031]},
        "torch": "2.13.0",
    }  # fmt: skip
    lines = demo.table(report).splitlines()
    assert lines[0] == "torchmesa demo: TinyViT"
    assert lines[1].startswith("20 epochs of 1437 images, batch 64, seeds 0, 1, 2")
    body = "\n".join(lines[3:])
    assert lines[3].split() == ["activation", "memory", "20.0", "MiB", "->", "3.0", "MiB",
                                "per", "step", "(6.7x", "smaller)"]  # fmt: skip
    assert "torchmesa trains batch 441" in lines[4] and "1.45x exact's" in lines[5]
    assert "exact 92.6 % (88.1 % to 96.7 %), torchmesa 91.6 % (86.1 % to 95.0 %)" in body
    assert "-1.07 points on average (-3.10 to +1.90) over 3 seeds" in body


def test_bad_arguments_are_refused(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 1
    assert "--epochs, --steps and --batch-size must be at least 1" in capsys.readouterr().err


def test_digits_split_is_fixed():
    a = datasets.load_digits(0)
    b = datasets.load_digits(0)
    assert all((x == y).all() for x, y in zip(a, b, strict=False))
    assert a[0].shape == (1437, 1, 8, 8) and float(a[0].max()) <= 1.0
