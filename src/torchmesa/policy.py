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
from typing import Any

from torch import nn

from torchmesa.config import Config


@dataclass(frozen=True)
class ClassNamed:
    """Matches modules whose class name fits one of ``patterns`` (globs): a family of
    classes a model defines itself, such as ``ClassNamed("*Attention")``."""

    patterns: tuple[str, ...]

    def __init__(self, *patterns: str) -> None:
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"ClassNamed needs one or more glob strings, got {patterns!r}")
        object.__setattr__(self, "patterns", patterns)

    def matches(self, module: nn.Module) -> bool:
        name = type(module).__name__
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


Match = str | type | tuple[type, ...] | ClassNamed


@dataclass(frozen=True)
class Rule:
    """Modules picked by ``match`` (and ``index``) store activations with ``config``.

    Args:
        match: a glob on the module's path (``fnmatch`` syntax, ``""`` is the root) or an
            ``nn.Module`` subclass, or a tuple of them.
        config: how the picked modules store; ``None`` keeps them exact.
        index: positions among the modules ``match`` picks, in ``named_modules()`` order;
            negative counts from the end. ``None`` picks them all.
        required: a rule that picks no module is an error unless this is False.
        origin: where the rule came from, for error messages (a policy file's line).
    """

    match: Match
    config: Config | None = None
    index: int | tuple[int, ...] | None = None
    required: bool = True
    origin: str = ""

    def __post_init__(self) -> None:
        classes = self.match if isinstance(self.match, tuple) else (self.match,)
        if not isinstance(self.match, (str, ClassNamed)) and not (
            classes and all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes)
        ):
            raise ValueError(
                "Rule.match must be a path glob (str), an nn.Module subclass (or a tuple of "
                f"them) or a ClassNamed(...), got {self.match!r}"
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
        elif isinstance(self.match, ClassNamed):
            hits = [p for p, m in modules if self.match.matches(m)]
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
        """The rule's match, as a person wrote it, and where it came from."""
        where = f" ({self.origin})" if self.origin else ""
        if isinstance(self.match, str):
            return f"Rule({self.match!r}){where}"
        if isinstance(self.match, ClassNamed):
            return f"Rule(ClassNamed{self.match.patterns!r}){where}"
        names = [
            c.__name__ for c in (self.match if isinstance(self.match, tuple) else (self.match,))
        ]
        return f"Rule({', '.join(names)}){where}"


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
            if not picked and rule.required:
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


# -- Mesa's policy files --------------------------------------------------------------------

# Mesa tags its layers; each tag maps to the PyTorch classes that do that layer's work.
# Attention's matrix products and softmax run as functions inside an attention module in
# most models, so Mesa's "matmul" and "softmax" tags map to modules named *Attention*: the
# tensors those modules save themselves (their projections are Linear children, "fc").
_MESA_TAGS: dict[str, tuple[type, ...]] = {
    "fc": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "gelu": (nn.GELU,),
    "relu": (nn.ReLU,),
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "layernorm": (nn.LayerNorm,),
}
_MESA_ATTENTION = {
    "matmul": ClassNamed("*Attention*"),
    "softmax": ClassNamed("*Attention*", "Softmax"),
}
_MESA_ATTENTION_TAGS = tuple(_MESA_ATTENTION)
_MESA_LEVELS = {256: 8, 16: 4, 4: 2}
_MESA_KEYS = ("by_index", "enable", "level", "ema_decay")


class MesaPolicyError(ValueError):
    """A Mesa policy file that cannot be read; the message names the file and line."""


def from_mesa_file(path: str) -> Policy:
    """A :class:`Policy` from a Mesa policy file, so Mesa users keep their files.

    The file has sections ``on <tag>:`` (tags ``fc``, ``conv``, ``gelu``, ``relu``, ``bn``,
    ``layernorm``, ``softmax``, ``matmul``) holding blocks of ``key: value`` lines; each
    ``by_index:`` (``all`` or indices) starts a block, and later blocks override earlier
    ones for the layers they pick. ``enable: True`` compresses, with ``level`` (256, 16 or
    4 levels: 8, 4 or 2 bits) and ``ema_decay``. Layers of no enabled tag stay exact, as in
    Mesa. ``#`` starts a comment.

    Raises:
        MesaPolicyError: a malformed line, an unknown tag or key, a bad value; the message
            gives the file name and line number.
    """
    text = _read(path)
    sections = _parse_mesa(text, path)
    classes = dict(_MESA_TAGS)
    classes.update(_transformers_classes())
    rules: list[Rule] = []
    attention: dict[str, list[Rule]] = {}
    for tag, (line, blocks) in sections.items():
        if not blocks:
            raise MesaPolicyError(f"{path} line {line}: section 'on {tag}' has no 'by_index:'")
        targets = classes.get(tag) or _MESA_ATTENTION[tag]
        made = _mesa_rules(blocks, f"{path} line {line}, 'on {tag}'", targets)
        if tag in _MESA_ATTENTION_TAGS:
            attention[tag] = made
        else:
            rules += made
    for tag, targets in classes.items():  # Mesa leaves layers of other tags exact
        if tag not in sections:
            rules.append(Rule(targets, None, required=False, origin=f"{path}: no 'on {tag}'"))
    if attention:
        settings = {tag: [r.config for r in made] for tag, made in attention.items()}
        if len({repr(v) for v in settings.values()}) > 1:
            lines = ", ".join(f"'on {tag}' line {sections[tag][0]}" for tag in attention)
            raise MesaPolicyError(
                f"{path}: {lines} give attention's matmul and softmax different settings; "
                "torchmesa stores both as the attention module's own saves, so they must match"
            )
        rules += next(iter(attention.values()))
    return Policy(tuple(rules), default=None)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise MesaPolicyError(f"cannot read Mesa policy file {path!r}: {err.strerror}") from err


def _parse_mesa(text: str, path: str) -> dict[str, tuple[int, list[dict[str, Any]]]]:
    """``{tag: (line of its section, [blocks])}``; a block is ``{key: (value, line)}``."""
    sections: dict[str, tuple[int, list[dict[str, Any]]]] = {}
    blocks: list[dict[str, Any]] | None = None
    known = sorted(set(_MESA_TAGS) | set(_MESA_ATTENTION_TAGS))
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {number}"
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon:
            raise MesaPolicyError(f"{where}: expected 'key: value' or 'on <tag>:', got {raw!r}")
        words = key.split()
        if words and words[0] == "on":
            if len(words) != 2 or words[1] not in known:
                raise MesaPolicyError(
                    f"{where}: unknown section {key!r}; sections are 'on <tag>:' with a tag "
                    f"in {known}"
                )
            if words[1] in sections:
                first = sections[words[1]][0]
                raise MesaPolicyError(f"{where}: section 'on {words[1]}' repeats line {first}")
            blocks = []
            sections[words[1]] = (number, blocks)
            continue
        if blocks is None:
            raise MesaPolicyError(f"{where}: {key!r} comes before any 'on <tag>:' section")
        if key not in _MESA_KEYS:
            raise MesaPolicyError(f"{where}: unknown key {key!r}; torchmesa reads {_MESA_KEYS}")
        if key == "by_index":
            blocks.append({})
        elif not blocks:
            raise MesaPolicyError(f"{where}: {key!r} comes before the section's 'by_index:'")
        blocks[-1][key] = (_mesa_value(key, value, where), number)
    return sections


def _mesa_value(key: str, value: str, where: str) -> object:
    """A key's value, checked: ``by_index`` -> "all" or ints, ``enable`` -> bool, ..."""
    if key == "by_index":
        if value == "all":
            return "all"
        parts = value.replace(",", " ").split()
        if not parts or not all(p.isdigit() for p in parts):
            raise MesaPolicyError(f"{where}: by_index must be 'all' or indices, got {value!r}")
        return tuple(int(p) for p in parts)
    if key == "enable":
        if value not in ("True", "true", "False", "false"):
            raise MesaPolicyError(f"{where}: enable must be True or False, got {value!r}")
        return value in ("True", "true")
    if key == "level":
        if not value.isdigit() or int(value) not in _MESA_LEVELS:
            raise MesaPolicyError(
                f"{where}: level must be one of {sorted(_MESA_LEVELS, reverse=True)} "
                f"(8, 4 or 2 bits), got {value!r}"
            )
        return int(value)
    try:
        decay = float(value)
    except ValueError:
        decay = -1.0
    if not 0.0 <= decay < 1.0:
        raise MesaPolicyError(f"{where}: ema_decay must be a number in [0, 1), got {value!r}")
    return decay


def _mesa_rules(blocks: list[dict[str, Any]], origin: str, match: Match) -> list[Rule]:
    """Rules for one section: layers named by index first, then the rest ("all")."""
    named = sorted({i for b in blocks if b["by_index"][0] != "all" for i in b["by_index"][0]})
    rules = []
    for index in [*named, None]:
        merged: dict[str, Any] = {}
        for block in blocks:
            picks = block["by_index"][0]
            if picks == "all" or (index is not None and index in picks):
                merged.update({k: v for k, (v, _) in block.items() if k != "by_index"})
        if index is None and not any(b["by_index"][0] == "all" for b in blocks):
            break
        config = None
        if merged.get("enable", False):
            config = Config(  # Mesa: running ranges (the file's ema_decay), all stored,
                bits=_MESA_LEVELS[merged.get("level", 256)],  # BatchNorm inputs as codes
                estimator="ema",
                ema_decay=merged.get("ema_decay", 0.9),
                derive=False,
                batch_norm="quantize",
            )
        rules.append(Rule(match, config, index=index, origin=origin))
    return rules


def _transformers_classes() -> dict[str, tuple[type, ...]]:
    """Hugging Face's own linear and GELU classes, when ``transformers`` is installed."""
    try:
        from transformers import activations, pytorch_utils
    except ImportError:
        return {}
    gelus = tuple(
        c for n, c in vars(activations).items()
        if isinstance(c, type) and issubclass(c, nn.Module) and "GELU" in n.upper()
    )  # fmt: skip
    return {"fc": (nn.Linear, pytorch_utils.Conv1D), "gelu": (nn.GELU, *gelus)}
