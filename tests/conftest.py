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


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    if RESULTS:
        terminalreporter.section("torchmesa figures")
        for line in RESULTS:
            terminalreporter.write_line(line)
