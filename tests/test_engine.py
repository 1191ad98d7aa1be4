"""Engine rules (see NOTE [ Engine rules ] in torchmesa/decide.py), one test per rule."""

import copy
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import Lambda, compare, grad_cosines
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchmesa
from torchmesa import Config
from torchmesa.api import engine_of
from torchmesa.quant import GroupLayout


def tracked(model, *inputs):
    with torchmesa.track() as t:
        out = model(*inputs)
    return t, out


def test_eval_and_no_grad_untouched():
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 64), nn.GELU()))
    x = torch.randn(32, 64, requires_grad=False)
    model.eval()
    t, _ = tracked(model, x)
    assert t.compressed_tensors == 0 and t.exact_bytes == t.stored_bytes > 0
    model.train()
    with torch.no_grad():
        t, _ = tracked(model, x)
    assert t.saved_tensors == 0
    t, _ = tracked(model, x)
    assert t.compressed_tensors == 2


def test_foreign_hooks_win_with_a_warning():
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 64), nn.GELU()))
    x = torch.randn(32, 64)
    warned = pytest.warns(RuntimeWarning, match="another saved-tensor hooks pair")
    with warned, torch.autograd.graph.save_on_cpu():
        model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autograd.graph.save_on_cpu():  # warned once only
            model(x).sum().backward()


def test_checkpoint_recompute_is_left_alone():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    plain = copy.deepcopy(inner)
    torchmesa.compress(inner)
    x = torch.randn(16, 64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="another saved-tensor hooks pair"):
        for m in (inner, plain):
            checkpoint(m, x, use_reentrant=False).square().sum().backward()
    for m in (inner, plain):
        checkpoint(m, x, use_reentrant=True).square().sum().backward()
    for (_, a), (_, b) in zip(inner.named_parameters(), plain.named_parameters(), strict=False):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_inside_compressed_model_is_correct(reentrant):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(64, 64)
            self.a = nn.Sequential(nn.Linear(64, 128), nn.GELU())
            self.b = nn.Linear(128, 64)

        def forward(self, x):
            return self.b(checkpoint(self.a, self.pre(x), use_reentrant=reentrant))

    res = compare(Net(), lambda m: (lambda y: (y, y.square().mean()))(m(torch.randn(32, 64))))
    assert res.forward_equal and res.min_cosine > 0.9999
    model = torchmesa.compress(Net())
    with torchmesa.track() as t:
        model(torch.randn(32, 64)).sum().backward()
    # either checkpoint keeps the block's input with save_for_backward, so torchmesa
    # compresses it, and backward recomputes the block from the dequantized copy
    assert t.compressed_tensors == 3 and "" not in t.by_module
    assert t.by_module["Net"].tensors == 1 and t.held_bytes == 0


class _Checkpointed(nn.Module):
    """A projection, then blocks each run under ``torch.utils.checkpoint``."""

    def __init__(self, blocks: list[nn.Module], width: int, reentrant: bool, sizes=None) -> None:
        super().__init__()
        self.pre = nn.Linear(width, width)
        self.blocks = nn.ModuleList(blocks)
        self.reentrant = reentrant
        self.register_buffer("sizes", sizes)

    def forward(self, x):
        x = self.pre(x)
        if self.sizes is not None:
            x = x * self.sizes
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpoint_input_gets_each_token_its_own_range(reentrant):
    # backward runs the block again from the stored input, so its error reaches every
    # activation inside; a LayerNorm there divides each token by its own size. Tokens of
    # sizes 1e-3 to 1 (a ViT's class token beside its patches) lost the small ones to
    # per-channel ranges: gradients at cosine 0.74 (rule [ Checkpoint inputs ])
    torch.manual_seed(0)
    width = 64
    blocks = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(2)]
    sizes = torch.logspace(-3, 0, 48).reshape(1, 48, 1)

    def run(m):
        y = m(torch.randn(4, 48, width))
        return y, y.square().mean()

    res = compare(_Checkpointed(blocks, width, reentrant, sizes), run)
    assert res.forward_equal and res.min_cosine > 0.9999, (res.worst_param, res.min_cosine)
    model = torchmesa.compress(_Checkpointed(blocks, width, reentrant, sizes))
    with torchmesa.track() as t:
        model(torch.randn(4, 48, width)).sum().backward()
    # each block's input is the one tensor torchmesa stores for it: 8-bit codes
    assert t.by_module["_Checkpointed"].kept["quantized"].tensors == 2


