"""``report(model, batch)``: where a model's saved-activation memory goes, module by module.

One forward pass on the batch, with the model compressed (temporarily, when it is not
already), under ``track()``: for each module, the bytes autograd would keep exact, the
bytes torchmesa stores, its share of the total and the bits its setting uses. The result
prints as a table, serializes to JSON with the keys below, and plots as a bar chart.

JSON keys: ``model``, ``batch`` (shapes), ``exact_bytes``, ``stored_bytes``, ``ratio``,
``modules``: a list of ``{module, exact_bytes, stored_bytes, share, bits, tensors, kept}``
(``bits`` is null for modules kept exact; ``kept`` maps each way a saved tensor is kept,
``quantized``, ``half``, ``derived``, ``mask`` or ``exact``, to ``{tensors, exact_bytes,
stored_bytes}``), largest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchmesa.api import compress, decompress, engine_of, is_compressed
from torchmesa.config import Config
from torchmesa.extras import pyplot
from torchmesa.policy import Policy, Rule
from torchmesa.track import KINDS, OUTSIDE, track

JSON_KEYS = ("model", "batch", "exact_bytes", "stored_bytes", "ratio", "modules")
MODULE_KEYS = ("module", "exact_bytes", "stored_bytes", "share", "bits", "tensors", "kept")


@dataclass(frozen=True)
class ModuleRow:
    """One module's saved activations: exact, as stored, share of the exact total."""

    module: str
    exact_bytes: int
    stored_bytes: int
    share: float
    bits: int | None
    tensors: int
    kept: dict[str, dict[str, int]]

    def kept_label(self) -> str:
        """How its saved tensors are kept, as counts: ``3q 1h 2d 1m 2e``."""
        return " ".join(f"{self.kept[k]['tensors']}{k[0]}" for k in KINDS if k in self.kept)


@dataclass(frozen=True)
class Report:
    """Per-module saved-activation bytes of one forward pass; see the module docstring."""

    model: str
    batch: dict[str, list[int]]
    modules: tuple[ModuleRow, ...]

    @property
    def exact_bytes(self) -> int:
        return sum(r.exact_bytes for r in self.modules)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.modules)

    @property
    def ratio(self) -> float:
        return self.exact_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def table(self, limit: int | None = 25) -> str:
        """The modules, largest first (the first ``limit``, the rest summed), and totals."""
        shown = self.modules if limit is None else self.modules[:limit]
        rest = self.modules[len(shown) :]
        label = f"({len(rest)} more modules)"
        width = max([len("module"), len(label) if rest else 0] + [len(r.module) for r in shown])
        head = (
            f"{'module':<{width}}  {'exact MiB':>10}  {'stored MiB':>10}  {'share':>6}  "
            f"{'bits':>5}  kept (quantized/half/derived/mask/exact)"
        )
        lines = [head, "-" * len(head)]
        for r in shown:
            bits = "exact" if r.bits is None else str(r.bits)
            lines.append(
                f"{r.module:<{width}}  {r.exact_bytes / 2**20:>10.2f}  "
                f"{r.stored_bytes / 2**20:>10.2f}  {r.share:>6.1%}  {bits:>5}  {r.kept_label()}"
            )
        if rest:
            exact, stored = sum(r.exact_bytes for r in rest), sum(r.stored_bytes for r in rest)
            share = sum(r.share for r in rest)
            lines.append(
                f"{label:<{width}}  {exact / 2**20:>10.2f}  {stored / 2**20:>10.2f}  {share:>6.1%}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<{width}}  {self.exact_bytes / 2**20:>10.2f}  "
            f"{self.stored_bytes / 2**20:>10.2f}  100.0%  ({self.ratio:.2f}x smaller)"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with the documented keys."""
        return {
            "model": self.model,
            "batch": self.batch,
            "exact_bytes": self.exact_bytes,
            "stored_bytes": self.stored_bytes,
            "ratio": round(self.ratio, 4),
            "modules": [asdict(r) for r in self.modules],
        }

    def plot(self, path: str | Path, limit: int = 20) -> Path:
        """A bar chart of the largest modules, exact vs stored, written as a PNG.

        Raises:
            MissingExtra: matplotlib is not installed (``pip install 'torchmesa[cli]'``).
        """
        plt = pyplot()
        rows = list(self.modules[:limit])[::-1]
        fig, ax = plt.subplots(figsize=(10, 1.5 + 0.32 * len(rows)), dpi=100)
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r.exact_bytes / 2**20 for r in rows], 0.4,
                label="exact", color="#9aa5b1")  # fmt: skip
        ax.barh([i - 0.2 for i in y], [r.stored_bytes / 2**20 for r in rows], 0.4,
                label="torchmesa", color="#1f77b4")  # fmt: skip
        ax.set_yticks(list(y), [r.module for r in rows], fontsize=8)
        ax.set_xlabel("saved activations (MiB)")
        ax.set_title(
            f"{self.model}: {self.exact_bytes / 2**20:.1f} MiB exact -> "
            f"{self.stored_bytes / 2**20:.1f} MiB stored ({self.ratio:.2f}x smaller)"
        )
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def report(
    model: nn.Module,
    batch: Any,
    config: Config | Policy | list[Rule] | None = None,
    label: str | None = None,
) -> Report:
    """Per-module saved-activation bytes of one training-mode forward of ``model``.

    Args:
        model: a model; compressed with ``config`` for the pass (and left as it was), or
            measured with its own settings when it is already compressed.
        batch: what the model takes: a tensor, a tuple of arguments or a dict of keyword
            arguments.
        config: what ``compress`` takes; ignored for an already compressed model.
        label: the model's name in the report (its class name by default).

    Raises:
        ValueError: the forward saved nothing for backward (no parameter requires grad?).
    """
    own = not is_compressed(model)
    training = model.training
    if own:
        compress(model, config)
    try:
        model.train()
        settings = engine_of(model).settings
        root = type(model).__name__
        with torch.enable_grad(), track() as t:
            out = call_with(model, batch)
        del out
    finally:
        model.train(training)
        if own:
            decompress(model)
    if t.saved_tensors == 0:
        raise ValueError(
            "report: the forward saved nothing for backward; does any parameter or input "
            "require grad?"
        )
    total = sum(e.exact_bytes for e in t.by_module.values()) or 1
    rows = []
    for name, entry in t.by_module.items():
        path = "" if name == root else name
        config_of = settings.get(path) if name != OUTSIDE else None
        rows.append(
            ModuleRow(
                module=name if name != root else f"{root} (own ops)",
                exact_bytes=entry.exact_bytes,
                stored_bytes=entry.stored_bytes,
                share=entry.exact_bytes / total,
                bits=config_of.bits if config_of is not None else None,
                tensors=entry.tensors,
                kept={k: asdict(v) for k, v in entry.kept.items()},
            )
        )
    rows.sort(key=lambda r: -r.exact_bytes)
    return Report(label or type(model).__name__, _shapes(batch), tuple(rows))


def call_with(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` as the batch's type says."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _shapes(batch: Any) -> dict[str, list[int]]:
    if isinstance(batch, torch.Tensor):
        return {"input": list(batch.shape)}
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    return {str(k): list(v.shape) for k, v in items if isinstance(v, torch.Tensor)}
