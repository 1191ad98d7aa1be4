"""The ``torchmesa`` command: ``demo``, ``profile MODEL`` and ``bench``.

    torchmesa demo                      # the small ViT on digits, exact vs torchmesa
    torchmesa demo --task text          # a character GPT on standard-library source
    torchmesa profile gpt2 --layers 4   # where a model's saved activations go
    torchmesa profile deit-s --plot deit.png
    torchmesa profile mypkg.models:build --input-shape 8,3,224,224
    torchmesa bench                     # the benchmark suite's quick configuration

Arguments are parsed with ``argparse`` (standard library), progress bars come from
``tqdm`` and plots from ``matplotlib`` (the ``cli`` extra); tables are plain text.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchmesa
from torchmesa.apps import demo
from torchmesa.apps.models import SPECS
from torchmesa.extras import MissingExtra

HF_MODELS = ("gpt2", "bert", "vit")


class CliError(Exception):
    """A problem the person running the command can act on; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchmesa`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CliError, MissingExtra) as err:
        print(f"torchmesa: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchmesa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,profile,bench}")

    d = sub.add_parser("demo", help="train exact and torchmesa side by side on a built-in task")
    d.add_argument("--task", choices=["vision", "text"], default="vision")
    d.add_argument("--epochs", type=int, default=20, help="vision: epochs over the digits")
    d.add_argument("--steps", type=int, default=300, help="text: training steps")
    d.add_argument("--batch-size", type=int, help="default: 64 (vision), 16 (text)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    d.add_argument("--plot", metavar="PNG", help="where to write the plot (default: "
                   "torchmesa-demo-<task>.png); 'none' for no plot")  # fmt: skip
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(run=_demo)

    p = sub.add_parser("profile", help="per-module saved activations, exact vs compressed")
    p.add_argument("model", help=f"a built-in ({', '.join(_builtin_names())}), a Hugging "
                   f"Face config ({', '.join(HF_MODELS)}) or module.path:factory")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="text models")
    p.add_argument("--image-size", type=int, default=224, help="vision models")
    p.add_argument("--layers", type=int, help="Hugging Face models (default: their base size)")
    p.add_argument("--hidden", type=int, help="Hugging Face models")
    p.add_argument("--heads", type=int, help="Hugging Face models")
    p.add_argument("--input-shape", help="a factory's random input, e.g. 8,3,224,224")
    p.add_argument("--bits", type=int, default=8, choices=[8, 4, 2])
    p.add_argument("--limit", type=int, default=25, help="table rows (the rest are summed)")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of the largest modules")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(run=_profile)

    b = sub.add_parser("bench", help="the benchmark suite's quick configuration")
    b.add_argument("--out", default="torchmesa-bench.json")
    b.add_argument("extra", nargs=argparse.REMAINDER, help="passed on (see --help of it)")
    b.set_defaults(run=_bench)
    return parser


# -- demo --------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    vision = args.task == "vision"
    batch = args.batch_size or (64 if vision else 16)
    if min(args.epochs, args.steps, batch) < 1:
        raise CliError("--epochs, --steps and --batch-size must be at least 1")
    task = demo.vision_task(args.epochs, batch, args.seed) if vision else demo.text_task(
        args.steps, batch, args.seed)  # fmt: skip
    report = demo.run_task(task, progress=not args.no_progress)
    print(demo.table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    plot = args.plot or f"torchmesa-demo-{args.task}.png"
    if plot != "none":
        demo.plot(report, plot)
        print(f"wrote {plot}")
    return 0


# -- profile -----------------------------------------------------------------------------------


def _profile(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = torchmesa.Config(
        bits=args.bits, rounding="nearest" if args.bits == 8 else "stochastic"
    )
    try:
        model, batch, label = _build(args)
        rep = torchmesa.report(model, batch, config, label=label)
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise CliError(_too_large(args, err)) from None
    except RuntimeError as err:
        if "memory" in str(err).lower():
            raise CliError(_too_large(args, err)) from None
        raise
    if args.json:
        print(json.dumps(rep.to_json(), indent=1))
    else:
        print(f"{label}, batch {rep.batch}, {args.bits}-bit: saved activations of one forward")
        print(rep.table(args.limit))
    if args.plot:
        rep.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _too_large(args: argparse.Namespace, err: BaseException) -> str:
    return (
        f"the batch does not fit in memory ({str(err).splitlines()[0][:120]}); try a smaller "
        f"--batch-size (now {args.batch_size}) or --seq-len / --image-size"
    )


def _builtin_names() -> list[str]:
    return ["vit-digits", *SPECS]


def _build(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    name = args.model
    torch.manual_seed(0)
    if ":" in name:
        return _from_factory(name, args)
    if name == "vit-digits":
        return demo.TinyViT(), torch.randn(args.batch_size, 1, 8, 8), name
    if name in SPECS:
        spec = SPECS[name]
        return spec.build(), spec.batch(args.batch_size)[0], name
    if name in HF_MODELS:
        return _hugging_face(name, args)
    known = ", ".join(_builtin_names() + list(HF_MODELS))
    raise CliError(f"unknown model {name!r}; known: {known}; or give module.path:factory")


def _hugging_face(name: str, args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    try:
        import transformers as tf
    except ImportError:
        raise CliError(f"{name!r} needs transformers: pip install transformers") from None
    size = {}
    if args.layers:
        size["num_hidden_layers"] = args.layers
    if args.hidden:
        size["hidden_size"] = args.hidden
    if args.heads:
        size["num_attention_heads"] = args.heads
    b, n = args.batch_size, args.seq_len
    if name == "gpt2":
        cfg: Any = tf.GPT2Config(n_positions=max(1024, n), **size)
        model: nn.Module = tf.GPT2LMHeadModel(cfg)
        ids = torch.randint(0, cfg.vocab_size, (b, n))
        batch: Any = {"input_ids": ids, "labels": ids}
    elif name == "bert":
        cfg = tf.BertConfig(max_position_embeddings=max(512, n), **size)
        model = tf.BertForMaskedLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (b, n))
        batch = {"input_ids": ids, "labels": ids}
    else:
        cfg = tf.ViTConfig(image_size=args.image_size, num_labels=1000, **size)  # type: ignore[call-arg]
        model = tf.ViTForImageClassification(cfg)
        batch = {"pixel_values": torch.randn(b, 3, args.image_size, args.image_size)}
    layers = getattr(cfg, "num_hidden_layers", "?")
    return model, batch, f"{name} ({layers} layers, hidden {cfg.hidden_size})"


def _from_factory(spec: str, args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CliError(f"cannot load {spec!r}: {err}") from None
    try:
        made = factory()
    except Exception as err:  # the user's code: show its traceback once, not ours
        frames = traceback.extract_tb(err.__traceback__)[1:]  # drop this frame
        lines = traceback.format_list(frames) + traceback.format_exception_only(err)
        raise CliError(f"the factory {spec!r} raised:\n" + "".join(lines).rstrip()) from None
    model, batch = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise CliError(f"the factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    if batch is None:
        if not args.input_shape:
            raise CliError(
                f"{spec!r} returned a model without a batch: pass --input-shape "
                "(e.g. 8,3,224,224) or return (model, batch) from the factory"
            )
        try:
            shape = [int(n) for n in args.input_shape.split(",")]
        except ValueError:
            raise CliError(f"--input-shape must be integers like 8,3,224,224, got "
                           f"{args.input_shape!r}") from None  # fmt: skip
        batch = torch.randn(shape)
    return model, batch, spec


# -- bench -------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from torchmesa.apps import benchmark

    extra = [a for a in args.extra if a != "--"]
    benchmark.main(["--out", args.out, *extra])
    return 0


if __name__ == "__main__":
    sys.exit(main())
