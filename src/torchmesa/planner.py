"""``plan()``: a storage option per module that fits a memory budget with the least error.

GACT's adaptive idea made explicit: on one sample batch, measure each module's saved bytes
under every option (Mesa's 8 bits; block-scaled 4, 3 and 2 bits, with an fp16 or e8m0
scale, rotated or not) and the gradient error that compressing that module alone causes,
then choose greedily: start exact and repeatedly take the move that frees the most bytes
per unit of added error, until the total fits the budget; then spend what the budget has
left on moves that remove the most error per byte. Modules whose error is large for
their bytes (a fused attention's q, k and log-sum-exp, the first layers) stay wide.

Derived tensors (``Config(derive=True)``, the default base) couple modules: a tensor one
module rebuilds from another's stored input costs nothing, and the measurement per option
is taken with the whole model at that option. So the choice is checked by one more
forward pass under the plan itself; where it stores more than the budget, the plan is
chosen again for a budget smaller by the overshoot (a few rounds at most). The result is
a :class:`Plan` to read (``table()``: what it chose for each module and why, and which
share of the saving each lever gave) and apply (``compress(model, plan.policy)``).

Cost: one pass per option for bytes, one forward and backward per module and option for
errors, and one or two passes per check.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from torchmesa.api import compress, decompress, is_compressed
from torchmesa.config import Config, PerBlock
from torchmesa.policy import Policy, Rule
from torchmesa.report import call_with
from torchmesa.track import track

Bytes = dict[str, int]
"""Saved bytes per module path."""
Errors = dict[tuple[str, str], float]
"""Gradient error per (module path, option name), the rest of the model exact."""
Grads = list[torch.Tensor | None]
Runner = Callable[[Policy], tuple[Bytes, Grads]]


@dataclass(frozen=True)
class Option:
    """One way the planner may store a module's saved activations: ``bits`` wide, with
    Mesa's ranges (``block`` None) or block scales of ``block`` elements (``scale``,
    ``rotation``), rounded stochastically or to nearest."""

    name: str
    bits: int
    block: int | None = None
    scale: Literal["fp16", "e8m0"] = "fp16"
    rotation: bool = False
    stochastic: bool = False

    def config(self, base: Config) -> Config:
        """``base`` with this option's storage (and no attention override: the plan
        decides per module)."""
        groups = base.groups if self.block is None else PerBlock(self.block, self.scale)
        return dataclasses.replace(
            base,
            bits=self.bits,
            groups=groups,
            rotation="hadamard" if self.rotation else "none",
            rounding="stochastic" if self.stochastic else base.rounding,
            attention_bits=None,
        )


OPTIONS = (
    Option("8-bit", 8),
    Option("4-bit block", 4, 32),
    Option("4-bit block rotated", 4, 32, rotation=True),
    Option("4-bit block e8m0", 4, 32, scale="e8m0"),
    Option("3-bit block", 3, 32),
    Option("2-bit block rotated", 2, 32, rotation=True, stochastic=True),
)
EXACT = "exact"
CHECKS = 4  # rounds of choosing again when the plan, measured, overshoots its budget


@dataclass(frozen=True)
class PlanRow:
    """One module: its saved bytes exact, the option chosen, what that costs, and why."""

    path: str
    exact_bytes: int
    option: str  # an Option's name, or "exact"
    bits: int | None  # None: kept exact
    stored_bytes: int
    gradient_error: float  # relative squared gradient error, this module compressed alone
    sensitivity: float  # its 4-bit error per byte against the median module's
    why: str


@dataclass(frozen=True)
class Plan:
    """Options per module that fit ``budget_bytes``; apply with
    ``compress(model, plan.policy)``. ``stored_bytes`` is measured under the plan."""

    rows: tuple[PlanRow, ...]
    budget_bytes: int
    base: Config
    options: tuple[Option, ...]
    stored_bytes: int
    stored_without_derive: int  # the same plan with every tensor stored: the levers' split

    @property
    def exact_bytes(self) -> int:
        return sum(r.exact_bytes for r in self.rows)

    @property
    def gradient_error(self) -> float:
        """Sum of the chosen modules' errors: an estimate for all of them together."""
        return sum(r.gradient_error for r in self.rows)

    @property
    def levers(self) -> dict[str, float]:
        """Which share of the bytes saved came from quantizing and which from deriving."""
        saved = self.exact_bytes - self.stored_bytes
        if saved <= 0:
            return {"quantize": 0.0, "derive": 0.0}
        derive = max(0, self.stored_without_derive - self.stored_bytes) / saved
        return {"quantize": 1.0 - derive, "derive": derive}

    @property
    def policy(self) -> Policy:
        """One rule per module, deepest first, so each module gets exactly its own option."""
        by_name = {o.name: o for o in self.options}
        ordered = sorted(self.rows, key=lambda r: -r.path.count(".") - bool(r.path))
        rules = tuple(
            Rule(_exact_glob(r.path), _config(self.base, by_name.get(r.option))) for r in ordered
        )
        return Policy(rules, default=None)

    def table(self) -> str:
        lines = [
            f"{'module':32} {'exact KiB':>9} {'chosen':>20} {'KiB':>8} {'grad err':>9} "
            f"{'sens':>6}  why"
        ]
        for r in self.rows:
            lines.append(
                f"{r.path or '(root)':32} {r.exact_bytes / 1024:>9.1f} {r.option:>20} "
                f"{r.stored_bytes / 1024:>8.1f} {r.gradient_error:>9.2e} {r.sensitivity:>5.1f}x"
                f"  {r.why}"
            )
        levers = self.levers
        lines.append(
            f"{'total':32} {self.exact_bytes / 1024:>9.1f} {'':>20} "
            f"{self.stored_bytes / 1024:>8.1f} {self.gradient_error:>9.2e}  "
            f"(budget {self.budget_bytes / 1024:.1f} KiB; "
            f"{self.exact_bytes / max(self.stored_bytes, 1):.1f}x smaller than exact: "
            f"{levers['quantize']:.0%} of the saving from quantizing, "
            f"{levers['derive']:.0%} from derived tensors)"
        )
        return "\n".join(lines)