def test_an_image_checkpoint_input_is_kept_16_bit():
    # a convolutional segment run again from 8-bit codes of its input moves every
    # BatchNorm in it (timm ResNet-18 at 128 px: 0.9944; 16-bit: 0.99966)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    model = torchmesa.compress(_Checkpointed(blocks, 8, reentrant=False))
    model.pre = nn.Conv2d(3, 8, 1)
    with torchmesa.track() as t:
        model(torch.randn(4, 3, 16, 16)).sum().backward()
    kept = t.by_module["_Checkpointed"].kept
    half, nbytes = kept["half"], 4 * 8 * 16 * 16 * 4
    assert half.tensors == 1 and half.exact_bytes == nbytes
    assert nbytes // 2 <= half.stored_bytes <= nbytes // 2 + 16


def test_parameters_and_amp_copies_are_not_quantized():
    lin = nn.Linear(64, 64)
    model = torchmesa.compress(nn.Sequential(lin))
    x = torch.randn(64, 64, requires_grad=True) * 1  # an activation, not a leaf
    t, _ = tracked(model, x)
    assert t.compressed_tensors == 1 and t.saved_tensors == 1  # x; the weight is excluded
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t, y = tracked(model, x)
    assert y.dtype == torch.bfloat16
    assert t.compressed_tensors == 1 and t.saved_tensors == 1


def test_bool_masks_pack_to_one_bit():
    def masked(x):
        return torch.where(x > 0, x, torch.zeros_like(x)) * 2

    model = torchmesa.compress(Lambda(masked))
    x = torch.randn(64, 128, requires_grad=True) * 1
    t, _ = tracked(model, x)
    assert t.exact_bytes == 64 * 128  # where() saves only its bool condition
    assert t.stored_bytes == 64 * 128 // 8


def test_small_integer_and_double_tensors_stay_exact():
    idx = torch.randint(0, 32, (2048,))
    model = torchmesa.compress(Lambda(lambda x: x[idx]))
    x = torch.randn(32, 64, requires_grad=True) * 1
    t, _ = tracked(model, x)  # indexing saves only the int64 index
    assert t.compressed_tensors == 0 and t.saved_tensors == 1
    model = torchmesa.compress(nn.GELU(), torchmesa.Config(min_numel=4096))
    t, _ = tracked(model, torch.randn(8, 8, requires_grad=True) * 1)
    assert t.compressed_tensors == 0 and t.saved_tensors == 1
    t, _ = tracked(model, torch.randn(64, 64, requires_grad=True) * 1)
    assert t.compressed_tensors == 1
    t, _ = tracked(model, torch.randn(64, 64, dtype=torch.float64, requires_grad=True) * 1)
    assert t.compressed_tensors == 0


def test_complex_is_kept_exact_with_one_warning():
    model = torchmesa.compress(Lambda(lambda z: (z * z).abs()))
    z = torch.randn(64, 64, dtype=torch.complex64, requires_grad=True) * 1
    with pytest.warns(RuntimeWarning, match="complex saved tensors are kept exact"):
        model(z).sum().backward()


def test_expanded_views_stay_exact():
    def scale(x, bias):
        return x * bias.expand_as(x)  # mul saves both operands; one is a broadcast view

    model = torchmesa.compress(Lambda(scale))
    x = torch.randn(16, 32, 64, requires_grad=True) * 1
    bias = torch.randn(1, 1, 64, requires_grad=True) * 1
    t, _ = tracked(model, x, bias)
    assert t.saved_tensors == 2
    assert t.compressed_tensors == 1  # only the large, dense operand
    assert t.stored_bytes < x.numel() + 64 * 4 + 2 * 64 * 8


def test_a_storage_saved_twice_is_stored_once():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = torchmesa.compress(TwoHeads())
    x = torch.randn(128, 64, requires_grad=True) * 1
    t, _ = tracked(model, x)
    assert t.saved_tensors == 2 and t.compressed_tensors == 1
    assert t.exact_bytes == x.numel() * 4


