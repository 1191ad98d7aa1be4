"""Where the command line's MODEL comes from: a name resolved to a :class:`Workload` (how to
build the model, a batch of any size for it, its loss, how to checkpoint it).

    vit-digits, deit-s, gpt2-s, hf-gpt2, ...   built-ins (``apps.models``)
    gpt2, bert, vit                            Hugging Face presets, built from configs
    hf:LlamaConfig                             any ``transformers`` configuration class
    timm:convnext_tiny                         any ``timm`` model, without weights
    mypkg.models:build                         a factory of the user's

``profile``, ``bench`` and ``fit`` take the same names. Nothing is downloaded. A
:class:`Sizes` (sequence length, image size, layers, width, heads, any config setting)
shapes a source and travels to ``fit``'s and ``bench``'s subprocesses as JSON.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchmesa.apps.models import SPECS, TinyViT
from torchmesa.report import call_with

HF_PRESETS = ("gpt2", "bert", "vit")
HF_PREFIX, TIMM_PREFIX = "hf:", "timm:"
DEFAULT_SEQ_LEN, DEFAULT_IMAGE_SIZE = 128, 224


class SourceError(ValueError):
    """A MODEL that cannot be resolved or built; the message says what to change."""


@dataclass(frozen=True)
class Sizes:
    """What shapes a source: ``None`` keeps the source's own value. ``settings`` are
    configuration keys set by name (``hf:`` sources; ``--set KEY=VALUE``)."""

    seq_len: int | None = None
    image_size: int | None = None
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "image_size", "layers", "hidden", "heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SourceError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.input_shape is not None and (
            not self.input_shape or min(self.input_shape) < 1
        ):  # fmt: skip
            raise SourceError(f"--input-shape needs positive sizes, got {self.input_shape}")

    def to_json(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_json(cls, data: dict) -> Sizes:
        shape = data.get("input_shape")
        return cls(**{**data, "settings": tuple(tuple(s) for s in data.get("settings", ())),
                      "input_shape": None if shape is None else tuple(shape)})  # fmt: skip


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape a source (``profile``, ``fit``, ``bench``)."""
    parser.add_argument("--seq-len", type=int, help="text models (default: 128 for Hugging "
                        "Face models, a built-in's own)")  # fmt: skip
    parser.add_argument("--image-size", type=int, help="vision models (default: the model's)")
    parser.add_argument("--layers", type=int, help="built-in and Hugging Face models")
    parser.add_argument("--hidden", type=int, help="built-in and Hugging Face models")
    parser.add_argument("--heads", type=int, help="built-in and Hugging Face models")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a configuration setting (hf:, timm:), repeatable")  # fmt: skip
    parser.add_argument("--input-shape", help="a factory's random input, e.g. 8,3,224,224")


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    """The :class:`Sizes` those flags give."""
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(n) for n in args.input_shape.split(","))
        except ValueError:
            raise SourceError(f"--input-shape must be integers like 8,3,224,224, got "
                              f"{args.input_shape!r}") from None  # fmt: skip
    return Sizes(
        seq_len=args.seq_len, image_size=args.image_size, layers=args.layers,
        hidden=args.hidden, heads=args.heads,
        settings=tuple(parse_setting(s) for s in args.set), input_shape=shape,
    )  # fmt: skip


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a Python literal where it is one (``8``, ``0.1``,
    ``True``, ``'silu'``), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise SourceError(f"--set takes KEY=VALUE (e.g. intermediate_size=512), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


@dataclass(frozen=True)
class Workload:
    """A model to train: ``build()`` makes it (seeded by the caller), ``batch(n)`` a batch
    of ``n`` samples, ``loss(model, batch)`` the training loss (the model called with
    ``inputs(batch)``, its output scored by ``loss_from``), ``checkpointed(model)``
    the model with each repeated block recomputed in backward. ``kind`` is the built-in
    spec's kind (``vit``, ``decoder``, ``hf-gpt2``) or ``vision``, ``text``, ``other``."""

    name: str
    kind: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[int], Any]
    inputs: Callable[[Any], Any]  # a batch -> what the model is called with
    loss_from: Callable[[Any, Any], torch.Tensor]  # (output, batch) -> the training loss
    checkpoint_with: Callable[[nn.Module], nn.Module]
    varies: frozenset[str] = frozenset({"batch"})
    natural_batch: int | None = None  # a factory's own batch size, where it has one

    def batch(self, size: int) -> Any:
        if size < 1:
            raise SourceError(f"a batch needs at least 1 sample, got {size}")
        return self.make_batch(size)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_from(call_with(model, self.inputs(batch)), batch)

    def checkpointed(self, model: nn.Module) -> nn.Module:
        return self.checkpoint_with(model)