def plan(
    model: nn.Module,
    sample_batch: Any,
    budget_bytes: int,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    base: Config | None = None,
    options: Sequence[Option] = OPTIONS,
) -> Plan:
    """Choose each module's storage so saved activations fit ``budget_bytes``.

    Args:
        model: an uncompressed model in training mode.
        sample_batch: what the model takes: a tensor, a tuple of arguments or a dict of
            keyword arguments.
        budget_bytes: the saved-activation bytes to fit, as ``track()`` counts them.
        loss_fn: maps the model's output to a scalar loss; by default the output itself
            when it is a scalar, or its ``.loss`` (Hugging Face models given labels).
        base: the settings the options leave alone (``Config()`` by default: derived
            tensors on).
        options: the ways a module may be stored (:data:`OPTIONS` by default); keeping it
            exact is always one.

    Raises:
        ValueError: a bad budget, a compressed model, no options, or a budget below what
            the narrowest options reach.
        TypeError: no loss can be read from the output; pass ``loss_fn``.
    """
    options = _checked(model, budget_bytes, options)
    base = Config() if base is None else base
    with _preserved(model):
        run = _runner(model, sample_batch, loss_fn)
        exact_bytes, reference = run(Policy(default=None))
        if not exact_bytes:
            raise ValueError("plan: the model saved no activations on the sample batch")
        stored: dict[str, Bytes] = {EXACT: exact_bytes}
        for o in options:
            stored[o.name], _ = run(Policy(default=o.config(base)))
        errors = _errors(run, exact_bytes, reference, base, options)
        target = budget_bytes
        for _ in range(CHECKS):
            choice, why = _choose(exact_bytes, stored, errors, target, options)
            candidate = _plan(exact_bytes, stored, errors, choice, why, budget_bytes, base, options)
            measured, _ = run(candidate.policy)
            total = sum(measured.values())
            if total <= budget_bytes:
                break
            target = max(0, target - (total - budget_bytes))  # choose again, tighter
        else:
            raise ValueError(
                f"plan: a budget of {budget_bytes} bytes cannot be met: the plan chosen for "
                f"{target} bytes still stores {total} (derived tensors it counted on are "
                "stored where a module they come from stays exact)"
            )
        every_tensor = dataclasses.replace(base, derive=False)
        flat, _ = run(dataclasses.replace(candidate, base=every_tensor).policy)
    return _plan(exact_bytes, stored, errors, choice, why, budget_bytes, base, options,
                 measured, sum(flat.values()))  # fmt: skip


def _checked(model: nn.Module, budget_bytes: int, options: Sequence[Option]) -> tuple[Option, ...]:
    """The options, once the model, the budget and they are fit to plan with."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"plan: budget_bytes must be an int >= 0, got {budget_bytes!r}")
    if is_compressed(model):
        raise ValueError("plan needs an uncompressed model: call torchmesa.decompress first")
    options = tuple(options)
    if not options or not all(isinstance(o, Option) for o in options):
        raise ValueError(f"plan: options must be one or more torchmesa.Option, got {options!r}")
    return options


def _errors(
    run: Runner,
    exact_bytes: Bytes,
    reference: Grads,
    base: Config,
    options: Sequence[Option],
) -> Errors:
    """Each module's gradient error with each option, the rest of the model kept exact."""
    errors: Errors = {}
    for path in exact_bytes:
        for o in options:
            alone = [Rule(_exact_glob(p), None) for p in _children(path, exact_bytes)]
            alone.append(Rule(_exact_glob(path), o.config(base)))
            _, grads = run(Policy(tuple(alone), default=None))
            errors[path, o.name] = _relative_error(grads, reference)
    return errors


