"""The ``torchmesa`` command: ``demo``, ``profile MODEL``, ``fit MODEL`` and ``bench``.

    torchmesa demo                      # the small ViT on digits, exact vs torchmesa
    torchmesa demo --task text          # a character GPT on standard-library source
    torchmesa profile gpt2 --layers 4   # where a model's saved activations go
    torchmesa profile deit-s --plot deit.png
    torchmesa profile mypkg.models:build --input-shape 8,3,224,224
    torchmesa profile hf:LlamaConfig --layers 2 --hidden 256 --heads 4
    torchmesa fit deit-s --memory 4GiB  # the largest batch that trains in 4 GiB, per setting
    torchmesa fit gpt2 --memory 8GiB --vary seq-len --batch-size 4
    torchmesa bench                     # the benchmark suite's quick configuration

Every subcommand says it the same way: ``--json PATH`` writes its measurements beside the
table, ``--json`` alone prints them instead of the table (everything else goes to standard
error), and ``--plot PNG`` draws them.

Arguments are parsed with ``argparse`` (standard library), progress bars come from
``tqdm`` and plots from ``matplotlib`` (the ``cli`` extra); tables are plain text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import torchmesa
from torchmesa.apps import demo, fit, sources
from torchmesa.apps.benchmark import Setup
from torchmesa.extras import MissingExtra, pyplot


class CliError(Exception):
    """A problem the person running the command can act on; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchmesa`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CliError, MissingExtra, sources.SourceError) as err:
        print(f"torchmesa: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchmesa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,profile,fit,bench}")

    d = sub.add_parser("demo", help="train exact and torchmesa side by side on a built-in task")
    d.add_argument("--task", choices=["vision", "text"], default="vision")
    d.add_argument("--epochs", type=int, default=20, help="vision: epochs over the digits")
    d.add_argument("--steps", type=int, default=300, help="text: training steps")
    d.add_argument("--batch-size", type=int, help="default: 64 (vision), 16 (text)")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="a run of both models per seed (default: 0 1 2)")  # fmt: skip
    add_output_arguments(d, "the learning curves (default: torchmesa-demo-<task>.png); "
                         "'none' for no plot")  # fmt: skip
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(run=_demo)

    p = sub.add_parser("profile", help="per-module saved activations, exact vs compressed")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, help="default: a factory's own batch, else 8")
    p.add_argument("--bits", type=int, default=8, choices=[8, 4, 2])
    p.add_argument("--limit", type=int, default=25, help="table rows (the rest are summed)")
    add_output_arguments(p, "a bar chart of the largest modules")
    p.set_defaults(run=_profile)

    f = sub.add_parser("fit", help="the largest batch (or sequence) that trains in a budget")
    add_model_arguments(f)
    f.add_argument("--memory", required=True, help="the budget: 8GiB, 512MiB, 16GB")
    f.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    f.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast to bfloat16 with fp32 weights")  # fmt: skip
    f.add_argument("--vary", choices=fit.VARIES, default="batch",
                   help="what grows: the batch, or at a fixed --batch-size the sequence "
                   "length or image size")  # fmt: skip
    f.add_argument("--batch-size", type=int, default=1, help="with --vary seq-len/image-size")
    f.add_argument("--configs", nargs="+", choices=fit.CONFIGS, default=list(fit.CONFIGS))
    f.add_argument("--timed-steps", type=int, default=1, metavar="N",
                   help="steps timed at each setting's largest fit (its time per sample); "
                   "0: none")  # fmt: skip
    add_output_arguments(f, "peaks against the varied value, per setting")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(run=_fit)

    b = sub.add_parser("bench", help="the benchmark suite's quick configuration (its JSON: "
                       "torchmesa-bench.json unless --json says otherwise)")  # fmt: skip
    add_output_arguments(b, "peak memory against step time, per model and setting")
    b.add_argument("extra", nargs=argparse.REMAINDER, help="passed on (see --help of it)")
    b.set_defaults(run=_bench)
    return parser


# -- demo --------------------------------------------------------------------------------------


def add_output_arguments(parser: argparse.ArgumentParser, plot: str) -> None:
    """``--json [PATH]`` and ``--plot PNG``, the same on every subcommand."""
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the measurements as JSON to PATH; without PATH, print "
                        "them instead of the table")  # fmt: skip
    parser.add_argument("--plot", metavar="PNG", help=plot)


def _say(args: argparse.Namespace) -> Callable[..., None]:
    """``print``, onto standard error while standard output carries the JSON."""
    out = sys.stderr if args.json == "-" else sys.stdout
    return lambda *message: print(*message, file=out)


def _write_json(args: argparse.Namespace, data: object) -> None:
    if args.json == "-":
        print(json.dumps(data, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        _say(args)(f"wrote {args.json}")


def _demo(args: argparse.Namespace) -> int:
    vision = args.task == "vision"
    batch = args.batch_size or (64 if vision else 16)
    if min(args.epochs, args.steps, batch) < 1:
        raise CliError("--epochs, --steps and --batch-size must be at least 1")
    plot = args.plot or f"torchmesa-demo-{args.task}.png"
    if plot != "none":
        pyplot()  # a missing matplotlib is said before the training, not after

    def task(seed: int) -> demo.Task:
        if vision:
            return demo.vision_task(args.epochs, batch, seed)
        return demo.text_task(args.steps, batch, seed)

    report = demo.run_seeds(task, args.seeds, progress=not args.no_progress)
    say = _say(args)
    say(demo.table(report))
    _write_json(args, report)
    if plot != "none":
        demo.plot(report, plot)
        say(f"wrote {plot}")
    return 0


# -- profile -----------------------------------------------------------------------------------


def _profile(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = torchmesa.Config(
        bits=args.bits, rounding="nearest" if args.bits == 8 else "stochastic"
    )
    workload = sources.resolve(args.model, sources.sizes_from_args(args))
    size = args.batch_size or workload.natural_batch or 8
    try:
        torch.manual_seed(0)
        model, batch = workload.build(), workload.inputs(workload.batch(size))
        rep = torchmesa.report(model, batch, config, label=workload.name)
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise CliError(_too_large(args, err)) from None
    except RuntimeError as err:
        if "memory" in str(err).lower():
            raise CliError(_too_large(args, err)) from None
        raise
    say = _say(args)
    say(f"{workload.name}, batch {rep.batch}, {args.bits}-bit: saved activations of one forward")
    say(rep.table(args.limit))
    _write_json(args, rep.to_json())
    if args.plot:
        rep.plot(args.plot)
        say(f"wrote {args.plot}")
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the flags that shape it, the same for ``profile`` and ``fit``."""
    parser.add_argument("model", help=f"a built-in ({', '.join(sources.names())}), "
                        "hf:CONFIG_CLASS (any transformers configuration), timm:NAME (any "
                        "timm model, no weights) or module.path:factory")  # fmt: skip
    sources.add_size_arguments(parser)


def _too_large(args: argparse.Namespace, err: BaseException) -> str:
    return (
        f"the batch does not fit in memory ({str(err).splitlines()[0][:120]}); try a smaller "
        f"--batch-size (now {args.batch_size}) or --seq-len / --image-size"
    )


# -- fit ---------------------------------------------------------------------------------------


def _fit(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.timed_steps < 0:
        raise CliError(f"--timed-steps must be 0 or more, got {args.timed_steps}")
    shape = sources.sizes_from_args(args)
    workload = sources.resolve(args.model, shape)
    if args.vary not in workload.varies:
        can = ", ".join(sorted(workload.varies)) or "nothing (give the factory a batch_size)"
        raise CliError(f"{workload.name} cannot vary {args.vary}; it can vary: {can}")
    if args.plot:
        pyplot()  # a missing matplotlib is said before minutes of trials, not after
    try:
        budget = fit.parse_memory(args.memory)
        setup = Setup(args.device, args.precision)
        job = fit.Job(args.model, shape, args.vary, args.batch_size, budget, setup)
        fit.check_machine(job)
        with _progress(not args.no_progress) as say:
            found = fit.run(job, tuple(args.configs), say, args.timed_steps)
    except fit.FitError as err:
        raise CliError(str(err)) from None
    say = _say(args)
    say(fit.table(found))
    _write_json(args, found.to_json())
    if args.plot:
        say(f"wrote {fit.plot(found, args.plot)}")
    return 0


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, bool], None]]:
    """A callback that shows each trial: a tqdm bar (the cli extra), plain lines on
    standard error without it, nothing when disabled."""
    if not enabled:
        yield lambda message, trial: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda message, trial: print(f"  {message}", file=sys.stderr, flush=True)
        return
    bar = tqdm(unit="trial", leave=False, bar_format="{desc} [{n_fmt} trials, {elapsed}]")

    def say(message: str, trial: bool) -> None:
        bar.set_description_str(message, refresh=not trial)
        if trial:
            bar.update()

    try:
        yield say
    finally:
        bar.close()


# -- bench -------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from torchmesa.apps import benchmark

    extra = [a for a in args.extra if a != "--"]
    if "--out" in extra:
        raise CliError("bench writes its JSON with --json PATH, before --")
    if args.plot:
        pyplot()  # a missing matplotlib is said before minutes of steps, not after
    with tempfile.TemporaryDirectory() as scratch:
        out = {None: "torchmesa-bench.json", "-": f"{scratch}/bench.json"}.get(args.json, args.json)
        with contextlib.redirect_stdout(sys.stderr if args.json == "-" else sys.stdout):
            benchmark.main(["--out", out, *extra])
        report = json.loads(Path(out).read_text())
    if args.json == "-":
        print(json.dumps(report, indent=1))
    if args.plot:
        _say(args)(f"wrote {benchmark.plot(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
