"""The engine under faults and odd inputs: exceptions, threads, re-compression, empty and
extreme tensors, unusual layouts, and long runs. Exact or clearly refused, never silently
wrong, and nothing left behind."""

import copy
import gc
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import Lambda, grad_cosines
from torch import nn

import torchmesa
from torchmesa import Config, quant
from torchmesa.api import engine_of

RECORDS = (quant.QuantizedTensor, quant.QuantizedView, quant.PackedMask)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 64))


def live_records():
    gc.collect()
    return [o for o in gc.get_objects() if type(o) in RECORDS]


def no_hooks_left(model):
    return (
        torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        and engine_of(model)._stack() == []
    )


def step(model, x):
    model(x).square().mean().backward()


# -- exceptions ----------------------------------------------------------------------------


class MaybeRaise(nn.Module):
    """An MLP whose forward raises after its first layers saved their activations."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.head = nn.Linear(64, 64)

    def forward(self, x, fail=False):
        h = self.body(x)
        if fail:
            raise RuntimeError("out of memory (simulated)")
        return self.head(h)


def test_a_forward_that_raises_leaves_every_estimate_as_it_was():
    model = torchmesa.compress(MaybeRaise(), Config(estimator="ema"))
    engine = engine_of(model)
    step(model, torch.randn(32, 64))
    before = dict(engine.ranges._sites)
    stats = torchmesa.clip_stats(model)
    with pytest.raises(RuntimeError, match="simulated"):
        model(torch.randn(32, 64) * 100, True)
    assert no_hooks_left(model)
    assert engine.ranges._sites == before  # the same state objects, not updated copies
    assert torchmesa.clip_stats(model) == stats
    step(model, torch.randn(32, 64))  # and the next step moves them as usual
    assert all(engine.ranges._sites[s] is not before[s] for s in before)


class RaiseInBackward(torch.autograd.Function):
    armed = True

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if RaiseInBackward.armed:
            raise RuntimeError("backward failed (simulated)")
        return grad


def test_a_backward_that_raises_leaves_nothing_behind():
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), Lambda(RaiseInBackward.apply), nn.Linear(128, 64)
    )
    reference = copy.deepcopy(model)
    torchmesa.compress(model)
    x = torch.randn(32, 64)
    loss = model(x).square().mean()
    with pytest.raises(RuntimeError, match="simulated"):
        loss.backward()
    del loss
    assert live_records() == [] and no_hooks_left(model)
    RaiseInBackward.armed = False
    try:
        model.zero_grad()
        step(model, x)
        step(reference, x)
    finally:
        RaiseInBackward.armed = True
    assert min(c for c, _ in grad_cosines(reference, model).values()) > 0.999
    assert live_records() == []


def test_retain_graph_keeps_records_until_the_graph_goes():
    model = torchmesa.compress(mlp())
    loss = model(torch.randn(32, 64)).square().mean()
    loss.backward(retain_graph=True)
    assert live_records() != []  # the graph still needs them for a second backward
    loss.backward()
    del loss
    assert live_records() == []


# -- compress again, threads -------------------------------------------------------------


def test_decompress_then_compress_again_starts_fresh():
    model = torchmesa.compress(mlp(), Config(estimator="ema"))
    step(model, torch.randn(32, 64))
    assert torchmesa.clip_stats(model)
    torchmesa.decompress(model)
    with torchmesa.track() as t:
        step(model, torch.randn(32, 64))
    assert t.compressed_tensors == 0
    torchmesa.compress(model, Config(estimator="dynamic"))
    with torchmesa.track() as t:
        step(model, torch.randn(32, 64))
    assert t.compressed_tensors > 0 and t.ratio > 2
    assert torchmesa.clip_stats(model) == {}  # the new config's estimator, not the old one


def test_hooks_are_per_thread():
    """While one thread is inside a compressed forward, another thread's saved tensors are
    its own business: no hooks of ours there, exact tensors saved."""
    inside, release = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)

    def wait_twice(h):
        inside.wait()
        release.wait()
        return h

    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 128), Lambda(wait_twice), nn.GELU()))
    seen = {}

    def other_thread():
        inside.wait()  # the compressed forward is paused in its middle now
        try:
            z = torch.randn(64, 64, requires_grad=True) * 1
            e = z.exp()
            seen["hooks"] = torch._C._autograd._top_saved_tensors_default_hooks(False)
            seen["exact"] = torch.equal(e.grad_fn._saved_result, e)
        finally:
            release.wait()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with torchmesa.track() as t:
        out = model(torch.randn(32, 64))
    thread.join()
    out.sum().backward()
    assert seen == {"hooks": None, "exact": True}
    assert t.compressed_tensors == 2


def test_two_threads_in_one_compressed_model_at_once():
    both_inside = threading.Barrier(2, timeout=30)

    def meet(h):
        both_inside.wait()
        return h

    exact = nn.Sequential(nn.Linear(64, 128), Lambda(lambda h: h), nn.GELU(), nn.Linear(128, 8))
    model = copy.deepcopy(exact)
    model[1] = Lambda(meet)
    torchmesa.compress(model)
    inputs = [torch.randn(32, 64), torch.randn(48, 64) * 3]
    results = [None, None]

    def run(i):
        with torchmesa.track() as t:
            out = model(inputs[i])
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        results[i] = (out.detach(), grads, t.compressed_tensors)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for x, (out, grads, compressed) in zip(inputs, results, strict=False):
        ref = exact(x)
        ref_grads = torch.autograd.grad(ref.square().mean(), list(exact.parameters()))
        assert torch.equal(out, ref.detach()) and compressed == 3
        for g, r in zip(grads, ref_grads, strict=False):
            assert F.cosine_similarity(g.flatten(), r.flatten(), dim=0) > 0.999


# -- odd tensors ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_whose_span_overflows_fp32_stay_exact_with_a_warning(dtype):
    big = torch.finfo(dtype).max
    x = torch.randn(64, 64)
    x[0, :2] = torch.tensor([-big, big])
    x = x.to(dtype).requires_grad_()
    w = torch.randn(64, 64, dtype=dtype, requires_grad=True)
    model = torchmesa.compress(Lambda(lambda a, b: (a * 1) * (b * 1)))
    with pytest.warns(RuntimeWarning, match="near the fp32 limit"), torchmesa.track() as t:
        out = model(x, w)
    out.backward(torch.ones_like(out))
    got = w.grad.clone()
    w.grad = None
    torchmesa.decompress(model)
    model(x, w).backward(torch.ones_like(out))
    assert torch.equal(got, w.grad)  # bitwise: stored exact, not NaN, not clamped
    assert t.compressed_tensors == 1  # w's copy is still compressed


def test_a_piecewise_activation_input_whose_span_overflows_fp32_stays_exact_with_a_warning():
    x = torch.randn(64, 64)
    x[0, :2] = torch.tensor([-3e38, 3e38])
    x.requires_grad_()
    model = torchmesa.compress(nn.Sequential(Lambda(lambda a: a * 1), nn.Hardswish()))
    with pytest.warns(RuntimeWarning, match="near the fp32 limit"):
        out = model(x)
    out.backward(torch.ones_like(out))
    got = x.grad.clone()
    x.grad = None
    torchmesa.decompress(model)
    model(x).backward(torch.ones_like(out))
    assert torch.equal(got, x.grad)  # bitwise: stored exact


def test_an_activation_holding_minus_inf_on_purpose_is_kept_exact_with_a_warning():
    # log-space zeros, as CTC's alphas hold: 8-bit codes would restore them as NaN
    x = torch.randn(64, 64, requires_grad=True)
    mask = torch.rand(64, 64) < 0.3
    model = torchmesa.compress(Lambda(lambda a: torch.logsumexp(a.masked_fill(mask, -math.inf), 1)))
    with pytest.warns(RuntimeWarning, match="module 'Lambda' holds NaN or Inf.*kept exact"):
        out = model(x)
    out.sum().backward()
    got, x.grad = x.grad, None
    torchmesa.decompress(model)
    model(x).sum().backward()
    assert torch.equal(got, x.grad)


def test_empty_batches_train_like_exact():
    exact = mlp()
    model = torchmesa.compress(copy.deepcopy(exact))
    for m in (exact, model):
        m(torch.randn(0, 64)).sum().backward()
    for a, b in zip(exact.parameters(), model.parameters(), strict=False):
        assert torch.equal(a.grad, b.grad)


class SavesAs(torch.autograd.Function):
    """Saves a converted copy of its input (a user's op that stores odd layouts)."""

    @staticmethod
    def forward(ctx, x, convert):
        ctx.save_for_backward(convert(x.detach()))
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        assert kept is not None
        return grad * 2, None


def _quantized(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantize_per_tensor
        return torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    "kind,convert",
    [
        ("sparse", lambda x: x.relu().to_sparse()),
        ("float8", lambda x: x.to(torch.float8_e4m3fn)),
        ("quantized", _quantized),
    ],
)
def test_unusual_layouts_stay_exact_with_one_warning(kind, convert):
    model = torchmesa.compress(Lambda(lambda x: SavesAs.apply(x, convert)))
    x = torch.randn(64, 64, requires_grad=True)
    with (
        pytest.warns(
            RuntimeWarning, match=f"{kind} saved tensors are kept exact .* module .Lambda."
        ),
        torchmesa.track() as t,
    ):
        model(x).sum().backward()
    assert t.compressed_tensors == 0 and t.saved_tensors == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(x).sum().backward()  # once only


def test_sparse_matmul_gradients_are_exact():
    dense = torch.randn(64, 64).relu()
    a = dense.to_sparse().requires_grad_()
    b = torch.randn(64, 64, requires_grad=True)
    model = torchmesa.compress(Lambda(lambda s, d: torch.sparse.mm(s * 1.0, d * 1.0)))
    with pytest.warns(RuntimeWarning, match="sparse saved tensors are kept exact"):
        model(a, b).sum().backward()
    got = b.grad.clone()
    b.grad = None
    torch.sparse.mm(a * 1.0, b * 1.0).sum().backward()
    assert torch.equal(got, b.grad)


def test_nested_tensors_stay_exact_with_a_warning():
    parts = [torch.randn(40, 64), torch.randn(30, 64)]
    nested = torch.nested.nested_tensor(parts, requires_grad=True)
    model = torchmesa.compress(Lambda(lambda n: F.gelu(n * 1.0)))
    with pytest.warns(RuntimeWarning, match="nested saved tensors are kept exact"):
        out = model(nested)
    torch.nested.to_padded_tensor(out, 0.0).sum().backward()
    grads = [g for g in nested.grad.unbind()]
    for g, p in zip(grads, parts, strict=False):
        p = p.requires_grad_()
        F.gelu(p).sum().backward()
        assert torch.equal(g, p.grad)


# -- long runs -----------------------------------------------------------------------------


class Block(nn.Module):
    """Attention and MLP with dropout: every kind of record the engine makes."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1))
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, n, c)
        return x + self.out(self.mlp(x))


@pytest.mark.slow
def test_a_thousand_steps_hold_nothing_more_than_the_first():
    torch.manual_seed(0)
    model = torchmesa.compress(nn.Sequential(Block(), Block()), Config(estimator="ema"))
    engine = engine_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    marks = {}
    for i in range(1000):
        x = torch.randn(4, 16, 64)
        with torchmesa.track() as t:
            loss = model(x).square().mean()
        held_after_forward = t.held_bytes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del loss
        assert t.held_bytes == 0
        if i in (99, 999):
            gc.collect()
            marks[i] = (held_after_forward, len(gc.get_objects()), len(engine.ranges._sites))
    assert live_records() == [] and no_hooks_left(model)
    (held_a, objects_a, sites_a), (held_b, objects_b, sites_b) = marks[99], marks[999]
    assert held_a == held_b > 0
    assert sites_a == sites_b
    assert abs(objects_b - objects_a) < 100  # no Python objects pile up step after step


def test_a_deep_copy_is_a_plain_model_with_a_warning():
    model = torchmesa.compress(mlp())
    with pytest.warns(RuntimeWarning, match="deep copy or pickle of a compressed model"):
        twin = copy.deepcopy(model)
    assert not torchmesa.is_compressed(twin)
    with torchmesa.track() as t:
        step(twin, torch.randn(32, 64))
    assert t.compressed_tensors == 0
    torchmesa.compress(twin)
    for m in (model, twin):
        with torchmesa.track() as t:
            step(m, torch.randn(32, 64))
        assert t.compressed_tensors > 0
    assert engine_of(model) is not engine_of(twin)


def test_a_pickled_model_loads_as_a_plain_model():
    import io

    model = torchmesa.compress(mlp())
    buffer = io.BytesIO()
    with pytest.warns(RuntimeWarning, match="deep copy or pickle"):
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(8, 64)
    assert torch.equal(loaded(x), model(x))
    with torchmesa.track() as t:
        step(loaded, x)
    assert t.compressed_tensors == 0


def test_a_torch_that_hides_the_active_hooks_is_refused_by_name(monkeypatch):
    from torchmesa import scope

    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    with pytest.raises(ImportError, match=r"torchmesa needs torch>=2\.8, found"):
        scope._require_readable_hooks()