def _plan(
    exact: Bytes,
    stored: dict[str, Bytes],
    errors: Errors,
    choice: dict[str, str],
    why: dict[str, str],
    budget: int,
    base: Config,
    options: tuple[Option, ...],
    measured: Bytes | None = None,
    flat: int = 0,
) -> Plan:
    """The plan of ``choice``; each module's bytes as ``measured`` under the plan itself
    when given, else as estimated from the whole model at its option."""
    bits = {o.name: o.bits for o in options}
    four = next((o.name for o in options if o.bits == 4), options[0].name)
    per_byte = {p: errors[p, four] / max(exact[p], 1) for p in exact}
    median = sorted(per_byte.values())[len(per_byte) // 2] or 1e-30
    got = {
        p: (measured if measured is not None else stored[o]).get(p, 0) for p, o in choice.items()
    }
    rows = tuple(
        PlanRow(
            path,
            exact[path],
            option,
            bits.get(option),
            got[path],
            0.0 if option == EXACT else errors[path, option],
            per_byte[path] / median,
            why[path],
        )
        for path, option in choice.items()
    )
    return Plan(rows, budget, base, options, sum(got.values()), flat)


def _choose(
    exact: Bytes, stored: dict[str, Bytes], errors: Errors, budget: int, options: tuple[Option, ...]
) -> tuple[dict[str, str], dict[str, str]]:
    """Greedy: from all exact, take the move with the most bytes freed per added error;
    then spend what is left of the budget. Returns each module's option and why."""
    names = [o.name for o in options]
    choice = dict.fromkeys(exact, EXACT)
    why = dict.fromkeys(exact, "")

    def cost(path: str, option: str) -> int:
        return stored[option].get(path, exact[path])

    def err(path: str, option: str) -> float:
        return 0.0 if option == EXACT else errors[path, option]

    total = sum(exact.values())
    last = 0.0
    while total > budget:
        best = None
        for path, now in choice.items():
            for nxt in names:
                freed = cost(path, now) - cost(path, nxt)
                if freed <= 0:
                    continue
                score = max(err(path, nxt) - err(path, now), 1e-12) / freed
                if best is None or score < best[0]:
                    best = (score, path, nxt, freed)
        if best is None:
            floor = sum(min(cost(p, o) for o in names) for p in exact)
            raise ValueError(
                f"plan: a budget of {budget} bytes cannot be met; with the narrowest "
                f"option everywhere the saved activations take {floor} bytes (at 2 bits "
                "everywhere, if it is offered)"
            )
        last, path, nxt, freed = best
        choice[path] = nxt
        total -= freed
    total = _spend_slack(choice, total, budget, cost, err, names, why)
    for path, now in choice.items():
        if why[path]:
            continue
        if now != EXACT and cost(path, now) == 0:
            why[path] = "rebuilt in backward from what another module stores (derived)"
            continue
        narrower = [
            (max(err(path, o) - err(path, now), 1e-12) / (cost(path, now) - cost(path, o)), o)
            for o in names
            if cost(path, o) < cost(path, now)
        ]
        if not narrower:
            why[path] = "the narrowest option" if now != EXACT else "nothing saved narrower"
        elif total <= budget and last == 0.0:
            why[path] = "the budget needs nothing narrower"
        else:
            score, o = min(narrower)
            why[path] = (
                f"{o} costs {score / max(last, 1e-30):.1f}x the error per byte of the last step"
            )
    return choice, why


def _spend_slack(
    choice: dict[str, str],
    total: int,
    budget: int,
    cost: Callable[[str, str], int],
    err: Callable[[str, str], float],
    names: list[str],
    why: dict[str, str],
) -> int:
    """Greedy narrowing can overshoot: spend the bytes the budget still has on the moves
    that remove the most error per byte (a move that costs nothing first); each move
    lowers the error, so it ends."""
    while True:
        best = None
        for path, now in choice.items():
            for other in (EXACT, *names):
                extra = cost(path, other) - cost(path, now)
                gain = err(path, now) - err(path, other)
                if gain <= 0 or total + extra > budget:
                    continue
                score = float("inf") if extra <= 0 else gain / extra
                if best is None or score > best[0]:
                    best = (score, path, other, extra)
        if best is None:
            return total
        _, path, other, extra = best
        choice[path] = other
        why[path] = "less error for the bytes the budget had left"
        total += extra


def _runner(model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> Runner:
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


def _loss(out: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
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


def _relative_error(grads: Grads, reference: Grads) -> float:
    num = den = 0.0
    for g, r in zip(grads, reference, strict=True):
        if r is None:
            continue
        g = torch.zeros_like(r) if g is None else g
        num += float((g.float() - r.float()).square().sum())
        den += float(r.float().square().sum())
    return num / den if den else 0.0


def _children(path: str, paths: Bytes) -> list[str]:
    prefix = f"{path}." if path else ""
    return [p for p in paths if p != path and p.startswith(prefix)]


def _config(base: Config, option: Option | None) -> Config | None:
    return None if option is None else option.config(base)


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
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        model.train(training)
