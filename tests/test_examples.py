"""Every example in examples/ runs to the end (short settings); the torchrun one is
exercised by test_distributed.py."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args,expect",
    [
        ("plain_loop.py", ["--steps", "20"], "smaller)"),
        ("hf_trainer.py", ["--steps", "4"], "trained 4 steps with torchmesa"),
        ("lightning_fit.py", ["--epochs", "1"], "accuracy after 1 epochs"),
    ],
)
def test_example_runs(script, args, expect):
    cmd = [sys.executable, str(ROOT / "examples" / script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout
