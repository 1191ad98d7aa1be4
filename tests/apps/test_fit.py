"""``torchmesa fit``'s parts: the budget's units, the search on known memory curves, a trial
in its subprocess (over budget, killed, crashed) and in this process."""

import dataclasses
import subprocess

import pytest
import torch

from torchmesa.apps import fit
from torchmesa.apps.benchmark import Setup
from torchmesa.apps.sources import Sizes


def test_memory_sizes_and_their_units():
    assert fit.parse_memory("4GiB") == 4 * 2**30
    assert fit.parse_memory("4g") == 4 * 2**30
    assert fit.parse_memory("512MiB") == 512 * 2**20
    assert fit.parse_memory("1.5 GB") == 1_500_000_000
    for bad in ("4", "GiB", "-1GiB", "0MiB", "4 parsecs", "nanGiB", "infGiB"):
        with pytest.raises(fit.FitError, match="--memory takes a size with a unit"):
            fit.parse_memory(bad)


def _curve(fixed: int, per: int, noise: int = 0, seed: int = 0):
    """A trial runner on a known line: peak = fixed + per * value (+- noise)."""
    g = torch.Generator().manual_seed(seed)
    seen = []

    def run(value: int) -> fit.Trial:
        jitter = int(torch.randint(-noise, noise + 1, (), generator=g)) if noise else 0
        peak = fixed + per * value + jitter
        seen.append(value)
        return fit.Trial("c", value, peak <= BUDGET, peak, 0.0)

    return run, seen


BUDGET = 4 * 2**30


@pytest.mark.parametrize("fixed,per", [(200 * 2**20, 57 * 2**20), (2**30, 3 * 2**20),
                                       (10 * 2**20, 2**20 // 3)])  # fmt: skip
def test_the_search_pins_the_largest_batch_in_few_trials(fixed, per):
    run, seen = _curve(fixed, per)
    trials = fit.search(run, BUDGET, start=1, cap=1 << 16)
    truth = (BUDGET - fixed) // per
    best = max(t.value for t in trials if t.fits)
    assert truth - max(1, truth // 100) <= best <= truth
    assert len(trials) <= 16, seen


def test_the_search_survives_noisy_peaks():
    run, _ = _curve(200 * 2**20, 57 * 2**20, noise=40 * 2**20)
    trials = fit.search(run, BUDGET, start=1, cap=1 << 16)
    best = max(t.value for t in trials if t.fits)
    assert abs(best - (BUDGET - 200 * 2**20) // (57 * 2**20)) <= 2


def test_nothing_fits_and_everything_fits():
    run, seen = _curve(2 * BUDGET, 1)
    assert not any(t.fits for t in fit.search(run, BUDGET, start=1, cap=64))
    assert seen == [1]
    run, seen = _curve(0, 1)
    trials = fit.search(run, BUDGET, start=1, cap=64)
    assert max(t.value for t in trials if t.fits) == 64 and all(t.fits for t in trials)


def test_trials_that_miss_without_a_peak_are_bisected():
    """Trials stopped by the watchdog report no peak: the search halves the gap."""
    truth = 37

    def run(value: int) -> fit.Trial:
        return fit.Trial("c", value, value <= truth, 100 if value <= truth else None, 0.0)

    trials = fit.search(run, BUDGET, start=1, cap=1 << 16)
    assert max(t.value for t in trials if t.fits) == truth and len(trials) < 20


JOB = fit.Job("tiny-vit", Sizes(), "batch", 1, 2**30, Setup())


def test_a_job_travels_as_json():
    job = fit.Job(
        "gpt2", Sizes(layers=1, settings=(("a", 1),)), "seq-len", 2, 5, Setup("cpu", "bf16")
    )
    assert fit.Job.from_json(fit.Job.to_json(job)) == job
    workload, batch = job.workload(48)
    assert batch == 2 and workload.batch(2)["input_ids"].shape == (2, 48)


@pytest.mark.slow
def test_a_trial_over_budget_is_stopped_and_does_not_fit():
    small = fit.dataclasses.replace(JOB, budget=2**20)  # 1 MiB: AdamW's state alone is more
    t = fit.run_trial(small, "exact", 64)
    assert not t.fits and t.peak is None and t.note == "passed the budget"
    t = fit.run_trial(JOB, "torchmesa", 4)
    assert t.fits and 0 < t.peak < JOB.budget


def test_a_killed_trial_does_not_fit_and_a_crash_is_reported(monkeypatch):
    def killed(*args, **kwargs):
        return subprocess.CompletedProcess(args, -9, "", "")

    monkeypatch.setattr(fit.subprocess, "run", killed)
    t = fit.run_trial(JOB, "exact", 8)
    assert not t.fits and "SIGKILL" in t.note

    def crashed(*args, **kwargs):
        return subprocess.CompletedProcess(args, 2, "", "Traceback ...\nValueError: bad layer\n")

    monkeypatch.setattr(fit.subprocess, "run", crashed)
    with pytest.raises(fit.FitError, match=r"(?s)the trial exact at batch 8 failed:\n.*bad layer"):
        fit.run_trial(JOB, "exact", 8)


def test_a_trial_in_process_measures_one_steady_step():
    result = fit.trial(JOB, "torchmesa", 4)
    assert result["fits"] and result["peak"] > 0 and result["seconds"] > 0
    assert result["step_seconds"] is None  # a search's trial times nothing more
    timed = fit.trial(dataclasses.replace(JOB, timed_steps=2), "torchmesa", 4)
    assert timed["fits"] and timed["step_seconds"] > 0
    # a timed rerun of a batch that fit is timed through a peak over the budget, not
    # stopped (a trial held to the budget ends its process there)
    over = fit.trial(dataclasses.replace(JOB, budget=1, timed_steps=1), "exact", 4)
    assert not over["fits"] and over["step_seconds"] > 0


def test_each_setting_is_timed_once_at_its_largest_fit(monkeypatch):
    asked = []

    def fake(job, config, value):  # exact: 20 samples in 2 s; torchmesa: 60 in 9 s
        asked.append((config, value, job.timed_steps))
        largest = {"exact": 20, "torchmesa": 60}[config]
        step = {"exact": 2.0, "torchmesa": 9.0}[config] if job.timed_steps else None
        return fit.Trial(config, value, value <= largest, 1000 * value, 0.1, "", step)

    monkeypatch.setattr(fit, "run_trial", fake)
    found = fit.run(JOB, ("exact", "torchmesa"), lambda *_: None, timed_steps=3)
    assert [a for a in asked if a[2]] == [("exact", 20, 3), ("torchmesa", 60, 3)]
    results = {r["config"]: r for r in found.to_json()["results"]}
    assert results["exact"]["seconds_per_unit"] == pytest.approx(0.1)
    assert results["torchmesa"]["units_per_second"] == pytest.approx(60 / 9)
    assert results["torchmesa"]["per_unit_vs_exact"] == pytest.approx(1.5)
    assert "1.50x" in fit.table(found) and "samples/s" in fit.table(found)
    untimed = fit.run(JOB, ("exact",), lambda *_: None, timed_steps=0)
    assert untimed.to_json()["results"][0]["seconds_per_unit"] is None


def test_the_optimizer_state_is_made_without_moving_a_weight():
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    fit._make_optimizer_state(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))
    assert all("exp_avg" in opt.state[p] for p in model.parameters())
    assert opt.param_groups[0]["lr"] == 0.1 and all(p.grad is None for p in model.parameters())
