"""The kernels' library: one struct by pointer, checked against the C source, and timing."""

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchmesa import PerToken, quant
from torchmesa.quant import cpu_library

pytestmark = pytest.mark.skipif(not cpu_library.available(), reason="no C compiler")


def test_the_call_struct_matches_the_c_source():
    lib = cpu_library.load()
    assert lib.tm_call_size() == ctypes.sizeof(cpu_library.KernelCall)
    exported = {name for name in cpu_library.RETURNS}
    source = cpu_library.SOURCE.read_text()
    for name in exported:
        assert f" {name}(const tm_call *c)" in source, name


def test_every_field_reaches_c_in_its_place():
    # tm_scale reads range, groups and bits and writes scale: nothing else is set
    rng = torch.tensor([255.0, 0.0, 510.0])
    scale = torch.empty(3)
    call = cpu_library.KernelCall(range=rng.data_ptr(), groups=3, bits=8, scale=scale.data_ptr())
    cpu_library.load().tm_scale(call)
    assert torch.equal(scale, quant.reference.scale_of(rng, 8))


def test_timed_adds_each_kernels_seconds():
    spent: dict[str, float] = {}
    x = torch.randn(64, 96)
    layout = quant.GroupLayout.of(x.shape, PerToken())
    with cpu_library.timed(spent):
        quant.dequantize(quant.quantize_dynamic(x, layout, bits=8)[0])
    assert spent.keys() == {"tm_quantize_rows", "tm_dequantize"}
    assert all(s > 0 for s in spent.values())
    assert cpu_library.load().__class__ is not cpu_library._Timed  # restored after


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the flags below are x86's")
def test_the_portable_build_without_avx2_matches_the_reference_too(tmp_path):
    # the block kernels use AVX2 where -march=native has it and lane loops elsewhere (ARM,
    # older x86): build that other path here and run the bit-for-bit block tests on it
    wrapper = tmp_path / "cc"
    used = tmp_path / "used"
    wrapper.write_text(f'#!/bin/sh\ntouch {used}\nexec cc "$@" -mno-avx2 -mno-avx512f -mno-f16c\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CC": str(wrapper), "TORCHMESA_CACHE": str(tmp_path / "cache")}
    tests = Path(__file__).parent / "test_blocks.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests),
           "-k", "cpu_kernels"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert used.exists() and len(list((tmp_path / "cache").glob("cpu_kernels-*.so"))) == 1