def test_reused_addresses_are_not_confused():
    # each GELU input is freed once quantized, so the allocator may hand its address to the
    # next one: same shape, same version; dedup must not return the first copy
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(6)])
    res = compare(model, lambda m: (lambda y: (y, y.square().mean()))(m(torch.randn(64, 256))))
    assert res.forward_equal and res.min_cosine > 0.9999


def test_views_inside_a_quantized_tensor_cost_nothing():
    def body(x):
        h = F.gelu(x)  # gelu saves all of x, dense
        return h[..., :64] + x[..., 64:128] * x[..., 128:].transpose(0, 1)  # two strided views

    model = nn.Sequential(nn.Linear(32, 192), Lambda(body))
    res = compare(model, lambda m: (lambda y: (y, y.square().mean()))(m(torch.randn(16, 16, 32))))
    assert res.forward_equal and res.min_cosine > 0.9999
    torchmesa.compress(model)
    t, _ = tracked(model, torch.randn(16, 16, 32))
    assert t.saved_tensors == 4 and t.compressed_tensors == 4
    meta = sum(8 * GroupLayout.of(s, Config().groups).num_groups for s in [(256, 32), (256, 192)])
    assert t.stored_bytes == 16 * 16 * 32 + 16 * 16 * 192 + meta  # nothing for the views


@pytest.mark.parametrize("estimator", ["dynamic", "delayed"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_non_finite_gradients(bad, estimator):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    exact = copy.deepcopy(model)
    torchmesa.compress(model, Config(estimator=estimator))
    model(torch.randn(32, 64))  # a first batch: delayed scaling then uses its estimate
    x = torch.randn(32, 64)
    x[3, 5] = bad
    for m in (exact, model):
        m(x).sum().backward()
    for (name, a), (_, b) in zip(exact.named_parameters(), model.named_parameters(), strict=False):
        assert torch.isfinite(a.grad).all() == torch.isfinite(b.grad).all(), name


def test_estimates_do_not_join_the_graph():
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 64), nn.GELU()))
    for _ in range(3):
        model(torch.randn(32, 64)).sum().backward()
    engine = engine_of(model)
    for site in engine.ranges._sites:
        shift, rng = engine.ranges.state(site)
        assert not shift.requires_grad and not rng.requires_grad


def test_sites_are_stable_across_steps_and_ema_moves():
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)),
        Config(estimator="ema", derive=False),  # every save stored: one site each
    )
    engine = engine_of(model)
    model(torch.randn(32, 64)).sum().backward()
    first = {s: engine.ranges.state(s)[1].clone() for s in engine.ranges._sites}
    model(torch.randn(32, 64) * 3).sum().backward()
    assert set(engine.ranges._sites) == set(first)
    assert set(first) == {("0", 0, 0), ("1", 0, 0), ("2", 0, 0)}
    for site, before in first.items():
        assert not torch.equal(engine.ranges.state(site)[1], before)
    stats = torchmesa.clip_stats(model)
    assert all(s.groups_seen > 0 for s in stats.values())


def test_shared_module_gets_one_site_per_call():
    act = nn.GELU()
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(64, 64), act, nn.Linear(64, 64), act), Config(estimator="ema")
    )
    model(torch.randn(32, 64)).sum().backward()
    sites = set(engine_of(model).ranges._sites)
    assert ("1", 0, 0) in sites and ("1", 1, 0) in sites


def test_stochastic_rounding_leaves_the_model_rng_alone():
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.3), nn.Linear(256, 64))
    cfg = torchmesa.Config(rounding="stochastic")
    res = compare(model, lambda m: (lambda y: (y, y.square().mean()))(m(torch.randn(32, 64))), cfg)
    assert res.forward_equal and res.min_cosine > 0.999


def test_retain_graph_second_backward_gives_same_gradients():
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)))
    loss = model(torch.randn(32, 64)).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    loss.backward()
    for a, p in zip(first, model.parameters(), strict=False):
        assert torch.equal(a, p.grad)


def test_exception_in_forward_leaves_no_hooks_active():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = torchmesa.compress(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(4, 64))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert engine_of(model)._stack() == []


def test_unpacked_tensors_have_the_saved_dtype_under_autocast():
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 64))
    ref = copy.deepcopy(model)
    torchmesa.compress(model)
    x = torch.randn(32, 64)
    for m in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
    cos = grad_cosines(ref, model)
    assert min(c for c, _ in cos.values()) > 0.999


def test_functional_ops_are_compressed_without_modules():
    def attention(q, k, v):
        a = (q @ k.transpose(-1, -2)).softmax(-1)
        return F.gelu(a @ v) + F.scaled_dot_product_attention(q, k, v)

    model = torchmesa.compress(Lambda(attention))
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) * 1 for _ in range(3))
    t, _ = tracked(model, q, k, v)
    assert t.compressed_tensors >= 5 and t.ratio > 3.5


def test_float_dropout_masks_pack_to_one_bit():
    # on the CPU, dropout multiplies by a float mask {0, 1/(1-p)} and saves it
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.25)))
    t, _ = tracked(model, torch.randn(128, 64))
    mask_site = t.by_module["1"]
    assert mask_site.exact_bytes == 128 * 256 * 4
    assert mask_site.stored_bytes == 128 * 256 // 8 + 4  # 1 bit each, plus the value
    res = compare(
        nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.25), nn.Linear(256, 8)),
        lambda m: (lambda y: (y, y.square().mean()))(m(torch.randn(128, 64))),
    )
    assert res.forward_equal and res.min_cosine > 0.9999


def test_two_level_detection_is_exact():
    from torchmesa import quant

    x = (torch.rand(7, 131) > 0.3).float() / 0.7
    value = quant.two_level_value(x)
    assert value is not None
    assert torch.equal(quant.unpack_mask(quant.pack_two_level(x, value)), x)
    assert quant.two_level_value(torch.rand(7, 131)) is None
    assert quant.two_level_value(torch.zeros(7, 131)) is None
    y = x.clone()
    y[0, 0] = 0.5
    assert quant.two_level_value(y) is None


def _attention(q, k, v):
    return (q @ k.transpose(-1, -2)).softmax(-1) @ v


