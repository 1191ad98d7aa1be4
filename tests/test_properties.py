"""Property-based checks (hypothesis): the quantizer's bounds and the engine's exactness
hold for random shapes, strides, dtypes, value distributions and small models."""

import copy
import gc

import torch
from helpers import grad_cosines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchmesa
from torchmesa import quant
from torchmesa.config import PerChannelGroup, PerHead, PerTensor, PerToken
from torchmesa.derive import DerivedRecord, ModuleCall
from torchmesa.quant import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRANULARITIES = [
    PerTensor(),
    PerHead(),
    PerToken(),
    PerChannelGroup(group_size=1),
    PerChannelGroup(group_size=3),
    PerChannelGroup(num_groups=2),
]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw):
    """A float tensor of 1-4 dims, maybe transposed or sliced, with a random distribution."""
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "constant", "relu", "wide", "tiny", "two-level"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "constant":
        x = torch.full(shape, float(draw(st.floats(-100, 100))))
    elif kind == "relu":
        x = x.relu()
    elif kind == "wide":
        x = x * 1e3 + 5e2
    elif kind == "tiny":
        x = x * 1e-3
    elif kind == "two-level":
        x = (x > 0).float() * 1.25
    x = x.to(dtype)
    layout_kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout_kind == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif layout_kind == "sliced" and x.shape[-1] > 1:
        x = x[..., ::2]
    return x


@FAST
@given(x=tensors(), granularity=st.sampled_from(GRANULARITIES))
def test_roundtrip_stays_within_a_step(x, granularity):
    layout = reference.GroupLayout.of(x.shape, granularity)
    lo, hi = quant.group_minmax(x, layout)
    scale = reference.scale_of(hi - lo, 8)
    codes = reference.quantize_codes(x, layout, lo, scale, 8)
    back = reference.dequantize_codes(codes, layout, lo, scale, x.dtype)
    assert back.shape == x.shape and back.dtype == x.dtype
    step = layout.broadcast(scale, x.dim())
    slack = torch.maximum(x.float().abs(), back.float().abs()) * (
        torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 1e-6
    )
    err = (back.float() - x.float()).abs()
    # half a step, one step just above a zero minimum (zero stays distinct), plus rounding
    # into the dtype
    assert bool((err <= step * (1 + 1e-5) + slack).all())
    if bool((lo == 0).all()):
        assert torch.equal(back > 0, x > 0)


@st.composite
def small_models(draw):
    """A random stack of the layers Transformers and CNN heads are made of."""
    width = draw(st.sampled_from([16, 48, 64]))
    layers: list[nn.Module] = [nn.Linear(8, width)]
    for _ in range(draw(st.integers(1, 4))):
        layers.append(
            draw(
                st.sampled_from(
                    [
                        nn.GELU(),
                        nn.ReLU(),
                        nn.LayerNorm(width),
                        nn.Dropout(0.2),
                        nn.Linear(width, width),
                        nn.Softmax(dim=-1),
                        nn.Tanh(),
                    ]
                )
            )
        )
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=small_models(), rows=st.integers(64, 300), seed=st.integers(0, 1000))
def test_random_models_train_like_exact(model, rows, seed):
    torch.manual_seed(seed)
    exact = copy.deepcopy(model)
    torchmesa.compress(model, torchmesa.Config(min_numel=256))
    x = torch.randn(rows, 8)
    outs = []
    for m in (exact, model):
        torch.manual_seed(seed)
        y = m(x)
        y.square().mean().backward()
        outs.append(y.detach())
    assert torch.equal(outs[0], outs[1])
    cos = grad_cosines(exact, model)
    assert min(c for c, _ in cos.values()) > 0.999


def test_nothing_compressed_outlives_its_step():
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 32)),
        torchmesa.Config(estimator="ema"),
    )  # the last Linear's input (GELU output times the dropout mask) is derived
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(200):
        loss = model(torch.randn(64, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    del loss
    gc.collect()
    records = (quant.QuantizedTensor, quant.QuantizedView, quant.PackedMask)
    records += (DerivedRecord, ModuleCall)
    live = [o for o in gc.get_objects() if type(o) in records]
    assert live == []
    engine = torchmesa.api.engine_of(model)
    assert engine._stack() == []
    assert len(engine.ranges._sites) == 2  # one per quantizing site, not one per step
