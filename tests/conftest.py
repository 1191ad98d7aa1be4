import os

# Triton kernels run in Triton's CPU interpreter unless the suite is pointed at a GPU
# (TORCHMESA_TEST_DEVICE=cuda); the switch must be set before Triton is imported.
if os.environ.get("TORCHMESA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

RESULTS: list[str] = []


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def report() -> list[str]:
    """Lines that the run prints in its summary (measured figures tests assert on)."""
    return RESULTS


def pytest_terminal_summary(terminalreporter) -> None:
    if RESULTS:
        terminalreporter.section("torchmesa figures")
        for line in RESULTS:
            terminalreporter.write_line(line)