OPS = {
    "Linear": (lambda: nn.Linear(64, 64), (32, 16, 64)),
    # per-token ranges plus LayerNorm's exact mean and rstd cost 16 bytes a row: the ratio
    # is 4C / (C + 16), 3.2 at C = 64 and 3.76 at C = 256
    "LayerNorm": (lambda: nn.LayerNorm(256), (8, 16, 256)),
    "GELU": (nn.GELU, (32, 16, 64)),
    "ReLU": (nn.ReLU, (32, 16, 64)),
    "softmax": (lambda: Lambda(lambda x: x.softmax(-1)), (32, 16, 64)),
    "matmul": (lambda: Lambda(lambda x: x @ x.transpose(-1, -2)), (32, 16, 64)),
    "attention": (lambda: Lambda(lambda x: _attention(x, x * 2, x * 3)), (4, 4, 32, 16)),
    # a fused attention's rows get their own ranges (8 bytes a row), and its log-sum-exp
    # stays exact: at GPT-2's head size (d = 64) the ratio is 3.49
    "sdpa": (lambda: Lambda(lambda x: F.scaled_dot_product_attention(x, x, x)), (4, 4, 32, 64)),
    "Conv2d": (lambda: nn.Conv2d(8, 8, 3, padding=1), (8, 8, 16, 16)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(8), (8, 8, 16, 16)),
    "Dropout": (lambda: nn.Dropout(0.1), (32, 16, 64)),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_float_activation_an_op_saves_is_compressed(name):
    factory, shape = OPS[name]
    saved = []

    def spy(t):
        saved.append(t)
        return t

    module = factory()
    x = torch.randn(shape, requires_grad=True) * 1
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(spy, lambda t: t):
        module(x)
    floats = [
        t
        for t in saved
        if t.is_floating_point()
        and t.numel() >= Config().min_numel
        and t.untyped_storage().data_ptr() not in params
    ]
    assert floats, f"{name} saved no float activation to compress"
    torchmesa.compress(module)
    t, _ = tracked(module, x)
    assert t.compressed_tensors >= len({s.untyped_storage().data_ptr() for s in floats})
    floor = {"BatchNorm2d": 1.9, "sdpa": 3.45}.get(name, 3.5)  # BatchNorm: an fp16 copy
    assert t.ratio > floor, (name, t.ratio)


def test_frozen_weight_copies_under_autocast_stay_exact():
    # LoRA: the frozen base weight's bf16 copy has no autograd history of its own
    base = nn.Linear(128, 128)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    lora = nn.Sequential(nn.Linear(128, 8, bias=False), nn.Linear(8, 128, bias=False))

    class LoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.lora = base, lora

        def forward(self, x):
            return self.base(x) + self.lora(x)

    model = LoRA()
    exact = copy.deepcopy(model)
    torchmesa.compress(model)
    x = torch.randn(64, 128, requires_grad=True) * 1
    with torch.autocast("cpu", dtype=torch.bfloat16), torchmesa.track() as t:
        y = model(x)
    # the frozen layer saves only its weight's bf16 copy (for x's gradient): not an activation
    assert "base" not in t.by_module
    assert t.by_module["lora.0"].tensors == 1  # x, for the trainable LoRA weight
    x2 = x.detach().requires_grad_(True)
    for m in (exact, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x2 * 1)
        out.float().square().mean().backward()
    cos = grad_cosines(exact, model)
    assert min(c for c, _ in cos.values()) > 0.999
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("estimator", ["dynamic", "delayed"])
def test_check_finite_names_the_module(estimator):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    torchmesa.compress(model, Config(check_finite=True, estimator=estimator))
    x = torch.randn(32, 64)
    model(x).sum().backward()  # finite: no complaint
    x[3, 5] = float("inf")
    with pytest.raises(FloatingPointError, match=r"module '0'.*NaN or Inf"):
        model(x)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    model(torch.randn(32, 64)).sum().backward()  # and it trains on afterwards


def test_two_forwards_then_one_backward():
    # contrastive and siamese training: two graphs alive at once, one backward
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 32))

    def run(m):
        a, b = m(torch.randn(64, 64)), m(torch.randn(64, 64) * 2)
        y = torch.cat([a, b])
        return y, (a * b).sum(-1).square().mean()

    # dynamic ranges: the second batch is twice the scale of the first (see the EMA test)
    res = compare(model, run, Config(estimator="dynamic"))
    assert res.forward_equal and res.min_cosine > 0.999
    assert res.held_after_backward == 0


def test_ema_lags_a_jump_in_scale_and_counts_the_clipping():
    # Mesa's running range moves by 1 - λ per batch: a batch at twice the scale of the
    # previous one is clamped to the lagging range, and clip_stats reports it
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8)), Config(estimator="ema")
    )
    model(torch.randn(256, 64)).sum().backward()
    assert sum(s.groups_clipped for s in torchmesa.clip_stats(model).values()) == 0
    model(torch.randn(256, 64) * 2).sum().backward()
    stats = torchmesa.clip_stats(model)[("0", 0, 0)]
    # every group of the second batch clipped: 32 of the 64 group-updates over two batches
    assert (stats.groups_seen, stats.groups_clipped) == (64, 32)


def test_varying_batch_sizes_keep_training_correct():
    # fewer rows merge channel groups, which restarts a site's running range: never a crash
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    exact = copy.deepcopy(model)
    torchmesa.compress(model)
    for rows in (512, 7, 300, 2, 512):
        x = torch.randn(rows, 64)
        for m in (exact, model):
            m.zero_grad()
            m(x).square().mean().backward()
        cos = grad_cosines(exact, model)
        assert min(c for c, _ in cos.values()) > 0.999, rows


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_storage_is_denser_and_still_correct(bits):
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    exact = copy.deepcopy(model)
    ratios = {}
    for b in (8, bits):
        twin = torchmesa.compress(copy.deepcopy(model), Config(bits=b, rounding="stochastic"))
        # an input with history: data would stay exact (rule [ Masks ])
        with torchmesa.track() as t:
            out = twin(torch.randn(128, 64, requires_grad=True) * 1).sum()
        out.backward()
        ratios[b] = t.ratio
        assert t.held_bytes == 0
    assert ratios[bits] > ratios[8] * (8 / bits) * 0.85  # metadata aside, 8/bits denser
    torchmesa.compress(model, Config(bits=bits, rounding="stochastic"))
    x = torch.randn(128, 64)
    for m in (exact, model):
        m(x).square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > (0.9 if bits == 4 else 0.2)