def names() -> list[str]:
    """The built-in names and presets, for help texts and errors."""
    return ["vit-digits", *SPECS, *HF_PRESETS]


def resolve(model: str, sizes: Sizes = Sizes()) -> Workload:
    """The workload MODEL names; :class:`SourceError` when it names none."""
    if model.startswith(HF_PREFIX):
        return _hf_config_class(model[len(HF_PREFIX) :], sizes)
    if model.startswith(TIMM_PREFIX):
        return _timm(model[len(TIMM_PREFIX) :], sizes)
    if ":" in model:
        return _factory(model, sizes)
    if model == "vit-digits":
        return _vit_digits()
    if model in SPECS:
        return _builtin(model, sizes)
    if model in HF_PRESETS:
        return _hf_preset(model, sizes)
    raise SourceError(
        f"unknown model {model!r}; known: {', '.join(names())}; or hf:CONFIG_CLASS, "
        "timm:NAME, module.path:factory"
    )


def loss_of_output(out: Any) -> torch.Tensor:
    """A training loss read off any output: a scalar itself, a ``.loss`` (models given
    labels), else the mean square of the first floating tensor (a stand-in objective
    whose backward reaches every activation, for models without a head)."""
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out.reshape(())
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    first = _first_float(out)
    if first is None:
        raise SourceError(f"no loss can be read from the model's output ({type(out).__name__})")
    return first.float().pow(2).mean()


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def checkpoint_repeated(model: nn.Module) -> nn.Module:
    """Checkpoint each block of the model's largest run of same-class blocks (an
    ``nn.ModuleList`` or ``nn.Sequential``): what frameworks' own switches do, for models
    that have none. Non-reentrant ``torch.utils.checkpoint``, while training only."""
    runs = [
        m
        for m in model.modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential))
        and len(m) > 1
        and len({type(c) for c in m}) == 1
        and any(True for _ in m[0].parameters())
    ]
    if not runs:
        raise SourceError(
            f"{type(model).__name__} has no run of repeated blocks to checkpoint "
            "(an nn.ModuleList or nn.Sequential of one block class)"
        )
    blocks = max(runs, key=lambda m: sum(p.numel() for p in m.parameters()))
    for block in blocks:
        _checkpoint_forward(block)
    return model


def _checkpoint_forward(block: nn.Module) -> None:
    forward = block.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    block.forward = checkpointed


# -- built-ins ---------------------------------------------------------------------------------


def _vit_digits() -> Workload:
    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)

    return Workload("vit-digits", "vit", TinyViT, batch, _first, _cross_entropy,
                    checkpoint_repeated)  # fmt: skip


def _builtin(name: str, sizes: Sizes) -> Workload:
    spec = SPECS[name]
    changes: dict[str, Any] = {}
    for field, value in (("depth", sizes.layers), ("dim", sizes.hidden), ("heads", sizes.heads)):
        if value is not None:
            changes[field] = value
    if spec.kind == "vit" and sizes.image_size is not None:
        changes["image"] = sizes.image_size
    if spec.kind != "vit" and sizes.seq_len is not None:
        changes["seq"] = sizes.seq_len
    spec = dataclasses.replace(spec, **changes)
    if spec.dim % spec.heads:
        raise SourceError(f"{name}: width {spec.dim} is not divisible by {spec.heads} heads")
    varies = {"batch", "image-size" if spec.kind == "vit" else "seq-len"}
    return Workload(name, spec.kind, spec.build, spec.batch, spec.inputs, spec.loss_from,
                    spec.checkpointed, frozenset(varies))  # fmt: skip


# -- Hugging Face ------------------------------------------------------------------------------


def _transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise SourceError(f"{what} needs transformers: pip install transformers") from None
    return transformers


def _hf_size_settings(sizes: Sizes) -> dict[str, Any]:
    size = {"num_hidden_layers": sizes.layers, "hidden_size": sizes.hidden,
            "num_attention_heads": sizes.heads}  # fmt: skip
    return {k: v for k, v in size.items() if v is not None} | dict(sizes.settings)


def _hf_preset(name: str, sizes: Sizes) -> Workload:
    tf = _transformers(repr(name))
    settings = _hf_size_settings(sizes)
    seq = sizes.seq_len or DEFAULT_SEQ_LEN
    image = sizes.image_size or DEFAULT_IMAGE_SIZE
    if name == "gpt2":
        config = tf.GPT2Config(n_positions=max(1024, seq), **settings)
        model_class = tf.GPT2LMHeadModel
    elif name == "bert":
        config = tf.BertConfig(max_position_embeddings=max(512, seq), **settings)
        model_class = tf.BertForMaskedLM
    else:
        config = tf.ViTConfig(image_size=image, num_labels=1000, **settings)
        model_class = tf.ViTForImageClassification
    _check_settings(f"{name!r}", config, settings)
    layers = getattr(config, "num_hidden_layers", "?")
    label = f"{name} ({layers} layer{'s' * (layers != 1)}, hidden {config.hidden_size})"
    return _hf_workload(label, config, model_class, seq, image)


