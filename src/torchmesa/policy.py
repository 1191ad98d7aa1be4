"""Which modules store how: rules that pick modules and give each a ``Config``, or none.

A rule picks modules by a glob on their path in ``model.named_modules()`` (``"blocks.0"``,
``"*.attn"``, ``"lm_head"``) or by class, and optionally by position among the modules it
picks (``index=0``, ``index=[-1]``). A rule that picks a module covers everything inside
it, and the first rule, in order, that covers a module decides its setting: list an
exception before the rule it is an exception to. Modules no rule covers get the policy's
default. ``config=None`` keeps a module's activations exact. Every saved tensor follows
the setting of the innermost module running when it is saved.

    torchmesa.compress(model, [
        torchmesa.Rule("transformer.h.0", None),          # first block exact
        torchmesa.Rule("lm_head", None),                  # and the LM head
        torchmesa.Rule(nn.Linear, Config(bits=4, rounding="stochastic")),
    ])                                                    # the rest: Config()
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from torchmesa.config import Config

Match = str | type | tuple[type, ...]


@dataclass(frozen=True)
class Rule:
    """Modules picked by ``match`` (and ``index``) store activations with ``config``.

    Args:
        match: a glob on the module's path (``fnmatch`` syntax, ``""`` is the root) or an
            ``nn.Module`` subclass, or a tuple of them.
        config: how the picked modules store; ``None`` keeps them exact.
        index: positions among the modules ``match`` picks, in ``named_modules()`` order;
            negative counts from the end. ``None`` picks them all.
    """

    match: Match
    config: Config | None = None
    index: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        classes = self.match if isinstance(self.match, tuple) else (self.match,)
        if not isinstance(self.match, str) and not (
            classes and all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes)
        ):
            raise ValueError(
                "Rule.match must be a path glob (str) or an nn.Module subclass (or a tuple of "
                f"them), got {self.match!r}"
            )
        if self.config is not None and not isinstance(self.config, Config):
            raise ValueError(
                f"Rule.config must be a torchmesa.Config or None (exact), got {self.config!r}"
            )
        if isinstance(self.index, list):
            object.__setattr__(self, "index", tuple(self.index))
        indices = (self.index,) if isinstance(self.index, int) else self.index
        if indices is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise ValueError(f"Rule.index must be an int or a list of ints, got {self.index!r}")

    def picks(self, modules: list[tuple[str, nn.Module]]) -> list[str]:
        """Paths of the modules this rule picks among ``modules`` (in order)."""
        if isinstance(self.match, str):
            hits = [p for p, _ in modules if fnmatch.fnmatchcase(p, self.match)]
        else:
            hits = [p for p, m in modules if isinstance(m, self.match)]
        if self.index is None:
            return hits
        indices = (self.index,) if isinstance(self.index, int) else self.index
        bad = [i for i in indices if not -len(hits) <= i < len(hits)]
        if bad:
            raise ValueError(
                f"{self.describe()}: index {bad} out of range; it matches {len(hits)} "
                f"module(s){': ' + ', '.join(repr(h) for h in hits[:8]) if hits else ''}"
            )
        return [hits[i] for i in indices]

    def describe(self) -> str:
        """The rule's match, as a person wrote it."""
        if isinstance(self.match, str):
            return f"Rule({self.match!r})"
        names = [
            c.__name__ for c in (self.match if isinstance(self.match, tuple) else (self.match,))
        ]
        return f"Rule({', '.join(names)})"


@dataclass(frozen=True)
class Policy:
    """Rules, first match wins, and the setting of modules no rule reaches."""

    rules: tuple[Rule, ...] = ()
    default: Config | None = field(default_factory=Config)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise ValueError(f"Policy.rules must hold torchmesa.Rule objects, got {rule!r}")
        if self.default is not None and not isinstance(self.default, Config):
            raise ValueError(f"Policy.default must be a Config or None, got {self.default!r}")

    def resolve(self, model: nn.Module) -> dict[str, Config | None]:
        """Each module path's setting.

        Raises:
            ValueError: a rule picks no module; the message lists what exists.
        """
        modules = list(model.named_modules())
        first_rule: dict[str, int] = {}  # path -> the first rule that picks it
        for order, rule in enumerate(self.rules):
            picked = rule.picks(modules)
            if not picked:
                raise ValueError(f"{rule.describe()} matches no module. {_inventory(modules)}")
            for path in picked:
                first_rule.setdefault(path, order)
        covering: dict[str, int | None] = {}  # path -> the first rule covering it
        for path, _ in modules:
            inherited = covering.get(path.rpartition(".")[0]) if path else None
            own = first_rule.get(path)
            candidates = [r for r in (inherited, own) if r is not None]
            covering[path] = min(candidates) if candidates else None
        return {
            path: self.default if r is None else self.rules[r].config
            for path, r in covering.items()
        }


def as_policy(spec: Config | Policy | Sequence[Rule] | None) -> Policy:
    """A ``Policy`` from what ``compress`` accepts: a Config, rules, a Policy or None."""
    if spec is None:
        return Policy()
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Config):
        return Policy(default=spec)
    if isinstance(spec, Rule):
        return Policy((spec,))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return Policy(tuple(spec))
    raise TypeError(
        "compress expects a torchmesa.Config, a list of torchmesa.Rule or a torchmesa.Policy, "
        f"got {type(spec).__name__}"
    )


def _inventory(modules: list[tuple[str, nn.Module]], limit: int = 12) -> str:
    """What a rule could have matched: some module paths and every class name."""
    paths = [p for p, _ in modules if p]
    shown = ", ".join(repr(p) for p in paths[:limit])
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    classes = sorted({type(m).__name__ for _, m in modules})
    return f"Module paths: {shown}{more}. Classes: {', '.join(classes)}."
