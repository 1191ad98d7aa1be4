"""Kernel throughput: quantize (group statistics + codes) and dequantize, against a plain
copy of the same tensor, for the reference and the fused path of the device.

The floor: quantize reads the activation and writes one byte per element,
dequantize the reverse, so each should cost about what a copy costs. Target: within 2x.
Measured twice: hot (one tensor again and again: it stays in cache) and cold (each call
on the next of copies that together fill 1 GiB, as a training step meets its
activations: from memory), each against a copy measured the same way, in the same
rounds: each ratio is the median of ratios taken within one round.

    python benchmarks/kernel_speed.py                 # CPU: reference vs fused C kernels
    python benchmarks/kernel_speed.py --device cuda   # GPU: reference vs Triton kernels

Block-scaled codes (``PerBlock(32)``, 4 and 3 bits, with and without rotation) are
measured the same way on the MLP and attention tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torchmesa import quant
from torchmesa.config import PerChannelGroup, PerHead, PerToken
from torchmesa.quant import blocks, cpu, cpu_library, reference

# DeiT-S activations at batch 8: an MLP hidden state, attention probabilities, a norm input
SHAPES = {
    "mlp (8, 197, 1536) per channel": ((8, 197, 1536), PerChannelGroup(group_size=1)),
    "attn (8, 6, 197, 197) per head": ((8, 6, 197, 197), PerHead()),
    "norm (8, 197, 384) per token": ((8, 197, 384), PerToken()),
}
TARGET = 2.0


def side_by_side(fns: dict[str, Any], device: str, repeats: int, warm: bool) -> dict[str, float]:
    """Each function's median time as a ratio to the first's (the copy), measured in
    rounds: every round times each function once, in turn, and the ratio is taken within
    the round, so that a machine that speeds up or slows down moves both sides alike.
    With ``warm``, each timed call follows an untimed one of the same function."""

    def once(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # first calls pay one-time costs
        fn()
        fn()
    base, *_ = fns
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        times = {}
        for name, fn in fns.items():
            if warm:
                fn()
            times[name] = once(fn)
        for name, t in times.items():
            per_round[name].append(t / times[base] if name != base else t)
    return {name: statistics.median(v) for name, v in per_round.items()}


def steady_allocator() -> bool:
    """Serve every buffer here from glibc's heap and never hand it back, so that no call
    pays page faults for fresh memory while another reuses warm pages: left to itself,
    glibc maps some 10 MB outputs anew and not others, which moved a copy's time (and
    every ratio to it) by 2x between runs. Returns whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(
            libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):
        return False


def reference_quantize(x, layout):
    lo, hi = reference.group_minmax(x, layout)
    scale = reference.scale_of(hi - lo, 8)
    return reference.quantize_codes(x, layout, lo, scale, 8), lo, scale


def fused_quantize(x, layout):
    """Each group's own range: one pass per token (rows fit a block), else two."""
    return quant.quantize_dynamic(x, layout, bits=8)[0]


def delayed_quantize(x, layout, shift, rng):
    """Delayed scaling: ranges known before the batch, statistics in the same pass."""
    return quant.quantize_delayed(x, layout, shift, rng, bits=8)


def measure(device: str, repeats: int, cold_bytes: int) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (shape, granularity) in SHAPES.items():
            x = torch.randn(shape, device=device).to(dtype)
            layout = reference.GroupLayout.of(x.shape, granularity)
            codes, lo, scale = reference_quantize(x, layout)
            q = fused_quantize(x, layout)
            prior = (lo, scale * 255)  # a running estimate: this batch's own ranges
            copy = lambda: x.clone()  # noqa: E731
            fused = {
                "copy": copy,
                "fused_quantize": lambda: fused_quantize(x, layout),
                "fused_delayed_quantize": lambda: delayed_quantize(x, layout, *prior),
                "fused_dequantize": lambda: quant.dequantize(q),
            }
            plain = {  # its own rounds: its temporaries would evict the fused calls' data
                "copy": copy,
                "ref_quantize": lambda: reference_quantize(x, layout),
                "ref_dequantize": lambda: reference.dequantize_codes(
                    codes, layout, lo, scale, dtype
                ),
            }
            hot = side_by_side(fused, device, repeats, warm=True)
            ref = side_by_side(plain, device, repeats, warm=True)
            ref.pop("copy")
            row = {
                "tensor": name,
                "dtype": str(dtype).removeprefix("torch."),
                "mbytes": x.numel() * x.element_size() / 2**20,
                "copy_ms": hot.pop("copy") * 1e3,
            }
            row |= {f"{key}_vs_copy": ratio for key, ratio in (ref | hot).items()}
            rows.append(row | cold(x, layout, prior, device, repeats, cold_bytes))
    return rows


