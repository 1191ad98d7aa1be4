"""Fused CPU path: group statistics, quantize and dequantize, one pass each, in C.

Why C through ``ctypes`` and not Inductor or a C++ extension (measured on this project's
2-core machine, torch 2.13): the eager reference makes 6-9 passes per saved tensor. A
``torch.compile``-d quantizer fuses them, but compiles once per dtype, layout and bit
width (seconds each, in the middle of a user's first steps) and nests Dynamo inside the
saved-tensor hooks of a model that may itself be compiled. A C++ extension compiles the
torch headers (about a minute). The kernels here need no torch headers: ``cc`` builds
them in about a second on first use, into a cache keyed by source, flags and CPU, and
they run on torch's own OpenMP runtime (the library resolves ``libgomp.so.1`` to the copy
torch loaded). Without a C compiler, or with ``TORCHMESA_CPU_KERNELS=0``, the reference
serves every call: slower, never different.

Codes are dense and follow the input's memory order, so a transposed key or a
channels-last feature map keeps its layout; inputs that are not dense (q, k and v sliced
from one projection) are read through their strides, without a copy.
Results equal the reference bit for bit for nearest rounding. Stochastic rounding draws
its noise from a counter-based hash seeded from the engine's generator: the same
distribution as the reference's ``torch.rand``, not the same stream.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from torchmesa.quant.params import geometry, per_param, to_groups
from torchmesa.quant.reference import GroupLayout
from torchmesa.tensors import is_dense

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11"]
if platform.machine() in ("x86_64", "AMD64"):
    # GCC keeps to 256-bit vectors on AVX-512 CPUs unless asked; these loops ran 10-20%
    # faster with 512-bit ones (measured: benchmarks/kernels.py). Without AVX-512 under
    # -march=native the flag changes nothing.
    FLAGS.append("-mprefer-vector-width=512")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BLOCK = 4096  # the kernels' work unit (cpu_kernels.c)
MAX_DIMS = 8  # dims longer than 1 that a strided view may have (cpu_kernels.c)
_PARALLEL_MIN = 1 << 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
BUILD_SECONDS: float | None = None  # what loading cost this process (0.0 when cached)


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    """Where built kernels live: ``$TORCHMESA_CACHE``, else ``~/.cache/torchmesa``."""
    root = os.environ.get("TORCHMESA_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torchmesa"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: concurrent processes (torchrun) never see
        # a half-written library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *FLAGS, "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    i64, i32, u32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p
    view = [i32, ptr, ptr]  # a strided view: dims, sizes, strides (0, NULL, NULL: dense)
    lib.tm_runs_minmax.argtypes = [ptr, i32, *view, i64, i64, i64, ptr, ptr, i32]
    lib.tm_cols_minmax.argtypes = [ptr, i32, *view, i64, i64, ptr, ptr, ptr, i32]
    lib.tm_quantize.argtypes = [
        ptr, i32, *view, i64, i64, i64, ptr, ptr, i32, i32, u32, ptr, ptr, ptr, ptr, i32
    ]  # fmt: skip
    lib.tm_dequantize.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32, ptr, i32]
    for fn in (lib.tm_runs_minmax, lib.tm_cols_minmax, lib.tm_quantize, lib.tm_dequantize):
        fn.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The kernels, built on first use; None when disabled or when no compiler works
    (then a one-time warning says why and the reference serves every call)."""
    global _lib, _tried, BUILD_SECONDS
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("TORCHMESA_CPU_KERNELS", "1") != "0":
                start = time.perf_counter()
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as err:
                    warnings.warn(
                        "torchmesa: the fused CPU kernels could not be built, so the slower "
                        f"reference quantizer runs instead ({err}). Install a C compiler "
                        "(cc) with OpenMP, or set TORCHMESA_CPU_KERNELS=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                BUILD_SECONDS = time.perf_counter() - start
            _tried = True
    return _lib


def available() -> bool:
    """Whether the fused CPU kernels serve calls in this process."""
    return load() is not None


class _Plan:
    """How one tensor meets the kernels: the codes' dense strides, the parameter index of
    each code (``(i // inner) % mid``) and, when the input is not dense in that order,
    the strided view the kernels read it through."""

    __slots__ = ("codes_stride", "mid", "inner", "nd", "sizes", "strides")

    def __init__(self, shape: torch.Size, stride: tuple[int, ...], layout: GroupLayout,
                 logical: bool) -> None:  # fmt: skip
        dims = [d for d in range(len(shape)) if shape[d] != 1]
        # codes follow the input's memory order (a transposed key stays transposed), or
        # logical order where packing or per-row groups need it
        order = dims if logical else sorted(dims, key=lambda d: -stride[d])
        codes_stride, step = [1] * len(shape), 1
        for d in reversed(order):
            codes_stride[d] = step
            step *= shape[d]
        self.codes_stride = tuple(codes_stride)
        if all(stride[d] == codes_stride[d] for d in order):
            self.nd, self.sizes, self.strides = 0, None, None
        else:
            self.nd = len(order)
            self.sizes = (ctypes.c_int64 * self.nd)(*(shape[d] for d in order))
            self.strides = (ctypes.c_int64 * self.nd)(*(stride[d] for d in order))
        self.mid, self.inner = geometry(shape, order, layout, step)


def _threads(numel: int) -> int:
    """Threads for a call: one for small tensors, where waking a team costs more than it
    saves (measured: a call on a (4, 64) tensor took about 40 us with a team of two)."""
    return 1 if numel < _PARALLEL_MIN else torch.get_num_threads()


def supports(x: torch.Tensor) -> bool:
    """Whether the fused path serves ``x``: a CPU tensor of fp32/bf16/fp16 with at most
    ``MAX_DIMS`` dims longer than 1, any strides."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.numel() == 0:
        return False
    return sum(n != 1 for n in x.shape) <= MAX_DIMS and available()


def _plan(x: torch.Tensor, layout: GroupLayout, bits: int) -> _Plan:
    return _cached_plan(x.shape, x.stride(), layout, bits != 8 or layout.kind == "rows")


@functools.lru_cache(maxsize=1024)
def _cached_plan(shape: torch.Size, stride: tuple[int, ...], layout: GroupLayout,
                 logical: bool) -> _Plan:  # fmt: skip
    """Plans are pure functions of shape, strides and layout, which repeat every step."""
    return _Plan(shape, stride, layout, logical)


def supports_codes(codes: torch.Tensor, bits: int) -> bool:
    """Whether the fused path dequantizes these codes (any that it wrote, dense ones)."""
    return codes.device.type == "cpu" and (bits != 8 or is_dense(codes)) and available()


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def group_minmax(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max as fp32 ``(G,)``, NaN where a group holds NaN: one read."""
    lib = load()
    assert lib is not None
    plan = _plan(x, layout, 8)
    mid, inner, view = plan.mid, plan.inner, (plan.nd, plan.sizes, plan.strides)
    n, threads = x.numel(), _threads(x.numel())
    if inner == 1:  # one parameter per element of a row: reduce columns
        lo = torch.empty(mid)
        hi = torch.empty(mid)
        part = torch.empty(threads * 3 * mid)
        lib.tm_cols_minmax(
            x.data_ptr(), DTYPES[x.dtype], *view, n // mid, mid, lo.data_ptr(), hi.data_ptr(),
            part.data_ptr(), threads,
        )  # fmt: skip
    else:
        length = inner
        if mid == 1:  # one group: split the tensor so that every thread reduces a share
            length = max(_BLOCK, -(-n // (8 * threads)))
        runs = -(-n // length)
        lo = torch.empty(runs)
        hi = torch.empty(runs)
        lib.tm_runs_minmax(
            x.data_ptr(), DTYPES[x.dtype], *view, n, length, runs, lo.data_ptr(), hi.data_ptr(),
            threads,
        )  # fmt: skip
        if runs != mid:  # several runs a parameter: torch's reductions keep NaN, as ours do
            lo, hi = lo.view(-1, mid).amin(dim=0), hi.view(-1, mid).amax(dim=0)
    return to_groups(lo, hi, layout)


def quantize_codes(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    seed: int | None = None,
) -> torch.Tensor:
    """Codes as the reference computes them; 8-bit codes keep ``x``'s strides, narrower
    ones are packed flat in logical order. ``seed`` set: stochastic rounding."""
    return _quantize(x, layout, shift, scale, bits, seed, stats=False)[0]


def quantize_codes_and_minmax(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Delayed scaling in one pass: the codes of :func:`quantize_codes` under ranges known
    before the batch, and the batch's own per-group min and max (as :func:`group_minmax`)."""
    codes, lo, hi = _quantize(x, layout, shift, scale, bits, seed, stats=True)
    assert lo is not None and hi is not None
    return codes, lo, hi


def _quantize(
    x: torch.Tensor,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    seed: int | None,
    stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    lib = load()
    assert lib is not None
    plan = _plan(x, layout, bits)
    n, threads = x.numel(), _threads(x.numel())
    if bits == 8:
        out = torch.empty_strided(x.shape, plan.codes_stride, dtype=torch.uint8)
    else:
        out = torch.empty(-(-n * bits // 8), dtype=torch.uint8)
    shift_m = per_param(shift, layout)
    inv_m = per_param(scale.reciprocal(), layout)
    part = lo = hi = None
    if stats:  # scratch per thread: min, max and NaN flag of each parameter index
        part = torch.empty(threads * 3 * plan.mid)
        lo, hi = torch.empty(plan.mid), torch.empty(plan.mid)
    lib.tm_quantize(
        x.data_ptr(), DTYPES[x.dtype], plan.nd, plan.sizes, plan.strides, n, plan.mid,
        plan.inner, shift_m.data_ptr(), inv_m.data_ptr(), bits, seed is not None,
        0 if seed is None else seed, out.data_ptr(), _ptr(part), _ptr(lo), _ptr(hi), threads,
    )  # fmt: skip
    if lo is None or hi is None:
        return out, None, None
    return (out, *to_groups(lo, hi, layout))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dequantize_codes(
    codes: torch.Tensor,
    shape: torch.Size,
    layout: GroupLayout,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``code * scale + shift`` in fp32, returned in ``dtype`` with the codes' strides
    (8 bits) or contiguous (packed codes)."""
    lib = load()
    assert lib is not None
    stride = codes.stride() if bits == 8 else _contiguous_stride(shape)
    plan = _cached_plan(shape, stride, layout, bits != 8)
    mid, inner = plan.mid, plan.inner
    out = torch.empty_strided(shape, stride, dtype=dtype)
    shift_m, scale_m = per_param(shift, layout), per_param(scale, layout)
    lib.tm_dequantize(
        codes.data_ptr(), bits, out.numel(), mid, inner, shift_m.data_ptr(), scale_m.data_ptr(),
        DTYPES[dtype], out.data_ptr(), _threads(out.numel()),
    )  # fmt: skip
    return out