def _hf_config_class(class_name: str, sizes: Sizes) -> Workload:
    tf = _transformers(f"hf:{class_name}")
    config_class = getattr(tf, class_name, None)
    if not (isinstance(config_class, type) and issubclass(config_class, tf.PretrainedConfig)):
        raise SourceError(
            f"hf:{class_name}: transformers {tf.__version__} has no configuration class of "
            "that name (e.g. hf:LlamaConfig, hf:BertConfig, hf:ViTConfig)"
        )
    settings = _hf_size_settings(sizes)
    seq = sizes.seq_len or DEFAULT_SEQ_LEN
    image = sizes.image_size or DEFAULT_IMAGE_SIZE
    probe = config_class()
    for key, wanted in (("max_position_embeddings", seq), ("n_positions", seq)):
        if key not in settings and isinstance(getattr(probe, key, None), int):
            settings[key] = max(getattr(probe, key), wanted)
    if "image_size" not in settings and isinstance(getattr(probe, "image_size", None), int):
        settings["image_size"] = image
    try:
        config = config_class(**settings)
    except (TypeError, ValueError) as err:
        raise SourceError(f"hf:{class_name} refused {settings}: {err}") from None
    _check_settings(f"hf:{class_name}", config, settings)
    if hasattr(config, "use_cache"):
        config.use_cache = False  # training: no key/value cache
    model_class = _hf_model_class(tf, config, class_name)
    label = f"hf:{class_name} ({model_class.__name__})"
    return _hf_workload(label, config, model_class, seq, image)


def _check_settings(what: str, config: Any, settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        if getattr(config, key, object()) != value:
            raise SourceError(
                f"{what}: its configuration has no setting {key!r} (or overrides it); "
                "set the configuration's own key with --set KEY=VALUE"
            )


# the head a user would train, in order of preference (BART has a causal-LM class and BERT a
# decoder one, yet both train as they were made: sequence to sequence, masked LM)
_HF_HEADS = ("AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModelForCausalLM",
             "AutoModelForImageClassification", "AutoModel")  # fmt: skip


def _hf_model_class(tf: Any, config: Any, class_name: str) -> Any:
    for auto_name in _HF_HEADS:
        auto = getattr(tf, auto_name, None)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]
    raise SourceError(f"hf:{class_name}: no model class of transformers takes this configuration")


def _hf_workload(label: str, config: Any, model_class: Any, seq: int, image: int) -> Workload:
    config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
    head = model_class.__name__
    main_input = getattr(model_class, "main_input_name", "input_ids")
    labelled = head.endswith(("LMHeadModel", "ForCausalLM", "ForMaskedLM",
                              "ForConditionalGeneration", "ForImageClassification"))  # fmt: skip
    if main_input not in ("input_ids", "pixel_values", "input_values"):
        raise SourceError(
            f"{label} takes {main_input!r}, which this command cannot make; write a factory "
            "returning (model, batch) and pass module.path:factory"
        )
    vocab = getattr(config, "vocab_size", None)
    channels = getattr(config, "num_channels", 3)
    classes = getattr(config, "num_labels", 2)

    def batch(n: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        if main_input == "pixel_values":
            out = {"pixel_values": torch.randn(n, channels, image, image, generator=g)}
            if labelled:
                out["labels"] = torch.randint(0, classes, (n,), generator=g)
            return out
        if main_input == "input_values":  # raw audio samples
            return {"input_values": torch.randn(n, seq, generator=g)}
        ids = torch.randint(0, vocab or 1000, (n, seq), generator=g)
        return {"input_ids": ids, "labels": ids} if labelled else {"input_ids": ids}

    if (
        model_class.__name__.endswith("ForConditionalGeneration")
        and getattr(config, "decoder_start_token_id", None) is None
    ):  # labels are shifted right into decoder inputs: they start with this token
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0

    def build() -> nn.Module:
        try:
            return model_class(config)
        except (ValueError, TypeError) as err:
            raise SourceError(f"{label}: transformers cannot build it: {err}") from None

    kind = "vision" if main_input == "pixel_values" else "text"
    varies = {"batch", "image-size" if kind == "vision" else "seq-len"}
    return Workload(label, kind, build, batch, _same, _output_loss, _hf_checkpoint,
                    frozenset(varies))  # fmt: skip


def _hf_checkpoint(model: nn.Module) -> nn.Module:
    hf: Any = model
    if not getattr(hf, "supports_gradient_checkpointing", False):
        return checkpoint_repeated(model)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _same(batch: Any) -> Any:
    return batch


def _output_loss(out: Any, batch: Any) -> torch.Tensor:
    return loss_of_output(out)


def _first(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return batch[0]


def _cross_entropy(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out, batch[1])


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a tensor, or in tuples, lists, dicts and model outputs of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list, dict)):
        for value in obj.values() if isinstance(obj, dict) else obj:
            yield from _tensors(value)