def test_stochastic_rounding_gives_unbiased_weight_gradients_at_two_bits():
    """A linear layer's weight gradient is linear in its saved input, so with unbiased
    rounding the mean over many steps converges to the exact gradient."""
    layer = nn.Linear(64, 32)
    # an input with history, as inside a network (data without it would stay exact, rule [ Masks ])
    x, g = torch.randn(256, 64, requires_grad=True) * 1, torch.randn(256, 32)
    exact = torch.autograd.grad(layer(x), layer.weight, g)[0]
    means = {}
    for rounding in ("nearest", "stochastic"):
        model = torchmesa.compress(copy.deepcopy(layer), Config(bits=2, rounding=rounding))
        grads = [torch.autograd.grad(model(x), model.weight, g)[0] for _ in range(200)]
        means[rounding] = torch.stack(grads).mean(0)
    cos = {
        k: float(F.cosine_similarity(v.flatten(), exact.flatten(), dim=0)) for k, v in means.items()
    }
    assert cos["stochastic"] > 0.995 > cos["nearest"]


def test_a_child_called_directly_is_compressed_too():
    """Lightning's training_step calls self.net(x), never the compressed module itself."""
    outer = nn.Module()
    outer.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    torchmesa.compress(outer, Config(estimator="ema", derive=False))
    t, out = tracked(outer.net, torch.randn(32, 64))
    out.sum().backward()
    assert t.compressed_tensors == 3 and t.held_bytes == 0
    assert engine_of(outer)._stack() == []
    assert {site[0] for site in torchmesa.clip_stats(outer)} == {"net.0", "net.1", "net.2"}
    outer.net.eval()
    t, _ = tracked(outer.net, torch.randn(32, 64))
    assert t.compressed_tensors == 0  # the module that starts the call decides the mode


def test_delayed_scaling_quantizes_with_the_previous_estimate(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    exact = copy.deepcopy(model)
    torchmesa.compress(model, Config(estimator="delayed", derive=False))
    engine = engine_of(model)
    first = torch.randn(128, 64)
    model(first).sum().backward()  # a new site: the batch sets its own range first
    before = {s: engine.ranges.state(s) for s in engine.ranges._sites}
    used = []
    real = torchmesa.quant.running_step

    def spy(t, layout, state, decay, *, delayed, **kwargs):
        assert delayed  # every site was seen: each batch quantizes with the estimate
        used.append((state.shift, state.range))
        return real(t, layout, state, decay, delayed=delayed, **kwargs)

    monkeypatch.setattr(torchmesa.quant, "running_step", spy)
    x = torch.randn(128, 64)
    for m in (exact, model):
        m.zero_grad()
        m(x).square().mean().backward()
    assert len(used) == len(before) == 3
    for shift, rng in used:  # each batch was quantized with an estimate from before it
        assert any(torch.equal(shift, s) and torch.equal(rng, r) for s, r in before.values())
    for site, (_, rng) in before.items():  # and the estimate then moved by the batch
        assert not torch.equal(engine.ranges.state(site)[1], rng)
    cosines = grad_cosines(exact, model)
    assert min(cos for cos, _ in cosines.values()) > 0.999, cosines


def test_time_hooks_adds_pack_and_unpack_seconds_until_stopped():
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)))
    spent: dict[str, float] = {}
    engine_of(model).time_hooks(spent)
    model(torch.randn(32, 64)).sum().backward()
    assert spent.keys() == {"pack", "unpack"} and all(s > 0 for s in spent.values())
    engine_of(model).time_hooks(None)
    before = dict(spent)
    model(torch.randn(32, 64)).sum().backward()
    assert spent == before


# -- rule [ Derived ]: derived tensors ------------------------------------------------------------


