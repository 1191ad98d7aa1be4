"""Optional dependencies: one error for a missing one, which the command line prints as
one line naming the install (no traceback)."""

from __future__ import annotations

from types import ModuleType


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed; the message says what to run."""


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend, or :class:`MissingExtra`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingExtra("plots need matplotlib: pip install 'torchmesa[cli]'") from err
    return plt
