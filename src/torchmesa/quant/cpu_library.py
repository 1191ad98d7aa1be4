"""The fused CPU kernels' library: built from ``cpu_kernels.c`` on first use, cached, loaded.

``cc`` builds the kernels in about a second into a cache keyed by source, flags and CPU
(see :mod:`torchmesa.quant.cpu` for why C through ``ctypes``). Every exported function
takes one :class:`KernelCall` by pointer: a struct that mirrors ``tm_call`` in the C source
field for field, filled by name, so that no argument can land in another's place; the
library reports the struct's size when it loads and a mismatch refuses to load.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11"]
if platform.machine() in ("x86_64", "AMD64"):
    # GCC keeps to 256-bit vectors on AVX-512 CPUs unless asked; these loops ran 10-20%
    # faster with 512-bit ones (measured: benchmarks/kernel_speed.py). Without AVX-512 under
    # -march=native the flag changes nothing.
    FLAGS.append("-mprefer-vector-width=512")

_i64, _f32, _u32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p


class KernelCall(ctypes.Structure):
    """One kernel call's arguments (``tm_call``); fields not given are 0 or NULL."""

    _fields_ = [
        ("x", _ptr), ("dtype", _i64), ("nd", _i64), ("sizes", _ptr), ("strides", _ptr),
        ("n", _i64),
        ("mid", _i64), ("inner", _i64), ("gs", _i64), ("groups", _i64), ("channels", _i64),
        ("rows_per_block", _i64),
        ("bits", _i64), ("stochastic", _i64), ("seed", _u32), ("codes", _ptr),
        ("shift", _ptr), ("range", _ptr), ("scale_in", _ptr), ("used_shift", _ptr),
        ("used_range", _ptr), ("seen", _ptr), ("decay", _f32), ("value", _f32),
        ("lo", _ptr), ("hi", _ptr), ("scale", _ptr), ("shift_out", _ptr), ("range_out", _ptr),
        ("marked", _ptr), ("seen_out", _ptr), ("info", _ptr),
        ("out", _ptr), ("threads", _i64),
        ("rows", _i64), ("block", _i64), ("rotate", _i64), ("e8m0", _i64), ("signs", _ptr),
        ("block_scales", _ptr), ("ref", _ptr), ("ref_in", _f32),
    ]  # fmt: skip


# what each exported function returns (each takes one ``KernelCall *``)
RETURNS: dict[str, Any] = {
    "tm_minmax": None,
    "tm_quantize": None,
    "tm_quantize_own": _i64,
    "tm_quantize_rows": _i64,
    "tm_quantize_delayed": _i64,
    "tm_quantize_ema": _i64,
    "tm_dequantize": None,
    "tm_scale": None,
    "tm_span_flags": _i64,
    "tm_ema": _i64,
    "tm_two_level": _f32,
    "tm_pack_nonzero": None,
    "tm_unpack_nonzero": None,
    "tm_quantize_blocks": None,
    "tm_dequantize_blocks": None,
}

_lock = threading.Lock()
_lib: Any = None  # the loaded library (or, while timed, a timing proxy of it)
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
    lib.tm_call_size.argtypes, lib.tm_call_size.restype = [], _i64
    if lib.tm_call_size() != ctypes.sizeof(KernelCall):
        raise RuntimeError(
            f"{target} was built with a tm_call of {lib.tm_call_size()} bytes; this "
            f"torchmesa's KernelCall has {ctypes.sizeof(KernelCall)}"
        )
    for name, restype in RETURNS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.POINTER(KernelCall)], restype
    return lib


def load() -> Any:
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


class _Timed:
    """The library with each function's seconds added to ``spent[name]``."""

    def __init__(self, lib: Any, spent: dict[str, float]) -> None:
        self._lib, self._spent = lib, spent

    def __getattr__(self, name: str) -> Any:
        fn, spent = getattr(self._lib, name), self._spent

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return timed


@contextlib.contextmanager
def timed(spent: dict[str, float]) -> Iterator[None]:
    """Inside, every kernel call adds its seconds to ``spent[function name]``: the
    profiling seam of ``benchmarks/step_costs.py``."""
    global _lib
    lib = load()
    if lib is None:
        raise RuntimeError("timed: the fused CPU kernels are not available")
    _lib = _Timed(lib, spent)
    try:
        yield
    finally:
        _lib = lib