def cold(x, layout, prior, device: str, repeats: int, cold_bytes: int) -> dict:
    """The fused kernels and a copy, each call on the next of copies of ``x`` that
    together fill ``cold_bytes``, so that every call reads from memory, not a cache."""
    count = max(2, cold_bytes // (x.numel() * x.element_size()))
    xs = [x.clone() for _ in range(count)]
    qs = [fused_quantize(t, layout) for t in xs]

    def cycling(fn, items):
        it = iter(range(1 << 62))
        return lambda: fn(items[next(it) % len(items)])

    cold = side_by_side(
        {
            "copy": cycling(torch.clone, xs),
            "fused_quantize": cycling(lambda t: fused_quantize(t, layout), xs),
            "fused_delayed_quantize": cycling(lambda t: delayed_quantize(t, layout, *prior), xs),
            "fused_dequantize": cycling(quant.dequantize, qs),
        },
        device,
        repeats,
        warm=False,
    )
    return {"copy_cold_ms": cold.pop("copy") * 1e3} | {
        f"{key}_cold_vs_copy": ratio for key, ratio in cold.items()
    }


def measure_masks(device: str, repeats: int) -> list[dict]:
    """1-bit masks, packed and unpacked (a dropout mask on attention probabilities, as
    the CPU's dropout saves it, and a bool mask), against a copy of the mask, hot."""
    rows = []
    keep = torch.rand(8, 6, 197, 197, device=device) > 0.1
    masks = {"dropout mask (8, 6, 197, 197)": keep.float() / 0.9, "bool (8, 6, 197, 197)": keep}
    for name, x in masks.items():
        value = None if x.dtype == torch.bool else quant.two_level_value(x)

        def pack(x=x, value=value):
            return quant.pack_mask(x) if value is None else quant.pack_two_level(x, value)

        packed = pack()
        plain = {"copy": lambda x=x: x.clone(), "pack": pack,
                 "unpack": lambda p=packed: quant.unpack_mask(p)}  # fmt: skip
        got = side_by_side(plain, device, repeats, warm=True)
        rows.append({
            "tensor": name, "dtype": str(x.dtype).removeprefix("torch."),
            "copy_ms": got.pop("copy") * 1e3,
            **{f"{key}_vs_copy": ratio for key, ratio in got.items()},
        })  # fmt: skip
    return rows


# block-scaled codes (PerBlock(32)): the widths and options the planner weighs
BLOCK_SETTINGS = {
    "4-bit fp16": (4, "fp16", False),
    "4-bit fp16 rotated": (4, "fp16", True),
    "4-bit e8m0 rotated": (4, "e8m0", True),
    "3-bit fp16 rotated": (3, "fp16", True),
}


def measure_blocks(device: str, repeats: int, cold_bytes: int) -> list[dict]:
    """Block-scaled quantize and dequantize (fused and reference) against a copy, hot and
    cold, on the MLP hidden state and the attention probabilities."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name in ("mlp (8, 197, 1536) per channel", "attn (8, 6, 197, 197) per head"):
            shape = SHAPES[name][0]
            x = torch.randn(shape, device=device).to(dtype)
            count = max(2, cold_bytes // (x.numel() * x.element_size()))
            xs = [x.clone() for _ in range(count)]
            for setting, (bits, scale, rotate) in BLOCK_SETTINGS.items():
                layout = quant.BlockLayout.of(x.shape, 32, scale, rotate)
                q = quant.quantize_blocks(x, layout, bits=bits)[0]
                qs = [quant.quantize_blocks(t, layout, bits=bits)[0] for t in xs]
                hot = side_by_side({
                    "copy": lambda: x.clone(),
                    "quantize": lambda: quant.quantize_blocks(x, layout, bits=bits),
                    "dequantize": lambda: quant.dequantize(q),
                }, device, repeats, warm=True)  # fmt: skip
                ref = side_by_side({
                    "copy": lambda: x.clone(),
                    "ref_quantize": lambda: blocks.quantize_blocks(x, layout, bits),
                    "ref_dequantize": lambda: blocks.dequantize_blocks(q),
                }, device, max(3, repeats // 3), warm=True)  # fmt: skip
                it = iter(range(1 << 62))
                cold = side_by_side({
                    "copy": lambda: xs[next(it) % count].clone(),
                    "quantize": lambda: quant.quantize_blocks(
                        xs[next(it) % count], layout, bits=bits),
                    "dequantize": lambda: quant.dequantize(qs[next(it) % count]),
                }, device, repeats, warm=False)  # fmt: skip
                rows.append({
                    "tensor": name.split(" per ")[0], "dtype": str(dtype).removeprefix("torch."),
                    "setting": setting, "copy_ms": hot.pop("copy") * 1e3,
                    "bits_per_element": q.nbytes * 8 / x.numel(),
                    **{f"{k}_vs_copy": v for k, v in hot.items()},
                    **{f"{k}_vs_copy": v for k, v in ref.items() if k != "copy"},
                    **{f"{k}_cold_vs_copy": v for k, v in cold.items() if k != "copy"},
                })  # fmt: skip
    return rows


def block_table(rows: list[dict]) -> str:
    lines = [f"{'block-scaled (PerBlock(32))':22} {'dtype':8} {'setting':20} {'bits':>5} "
             f"{'quant/copy':>10} {'deq/copy':>8} {'cold q':>6} {'cold d':>6} "
             f"{'ref q':>6} {'ref d':>6}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['tensor']:22} {r['dtype']:8} {r['setting']:20} {r['bits_per_element']:5.2f} "
            f"{r['quantize_vs_copy']:10.2f} {r['dequantize_vs_copy']:8.2f} "
            f"{r['quantize_cold_vs_copy']:6.2f} {r['dequantize_cold_vs_copy']:6.2f} "
            f"{r['ref_quantize_vs_copy']:6.2f} {r['ref_dequantize_vs_copy']:6.2f}"
        )
    for setting in BLOCK_SETTINGS:
        for dtype in ("float32", "bfloat16"):
            mine = [r for r in rows if r["setting"] == setting and r["dtype"] == dtype]
            worst = max(max(r["quantize_vs_copy"], r["dequantize_vs_copy"]) for r in mine)
            verdict = "met" if worst <= TARGET else "missed"
            lines.append(f"worst {setting} {dtype} / copy (hot): {worst:.2f}x "
                         f"(<= {TARGET}x: {verdict})")  # fmt: skip
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = f"{'tensor':31} {'dtype':8} {'MiB':>5} {'copy ms':>7}  {'quantize / copy':>28}  "
    head += f"{'dequantize / copy':>17}  {'cold: copy ms':>13} {'quant':>5} {'delay':>5} "
    head += f"{'deq':>5}"
    sub = f"{'':55}{'reference':>9} {'fused':>6} {'delayed':>8}  {'reference':>9} {'fused':>6}"
    lines = [head, sub]
    for r in rows:
        lines.append(
            f"{r['tensor']:31} {r['dtype']:8} {r['mbytes']:5.1f} {r['copy_ms']:7.2f}  "
            f"{r['ref_quantize_vs_copy']:13.2f} {r['fused_quantize_vs_copy']:6.2f} "
            f"{r['fused_delayed_quantize_vs_copy']:8.2f}  "
            f"{r['ref_dequantize_vs_copy']:9.2f} {r['fused_dequantize_vs_copy']:6.2f}  "
            f"{r['copy_cold_ms']:13.2f} {r['fused_quantize_cold_vs_copy']:5.2f} "
            f"{r['fused_delayed_quantize_cold_vs_copy']:5.2f} "
            f"{r['fused_dequantize_cold_vs_copy']:5.2f}"
        )
    for kind in ("quantize", "delayed_quantize", "dequantize"):
        for temp in ("", "_cold"):
            worst = max(r[f"fused_{kind}{temp}_vs_copy"] for r in rows)
            verdict = "met" if worst <= TARGET else "missed"
            name = f"{kind}{' (cold)' if temp else ''}"
            lines.append(f"worst fused {name} / copy: {worst:.2f}x (<= {TARGET}x: {verdict})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cold-mib", type=int, default=1024,
                        help="copies cycled through in the cold measurement (default: 1 GiB, "
                        "more than any cache)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args()
    fused = "C kernels" if args.device == "cpu" and cpu.available() else "Triton"
    if args.device == "cpu" and not cpu.available():
        fused = "none (reference)"
    steady = args.device == "cpu" and steady_allocator()
    rows = measure(args.device, args.repeats, args.cold_mib << 20)
    print(table(rows))
    block_rows = measure_blocks(args.device, args.repeats, args.cold_mib << 20)
    print(block_table(block_rows))
    masks = measure_masks(args.device, args.repeats)
    for m in masks:
        print(f"{m['tensor']:31} {m['dtype']:8} copy {m['copy_ms']:.2f} ms, 1-bit pack "
              f"{m['pack_vs_copy']:.2f}x, unpack {m['unpack_vs_copy']:.2f}x of a copy")  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"kernels-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{args.device} ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "command": " ".join(["benchmarks/kernel_speed.py", *sys.argv[1:]]),
        "fused_path": fused,
        "cpu_kernel_build_seconds": cpu_library.BUILD_SECONDS,
        "steady_allocator": steady,
        "definitions": "quantize: each group's own min/max + codes (one pass per token, two "
        "otherwise); delayed: codes from ranges known before, with the batch's min/max in the "
        "same pass; dequantize: codes to the saved dtype; each a median over repeats, as a "
        "ratio to x.clone() of the same tensor; cold: each call on the next of copies filling "
        f"{args.cold_mib} MiB, against a copy measured the same way",
        "target": f"fused quantize and dequantize each <= {TARGET}x a copy",
        "rows": rows,
        "blocks": block_rows,
        "masks": masks,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
