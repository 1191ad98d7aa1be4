"""The real `torchmesa` console script, in a subprocess: profile, demo and bench; JSON with
the documented keys, PNGs that open at the expected size, errors a person can act on."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchmesa.report import JSON_KEYS, MODULE_KEYS

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")
SCRIPT = shutil.which("torchmesa", path=str(Path(sys.executable).parent))


def cli(*args, cwd=None, timeout=300, env=None):
    assert SCRIPT, "the torchmesa console script is not installed next to this Python"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)  # fmt: skip


def test_profile_json_has_the_documented_keys():
    done = cli("profile", "tiny-vit", "--batch-size", "2", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert tuple(report) == JSON_KEYS
    assert all(tuple(m) == MODULE_KEYS for m in report["modules"])
    assert report["exact_bytes"] == sum(m["exact_bytes"] for m in report["modules"])
    assert report["stored_bytes"] == sum(m["stored_bytes"] for m in report["modules"])
    assert abs(sum(m["share"] for m in report["modules"]) - 1) < 1e-9
    assert report["ratio"] > 3 and report["batch"] == {"input": [2, 3, 32, 32]}


def test_profile_table_plot_and_json_file(tmp_path):
    png, out = tmp_path / "profile.png", tmp_path / "profile.json"
    done = cli("profile", "tiny-vit", "--batch-size", "2", "--limit", "5", "--plot", str(png),
               "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exact MiB" in done.stdout and "more modules)" in done.stdout
    assert "x smaller)" in done.stdout and f"wrote {png}" in done.stdout
    assert f"wrote {out}" in done.stdout and tuple(json.loads(out.read_text())) == JSON_KEYS
    with PIL.open(png) as image:
        image.verify()
    import torch

    import torchmesa
    from torchmesa.apps.models import SPECS

    torch.manual_seed(0)
    rows = len(torchmesa.report(SPECS["tiny-vit"].build(), torch.randn(2, 3, 32, 32)).modules)
    with PIL.open(png) as image:  # one bar pair per module, up to 20
        assert image.format == "PNG"
        assert image.size == (1000, int((1.5 + 0.32 * min(rows, 20)) * 100))


def test_unknown_model_lists_the_known_ones():
    done = cli("profile", "gpt-5")
    assert done.returncode == 1
    assert "unknown model 'gpt-5'; known: vit-digits, deit-ti" in done.stderr
    assert "gpt2, bert, vit" in done.stderr and "Traceback" not in done.stderr


def test_a_failing_factory_shows_its_own_traceback_once(tmp_path):
    (tmp_path / "zoo.py").write_text(
        "import torch\n"
        "def broken():\n    return helper()\n"
        "def helper():\n    raise ValueError('no such layer size')\n"
        "def plain():\n    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU())\n"
    )
    done = cli("profile", "zoo:broken", cwd=tmp_path)
    assert done.returncode == 1
    err = done.stderr
    assert "the factory 'zoo:broken' raised" in err and "ValueError: no such layer size" in err
    assert err.count("ValueError: no such layer size") == 1
    assert 'zoo.py", line 5, in helper' in err
    assert "cli.py" not in err and "Traceback" not in err
    done = cli("profile", "zoo:plain", cwd=tmp_path)
    assert done.returncode == 1 and "pass --input-shape" in done.stderr
    done = cli("profile", "zoo:plain", "--input-shape", "64,16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "x smaller)" in done.stdout


def test_a_batch_too_large_for_memory_says_which_flag_helps():
    done = cli("profile", "vit-digits", "--batch-size", str(10**12))
    assert done.returncode == 1
    assert "does not fit in memory" in done.stderr and "--batch-size (now" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task,args", [("vision", ["--epochs", "1"]), ("text", ["--steps", "12"])])
def test_demo_writes_a_table_a_plot_and_json(tmp_path, task, args):
    png, out = tmp_path / "demo.png", tmp_path / "demo.json"
    done = cli("demo", "--task", task, *args, "--seeds", "0", "1", "--plot", str(png),
               "--json", str(out), "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "activation memory" in done.stdout and "what fits" in done.stdout
    assert "over 2 seeds" in done.stdout and f"wrote {png}" in done.stdout
    report = json.loads(out.read_text())
    assert report["task"] == task and report["saved_ratio"] > 2.5
    curves = [r["curves"] for r in report["runs"]]
    assert len(curves) == 2 and len(curves[0]["exact"]) == len(curves[1]["torchmesa"]) > 0
    with PIL.open(png) as image:
        assert image.format == "PNG" and image.size == (1100, 400)


def test_demo_refuses_bad_arguments():
    done = cli("demo", "--epochs", "0")
    assert done.returncode == 1 and "--epochs, --steps and --batch-size" in done.stderr


TINY_BENCH = ("--", "--models", "tiny-vit", "--batch", "4", "--warmup", "0", "--steps", "1",
              "--configs", "exact", "torchmesa-dynamic")  # fmt: skip


@pytest.mark.slow
def test_bench_runs_the_suite_and_plots_it(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    done = cli("bench", "--json", str(out), "--plot", str(png), *TINY_BENCH, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max batch" in done.stdout and f"wrote {png}" in done.stdout
    rows = json.loads(out.read_text())["rows"]  # the suite's arguments reached it
    assert [r["config"] for r in rows] == ["exact", "torchmesa-dynamic"]
    with PIL.open(png) as image:
        assert image.format == "PNG" and image.size == (700, 450)


@pytest.mark.slow
def test_bench_json_without_a_path_is_the_only_standard_output(tmp_path):
    done = cli("bench", "--json", *TINY_BENCH, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)["rows"]
    assert [r["config"] for r in rows] == ["exact", "torchmesa-dynamic"]
    assert "max batch" in done.stderr and list(tmp_path.iterdir()) == []


def test_bench_refuses_a_second_way_to_name_its_json():
    done = cli("bench", "--", "--out", "x.json")
    assert done.returncode == 1 and "--json PATH" in done.stderr, done.stderr


def test_every_subcommand_takes_json_and_plot_alike():
    for command in ("demo", "profile", "fit", "bench"):
        done = cli(command, "--help")
        assert done.returncode == 0
        text = " ".join(done.stdout.split())
        assert "--json [PATH]" in text and "--plot PNG" in text, (command, text)


@pytest.mark.parametrize(
    ("missing", "args", "install"),
    [
        ("matplotlib", ("profile", "tiny-vit", "--batch-size", "2", "--plot", "x.png"), "cli"),
        ("sklearn", ("demo", "--steps", "1", "--plot", "none", "--no-progress"), "cli"),
        ("matplotlib", ("demo", "--epochs", "1", "--no-progress"), "cli"),  # its default plot
        ("matplotlib", ("fit", "tiny-vit", "--memory", "1GiB", "--plot", "x.png"), "cli"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path, missing, args, install):
    """A package shadowed by one that fails to import stands in for it not being installed."""
    (tmp_path / missing).mkdir()
    (tmp_path / missing / "__init__.py").write_text(f"raise ImportError('no {missing}')\n")
    done = cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("torchmesa:")]
    assert len(lines) == 1 and f"pip install 'torchmesa[{install}]'" in lines[0], done.stderr
    assert not (tmp_path / "x.png").exists()


# -- fit and the MODEL sources -------------------------------------------------------------


@pytest.mark.slow
def test_fit_finds_the_largest_batch_per_setting(tmp_path):
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    done = cli("fit", "tiny-vit", "--memory", "96MiB", "--json", str(out), "--plot", str(png),
               timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny-vit: the largest batch that trains in 0.09 GiB (cpu, fp32)" in done.stdout
    assert "trials, one training step each, in" in done.stdout
    report = json.loads(out.read_text())
    results = {r["config"]: r for r in report["results"]}
    assert list(results) == ["exact", "torchmesa", "checkpoint", "checkpoint+torchmesa",
                             "planner"]  # fmt: skip
    budget = report["budget_bytes"]
    for name, r in results.items():
        assert r["largest"] > 0, name
        fitting = [t for t in r["trials"] if t["fits"]]
        assert all(t["peak"] <= budget for t in fitting), name
        assert any(t["value"] == r["largest"] for t in fitting)
        # pinned by a miss within 1 % above, or by a line that puts the budget there
        missed = min((t["value"] for t in r["trials"] if not t["fits"]), default=None)
        pinned = missed is not None and missed - r["largest"] <= max(1, r["largest"] // 100)
        assert pinned or r["peak_at_largest"] > 0.9 * budget, r
    assert results["torchmesa"]["largest"] > 1.5 * results["exact"]["largest"]
    assert results["planner"]["note"].startswith("planned for 1/")
    # the price beside the size: steps timed at each largest fit, per sample against exact
    assert results["exact"]["per_unit_vs_exact"] == 1.0 and "samples/s" in done.stdout
    for name, r in results.items():
        per_sample = r["step_seconds_at_largest"] / r["largest"]
        assert r["seconds_per_unit"] == pytest.approx(per_sample), name
        assert r["units_per_second"] == pytest.approx(1 / per_sample), name
    with PIL.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 450)


@pytest.mark.slow
def test_fit_varies_the_sequence_length(tmp_path):
    # a wide vocabulary: the logits dominate, and the answer stays near a hundred tokens;
    # --json without a path: the JSON is all of standard output, the table goes to stderr
    done = cli("fit", "hf:GPT2Config", "--layers", "1", "--hidden", "64", "--heads", "2",
               "--set", "vocab_size=32768", "--memory", "128MiB", "--vary", "seq-len",
               "--batch-size", "2", "--configs", "exact", "torchmesa", "--json",
               "--no-progress", timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the largest seq-len at batch 2 that trains in 0.12 GiB" in done.stderr
    report = json.loads(done.stdout)
    assert report["vary"] == "seq-len" and report["batch_size"] == 2
    assert "tokens/s" in done.stderr
    for r in report["results"]:
        assert r["largest"] > 64 and r["peak_at_largest"] <= report["budget_bytes"]
        tokens = 2 * r["largest"]  # per token: the batch times the length
        assert r["seconds_per_unit"] == pytest.approx(r["step_seconds_at_largest"] / tokens)
        assert all(t["value"] >= 64 for t in r["trials"])  # lengths, from 64 up


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fit", "tiny-vit", "--memory", "4"), "--memory takes a size with a unit"),
        (("fit", "tiny-vit", "--memory", "1TiB"), "more than 90 % of this machine's free"),
        (
            ("fit", "tiny-vit", "--memory", "1GiB", "--vary", "seq-len"),
            "tiny-vit cannot vary seq-len; it can vary: batch, image-size",
        ),
        (("fit", "gpt-5", "--memory", "1GiB"), "unknown model 'gpt-5'"),
        (("fit", "tiny-vit", "--memory", "1GiB", "--batch-size", "0"), "--batch-size must be"),
        (("fit", "tiny-vit", "--memory", "1GiB", "--timed-steps", "-1"), "--timed-steps must be"),
        (("profile", "hf:NoSuchConfig"), "no configuration class of that name"),
        (("profile", "timm:resnet18"), "timm:resnet18 needs timm"),
    ],
)
def test_fit_and_sources_refuse_bad_input_in_one_line(args, message):
    done = cli(*args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_profile_a_hugging_face_configuration_class():
    done = cli("profile", "hf:LlamaConfig", "--layers", "1", "--hidden", "64", "--heads", "4",
               "--set", "intermediate_size=128", "--set", "vocab_size=256", "--seq-len", "16",
               "--batch-size", "2", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "hf:LlamaConfig (LlamaForCausalLM)"
    assert report["batch"] == {"input_ids": [2, 16], "labels": [2, 16]} and report["ratio"] > 2


@pytest.mark.parametrize(
    ("preset", "size", "batch"),
    [
        ("gpt2", ("--seq-len", "16"), {"input_ids": [2, 16], "labels": [2, 16]}),
        ("bert", ("--seq-len", "16"), {"input_ids": [2, 16], "labels": [2, 16]}),
        ("vit", ("--image-size", "32"), {"pixel_values": [2, 3, 32, 32], "labels": [2]}),
    ],
)
def test_profile_a_hugging_face_preset(preset, size, batch):
    done = cli("profile", preset, "--layers", "1", "--hidden", "32", "--heads", "2", *size,
               "--batch-size", "2", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == f"{preset} (1 layer, hidden 32)"
    assert report["batch"] == batch and report["ratio"] > 2


@pytest.mark.slow
def test_bench_takes_the_same_sources(tmp_path):
    out = tmp_path / "bench.json"
    done = cli("bench", "--json", str(out), "--", "--models", "hf:GPT2Config", "--layers", "1",
               "--hidden", "32", "--heads", "2", "--seq-len", "16", "--set", "vocab_size=128",
               "--batch", "2", "--warmup", "0", "--steps", "1", "--configs", "exact",
               "checkpoint", "torchmesa", timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torchmesa"]["saved_vs_exact"] < 0.5 and rows["checkpoint"]["peak_bytes"] > 0
