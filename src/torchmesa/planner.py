"""``plan()``: per-module bit widths that fit a memory budget with the least gradient error.

GACT's adaptive idea made explicit: on one sample batch, measure each module's saved bytes
at every width (exact, 8, 4, 2 bits) and the gradient error that compressing that module
alone causes, then choose widths greedily: start exact and repeatedly take the step that
frees the most bytes per unit of added error, until the total fits the budget; then spend
what the budget has left on widening where a byte removes the most error. The result
is a :class:`Plan` to read (``table()``) and apply (``compress(model, plan.policy)``).

Cost: two passes per width, plus one forward and backward per module and width.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchmesa.api import compress, decompress, is_compressed
from torchmesa.config import Config
from torchmesa.policy import Policy, Rule
from torchmesa.report import call_with
from torchmesa.track import track

WIDTHS = (8, 4, 2)


@dataclass(frozen=True)
class PlanRow:
    """One module: its saved bytes exact, the width chosen, and what that costs."""

    path: str
    exact_bytes: int
    bits: int | None  # None: kept exact
    stored_bytes: int
    gradient_error: float  # relative squared gradient error, this module compressed alone


@dataclass(frozen=True)
class Plan:
    """Widths per module that fit ``budget_bytes``; apply with ``compress(model, plan.policy)``."""

    rows: tuple[PlanRow, ...]
    budget_bytes: int
    base: Config

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.rows)

    @property
    def exact_bytes(self) -> int:
        return sum(r.exact_bytes for r in self.rows)

    @property
    def gradient_error(self) -> float:
        """Sum of the chosen modules' errors: an estimate for all of them together."""
        return sum(r.gradient_error for r in self.rows)

    @property
    def policy(self) -> Policy:
        """One rule per module, deepest first, so each module gets exactly its own width."""
        ordered = sorted(self.rows, key=lambda r: -r.path.count(".") - bool(r.path))
        rules = tuple(Rule(_exact_glob(r.path), _config(self.base, r.bits)) for r in ordered)
        return Policy(rules, default=None)

    def table(self) -> str:
        lines = [f"{'module':40} {'exact KiB':>10} {'bits':>5} {'stored KiB':>11} {'grad err':>9}"]
        for r in self.rows:
            bits = "exact" if r.bits is None else str(r.bits)
            lines.append(
                f"{r.path or '(root)':40} {r.exact_bytes / 1024:>10.1f} {bits:>5} "
                f"{r.stored_bytes / 1024:>11.1f} {r.gradient_error:>9.2e}"
            )
        lines.append(
            f"{'total':40} {self.exact_bytes / 1024:>10.1f} {'':>5} "
            f"{self.stored_bytes / 1024:>11.1f} {self.gradient_error:>9.2e}  "
            f"(budget {self.budget_bytes / 1024:.1f} KiB)"
        )
        return "\n".join(lines)