def _first_float(out: Any) -> torch.Tensor | None:
    return next((t for t in _tensors(out) if t.is_floating_point()), None)


# -- timm --------------------------------------------------------------------------------------


def _timm(name: str, sizes: Sizes) -> Workload:
    try:
        import timm
    except ImportError as err:
        raise SourceError(
            f"timm:{name} needs timm (and the torchvision that matches your torch): pip "
            f"install timm ({err})"
        ) from None
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; close: {', '.join(close)}" if close else ""
        raise SourceError(f"timm:{name}: timm {timm.__version__} has no such model{hint}")
    kwargs: dict[str, Any] = dict(sizes.settings)
    if sizes.image_size is not None:
        kwargs["img_size"] = sizes.image_size  # ViT-style models are built for their size
    try:
        probe = _timm_probe(timm, name, kwargs)
    except TypeError:  # a convolutional network: any image size, no img_size argument
        kwargs.pop("img_size", None)
        probe = _timm_probe(timm, name, kwargs)
    channels, *size = probe.pretrained_cfg.get("input_size", (3, DEFAULT_IMAGE_SIZE, 224))
    image = sizes.image_size or size[0]
    classes = probe.num_classes or 1000

    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, channels, image, image, generator=g)
        return x, torch.randint(0, classes, (n,), generator=g)

    def checkpointed(model: nn.Module) -> nn.Module:
        set_grad_checkpointing: Any = getattr(model, "set_grad_checkpointing", None)
        try:
            set_grad_checkpointing(True)
        except (TypeError, NotImplementedError, AssertionError):
            return checkpoint_repeated(model)
        return model

    varies = frozenset({"batch", "image-size"})
    return Workload(f"timm:{name}", "vision", build, batch, _first, _cross_entropy,
                    checkpointed, varies)  # fmt: skip


def _timm_probe(timm: Any, name: str, kwargs: dict[str, Any]) -> Any:
    """The model without its weights' memory (on the meta device where its init allows)."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except (NotImplementedError, RuntimeError):
        return timm.create_model(name, pretrained=False, **kwargs)


# -- factories ---------------------------------------------------------------------------------


def _factory(spec: str, sizes: Sizes) -> Workload:
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SourceError(f"cannot load {spec!r}: {err}") from None
    sized = _takes(factory, "batch_size")

    def made(n: int | None = None) -> tuple[nn.Module, Any]:
        out = _call_factory(spec, factory, {} if n is None or not sized else {"batch_size": n})
        model, batch = out if isinstance(out, tuple) else (out, None)
        if not isinstance(model, nn.Module):
            raise SourceError(
                f"the factory {spec!r} returned {type(model).__name__}, not an nn.Module"
            )
        return model, batch

    _, fixed = made()
    if fixed is None and sizes.input_shape is None:
        raise SourceError(
            f"{spec!r} returned a model without a batch: pass --input-shape (e.g. 8,3,224,224) "
            "or return (model, batch) from the factory"
        )

    def make_batch(n: int) -> Any:
        if fixed is None:
            assert sizes.input_shape is not None
            g = torch.Generator().manual_seed(0)
            return torch.randn(n, *sizes.input_shape[1:], generator=g)
        if sized:
            return made(n)[1]
        if n == _batch_size(fixed):
            return fixed
        raise SourceError(
            f"{spec!r} returns a batch of one size ({_batch_size(fixed)}): to vary it, give "
            "the factory a batch_size parameter (def build(batch_size=8): ... return model, batch)"
        )

    natural = sizes.input_shape[0] if fixed is None and sizes.input_shape else _batch_size(fixed)
    varies = frozenset({"batch"}) if sized or fixed is None else frozenset()
    return Workload(spec, "other", lambda: made()[0], make_batch, _same, _output_loss,
                    checkpoint_repeated, varies, natural)  # fmt: skip


def _takes(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _call_factory(spec: str, factory: Callable[..., Any], kwargs: dict[str, int]) -> Any:
    try:
        return factory(**kwargs)
    except Exception as err:  # the user's code: show its traceback once, not ours
        frames = traceback.extract_tb(err.__traceback__)[1:]  # drop this frame
        lines = traceback.format_list(frames) + traceback.format_exception_only(err)
        raise SourceError(f"the factory {spec!r} raised:\n" + "".join(lines).rstrip()) from None


def _batch_size(batch: Any) -> int | None:
    return next((t.shape[0] for t in _tensors(batch) if t.dim()), None)