class _MLPBlock(nn.Module):
    """LayerNorm -> Linear -> GELU -> dropout -> Linear, with a fused-QKV-style reshape."""

    def __init__(self, d: int = 64, p: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.act, self.drop, self.fc2 = (
            nn.Linear(d, 4 * d),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(4 * d, d),
        )

    def forward(self, x):
        h = self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))
        return x + h.transpose(0, 1).reshape(x.shape[1], -1).t().reshape(x.shape)


def _kept(tracker) -> dict:
    return {k: v.tensors for k, v in tracker.kept().items()}


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_derived_tensors_store_less_and_train_like_exact(p):
    torch.manual_seed(0)
    model = nn.Sequential(_MLPBlock(p=p), _MLPBlock(p=p), nn.Linear(64, 8))
    run = lambda m: (lambda o: (o, o.square().mean()))(m(torch.randn(6, 40, 64)))  # noqa: E731
    stored = compare(copy.deepcopy(model), run, Config(derive=False), seed=3)
    derived = compare(copy.deepcopy(model), run, Config(derive=True), seed=3)
    assert derived.forward_equal and derived.held_after_backward == 0
    assert derived.min_cosine >= 0.999, derived.worst_param
    # the norm and GELU outputs (and a dropout's product) are no longer stored
    assert derived.stored_bytes < 0.8 * stored.stored_bytes


def test_reports_how_each_tensor_is_kept():
    model = torchmesa.compress(_MLPBlock(p=0.2), Config(derive=True))
    t, out = tracked(model, torch.randn(4, 32, 64))
    kept = _kept(t)
    assert kept["derived"] == 2 and kept["quantized"] >= 2 and kept["mask"] == 1
    assert t.kept()["derived"].stored_bytes == 0 and t.kept()["derived"].exact_bytes > 0
    assert t.by_module["fc1"].kept["derived"].tensors == 1  # the norm's output
    assert t.by_module["fc2"].kept["derived"].tensors == 1  # GELU output times dropout mask
    out.sum().backward()


def test_retain_graph_rebuilds_again_and_nothing_outlives_backward(monkeypatch):
    from torchmesa.derive import ModuleCall

    calls = []
    rerun = ModuleCall._rerun

    def counted(self):
        calls.append(self)
        rerun(self)

    monkeypatch.setattr(ModuleCall, "_rerun", counted)
    model = torchmesa.compress(_MLPBlock(), Config(derive=True))
    loss = model(torch.randn(4, 32, 64)).square().sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    runs = len(calls)
    assert runs == 2  # the norm and the GELU, once each
    assert all(not c._ready for c in calls)  # the graph is alive; what was rebuilt is not
    model.zero_grad()
    loss.backward()
    assert len(calls) == 2 * runs
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters(), strict=False))


def test_double_backward_matches_stored():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(32, 16)
    grads = []
    for derive in (False, True):
        model = torchmesa.compress(copy.deepcopy(base), Config(derive=derive, min_numel=0))
        inp = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(inp).sum(), inp, create_graph=True)
        g.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=False):
        assert (a is None) == (b is None)
        assert a is None or F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.999


def test_a_tensor_changed_in_place_after_its_producer_is_stored():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = nn.LayerNorm(64), nn.Linear(64, 64)

        def forward(self, x):
            y = self.norm(x)
            with torch.no_grad():
                y[:, :8] *= 3  # no new history: only the version tells
            return self.lin(y)

    torch.manual_seed(0)
    run = lambda m: (lambda o: (o, o.square().mean()))(m(torch.randn(16, 64)))  # noqa: E731
    result = compare(Net(), run, Config(derive=True, min_numel=0))
    assert result.forward_equal and result.min_cosine >= 0.999, result.worst_param


def test_nothing_is_derived_from_an_input_kept_exact_or_not_stored():
    from torchmesa import Policy, Rule

    model = _MLPBlock()
    policy = Policy(default=Config(derive=True), rules=[Rule(nn.LayerNorm, None)])
    t, out = tracked(torchmesa.compress(model, policy), torch.randn(4, 32, 64))
    assert "derived" not in t.by_module["norm"].kept
    assert "derived" not in t.by_module["fc1"].kept  # the norm's output: stored
    assert t.by_module["fc2"].kept["derived"].tensors == 1  # the GELU's: derived
    out.sum().backward()
    relu = torchmesa.compress(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)))
    t, out = tracked(relu, torch.randn(32, 64))  # ReLU saves its output, not its input
    assert "derived" not in t.kept()