def plan(
    model: nn.Module,
    sample_batch: Any,
    budget_bytes: int,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    base: Config | None = None,
) -> Plan:
    """Choose each module's width so saved activations fit ``budget_bytes``.

    Args:
        model: an uncompressed model in training mode.
        sample_batch: what the model takes: a tensor, a tuple of arguments or a dict of
            keyword arguments.
        budget_bytes: the saved-activation bytes to fit, as ``track()`` counts them.
        loss_fn: maps the model's output to a scalar loss; by default the output itself
            when it is a scalar, or its ``.loss`` (Hugging Face models given labels).
        base: the settings besides ``bits`` (``Config(derive=False)`` by default); below
            8 bits rounding is stochastic. Every tensor is stored by default because the
            plan weighs modules one at a time, while a derived tensor (rule 12) couples
            two (a Linear's input rebuilt from the GELU before it).

    Raises:
        ValueError: a bad budget, a compressed model, or a budget below what 2 bits reach.
        TypeError: no loss can be read from the output; pass ``loss_fn``.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"plan: budget_bytes must be an int >= 0, got {budget_bytes!r}")
    if is_compressed(model):
        raise ValueError("plan needs an uncompressed model: call torchmesa.decompress first")
    base = Config(derive=False) if base is None else base
    with _preserved(model):
        run = _runner(model, sample_batch, loss_fn)
        exact_bytes, reference = run(Policy(default=None))
        if not exact_bytes:
            raise ValueError("plan: the model saved no activations on the sample batch")
        stored: dict[int | None, dict] = {None: exact_bytes}
        for bits in WIDTHS:
            stored[bits], _ = run(Policy(default=_config(base, bits)))
        errors: dict[tuple[str, int], float] = {}
        for path in exact_bytes:
            for bits in WIDTHS:
                alone = [Rule(_exact_glob(p), None) for p in _children(path, exact_bytes)]
                alone.append(Rule(_exact_glob(path), _config(base, bits)))
                _, grads = run(Policy(tuple(alone), default=None))
                errors[path, bits] = _relative_error(grads, reference)
    return _choose(exact_bytes, stored, errors, budget_bytes, base)


def _choose(exact: dict, stored: dict, errors: dict, budget: int, base: Config) -> Plan:
    """Greedy: from all exact, take the width step with the most bytes freed per error."""
    choice: dict[str, int | None] = dict.fromkeys(exact)
    total = sum(exact.values())
    while total > budget:
        best = None
        for path, bits in choice.items():
            steps = WIDTHS if bits is None else WIDTHS[WIDTHS.index(bits) + 1 :]
            for nxt in steps:
                freed = stored[bits].get(path, 0) - stored[nxt].get(path, 0)
                if freed <= 0:
                    continue
                added = errors[path, nxt] - (0.0 if bits is None else errors[path, bits])
                score = max(added, 1e-12) / freed
                if best is None or score < best[0]:
                    best = (score, path, nxt, freed)
        if best is None:
            floor = sum(stored[2].get(p, exact[p]) for p in exact)
            raise ValueError(
                f"plan: a budget of {budget} bytes cannot be met; at 2 bits everywhere the "
                f"saved activations take {floor} bytes"
            )
        _, path, nxt, freed = best
        choice[path] = nxt
        total -= freed
    _spend_slack(choice, total, stored, errors, budget)
    rows = tuple(
        PlanRow(
            path,
            exact[path],
            bits,
            stored[bits].get(path, exact[path]),
            0.0 if bits is None else errors[path, bits],
        )
        for path, bits in choice.items()
    )
    return Plan(rows, budget, base)


def _spend_slack(
    choice: dict[str, int | None], total: int, stored: dict, errors: dict, budget: int
) -> None:
    """Greedy narrowing can overshoot: spend the bytes the budget still has on widening
    the modules where a byte removes the most error (each step lowers the error, so it
    ends)."""
    while True:
        best = None
        for path, bits in choice.items():
            if bits is None:
                continue
            for wider in (None, *WIDTHS[: WIDTHS.index(bits)]):
                cost = stored[wider].get(path, 0) - stored[bits].get(path, 0)
                gain = errors[path, bits] - (0.0 if wider is None else errors[path, wider])
                if cost <= 0 or gain <= 0 or total + cost > budget:
                    continue
                if best is None or gain / cost > best[0]:
                    best = (gain / cost, path, wider, cost)
        if best is None:
            return
        _, path, wider, cost = best
        choice[path] = wider
        total += cost


def _runner(model: nn.Module, batch: Any, loss_fn: Callable | None) -> Callable:
    """A function: policy -> (saved bytes per module path, gradients), same RNG each time."""
    root_label = type(model).__name__
    params = [p for p in model.parameters() if p.requires_grad]

    def run(policy: Policy) -> tuple[dict[str, int], list[torch.Tensor | None]]:
        compress(model, policy)
        try:
            torch.manual_seed(0)
            with track() as t:
                out = call_with(model, batch)
            loss = _loss(out, loss_fn)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            decompress(model)
        sizes = {
            ("" if name == root_label else name): entry.stored_bytes
            for name, entry in t.by_module.items()
            if entry.exact_bytes > 0 and name != "(outside compressed modules)"
        }
        return sizes, list(grads)

    return run


def _loss(out: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(out)
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out.reshape(())
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise TypeError(
        f"plan cannot read a loss from the model's output ({type(out).__name__}); pass "
        "loss_fn=lambda out: ... returning a scalar"
    )


def _relative_error(grads: list, reference: list) -> float:
    num = den = 0.0
    for g, r in zip(grads, reference):
        if r is None:
            continue
        g = torch.zeros_like(r) if g is None else g
        num += float((g.float() - r.float()).square().sum())
        den += float(r.float().square().sum())
    return num / den if den else 0.0


def _children(path: str, paths: dict) -> list[str]:
    prefix = f"{path}." if path else ""
    return [p for p in paths if p != path and p.startswith(prefix)]


def _config(base: Config, bits: int | None) -> Config | None:
    if bits is None:
        return None
    rounding = base.rounding if bits == 8 else "stochastic"
    return dataclasses.replace(base, bits=bits, rounding=rounding)


def _exact_glob(path: str) -> str:
    """A glob that matches exactly ``path`` (module names may hold glob characters)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Leave the caller's RNG, gradients and mode as they were."""
    random_state = torch.random.get_rng_state()
    grads = [p.grad for p in model.parameters()]
    training = model.training
    model.train()
    try:
        yield
    finally:
        torch.random.set_rng_state(random_state)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        model.train(training)