def test_a_batch_norm_input_kept_at_16_bits_is_not_derived_from_codes():
    class Net(nn.Module):  # a BatchNorm after an activation: its input is the GELU's output
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 16, 3), nn.GELU()
            self.bn, self.head = nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(self.bn(self.act(self.conv(x))))

    torch.manual_seed(0)
    t, out = tracked(torchmesa.compress(Net(), Config(derive=True)), torch.randn(4, 3, 24, 24))
    assert t.by_module["bn"].kept["half"].tensors == 1 and "derived" not in t.by_module["bn"].kept
    out.sum().backward()
    base, x = Net(), torch.randn(4, 3, 24, 24)
    grads = []
    for derive in (False, True):  # the same storage either way: gradients bitwise equal
        model = torchmesa.compress(copy.deepcopy(base), Config(derive=derive))
        model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_a_per_channel_scale_keeps_its_input_like_a_batch_norm():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 1, groups=16), nn.BatchNorm2d(16))
    t, out = tracked(torchmesa.compress(model), torch.randn(4, 3, 24, 24))
    assert t.by_module["1"].kept["half"].tensors == 1 and "quantized" not in t.by_module["1"].kept
    assert t.by_module["0"].kept["quantized"].tensors == 1
    out.sum().backward()


def test_a_piecewise_activation_input_is_coded_on_its_side_of_each_kink(monkeypatch):
    from torchmesa.formats import affine

    seen = []
    real = affine.pack_kinked

    def spy(t, decision, *args):
        seen.append(decision.kinks)
        record = real(t, decision, *args)
        restored = record.restore()
        for k in decision.kinks:  # every value restored on the side of each kink it was on
            assert torch.equal(restored > k, t > k) and torch.equal(restored < k, t < k)
        return record

    monkeypatch.setattr(affine, "pack_kinked", spy)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.Hardswish(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 4, 1),
    )  # fmt: skip
    run = lambda m: (lambda o: (o, o.square().mean()))(m(torch.randn(8, 3, 16, 16) * 3))  # noqa: E731
    result = compare(model, run)
    assert seen == [(-3.0, 3.0), (0.0, 6.0)]
    assert result.forward_equal and result.min_cosine >= 0.999, result.worst_param


class FlakyGELU(nn.Module):
    """A 'GELU' that saves one tensor more every call: not a function of its input."""

    calls = 0

    def forward(self, x):
        FlakyGELU.calls += 1
        for _ in range(FlakyGELU.calls):
            x = torch.sin(x)  # saves its input: the first one is the module's
        return x


def test_a_module_that_does_not_run_again_alike_raises_naming_it():
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(64, 64), FlakyGELU(), nn.Linear(64, 1)), Config(derive=True)
    )
    loss = model(torch.randn(32, 64)).sum()
    with pytest.raises(RuntimeError, match=r"running 1 \(FlakyGELU\) again.*derive=False"):
        loss.backward()


def test_keyword_inputs_and_autocast():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = nn.LayerNorm(64), nn.Linear(64, 64)

        def forward(self, x):
            return self.lin(self.norm(input=x))

    run = lambda m: (lambda o: (o, o.float().square().mean()))(m(torch.randn(32, 64)))  # noqa: E731
    for dtype in (None, torch.bfloat16):
        result = compare(Net(), run, Config(derive=True, min_numel=0), autocast=dtype)
        assert result.forward_equal and result.min_cosine >= 0.999
    model = torchmesa.compress(Net(), Config(derive=True, min_numel=0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t, _out = tracked(model, torch.randn(32, 64))
    assert t.by_module["lin"].kept["derived"].tensors == 1  # the bf16 copy of the norm output


def test_a_rebuilt_module_input_is_not_kept_alive():
    model = torchmesa.compress(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 1)))
    hidden = []
    model[1].register_forward_pre_hook(lambda m, args: hidden.append(weakref.ref(args[0])))
    loss = model(torch.randn(32, 64)).sum()
    assert hidden[0]() is None  # the GELU input lives on as its 8-bit copy only
    loss.backward()
