"""Under torch.compile the compression is applied, never silently dropped, in either order."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import grad_cosines
from torch import nn

import torchmesa
from torchmesa.compiled import inlining_available
from torchmesa.decide import ROW_RANGES_FROM_TOKENS
from torchmesa.track import graph_held, graph_saved

pytestmark = pytest.mark.skipif(
    not inlining_available(),
    reason=f"PyTorch {torch.__version__} does not tell inlined hooks their graph node: the "
    "compiled graphs' saves go through the eager hooks (test_compile_fallback.py)",
)


def compile_in_order(model: nn.Module, order: str) -> nn.Module:
    """The compiled model, compressed before or after ``torch.compile`` wrapped it."""
    if order == "compress-then-compile":
        return torch.compile(torchmesa.compress(model))
    compiled = torch.compile(model)
    torchmesa.compress(model)
    return compiled


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))


def compiled_saved(y: torch.Tensor, model: nn.Module) -> tuple[int, int]:
    """What the compiled graphs of ``y``'s forward hold for backward: bytes, code tensors."""
    held = graph_held(y, model.parameters())
    return held.nbytes, held.codes


class Block(nn.Module):
    """A user-defined model (not a torch.nn container), as Dynamo sees most real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = FusedQKVAttention()
        self.norm, self.up, self.down = nn.LayerNorm(64), nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.down(F.gelu(self.up(self.norm(x))))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["compress-then-compile", "compile-then-compress"])
def test_the_compiled_graphs_store_codes_and_train_like_compiled_exact(order):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    exact = copy.deepcopy(model)
    compiled = compile_in_order(model, order)
    x = torch.randn(8, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the graphs hold the hooks
        y = compiled(x)
    y_exact = torch.compile(exact)(x)
    assert torch.equal(y, y_exact)  # forward untouched, bit for bit on this model
    stored, codes = compiled_saved(y, model)
    held, _ = compiled_saved(y_exact, exact)
    assert codes >= 6 and stored < 0.35 * held
    y.square().mean().backward()
    y_exact.square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
def test_fullgraph_compiles_with_no_graph_break_and_steps_do_not_recompile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(torchmesa.compress(Block()), fullgraph=True)
    x = torch.randn(8, 64, 64)
    for _ in range(3):
        y = model(x)
        assert compiled_saved(y, model)[1] > 0
        y.square().mean().backward()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # once: steps 2 and 3 ran it again


@pytest.mark.slow
def _graph_saved_shapes(y: torch.Tensor) -> list[tuple[int, ...]]:
    node = y.grad_fn
    while type(node).__name__ != "CompiledFunctionBackward":
        node = node.next_functions[0][0]
    return [tuple(t.shape) for t in node.saved_tensors]


def test_per_token_ranges_for_what_a_norm_reads_and_a_long_fused_attention_reads():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.compile(torchmesa.compress(Block()), dynamic=False)
    n = ROW_RANGES_FROM_TOKENS
    shapes = _graph_saved_shapes(model(torch.randn(2, n, 64)))
    assert (2 * n, 1) in shapes or (2, n, 1) in shapes  # a norm's input: one range a token
    assert (2, 4, n, 1) in shapes  # q, k, v, (B, H, T, d): one range a row, as eager
    assert (1, 4, 1, 1) not in shapes  # not one a head
    shapes = _graph_saved_shapes(model(torch.randn(2, 64, 64)))  # short rows: a head's range
    assert (1, 4, 1, 1) in shapes and (2, 4, 64, 1) not in shapes


@pytest.mark.slow
def test_what_the_graphs_cannot_store_runs_eagerly_with_one_warning():
    torch._dynamo.reset()
    model = Block()
    exact = copy.deepcopy(model)
    compiled = torch.compile(torchmesa.compress(model, torchmesa.Config(bits=4)))
    x = torch.randn(8, 64, 64)
    warned = pytest.warns(RuntimeWarning, match="outside the compiled graph .*bits=4")
    with warned, torchmesa.track() as t:
        y = compiled(x)
    assert t.compressed_tensors > 0  # the eager hooks stored them, between graphs
    y.square().mean().backward()
    torch.compile(exact)(x).square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.99


class FusedQKVAttention(nn.Module):
    """timm's and nanoGPT's attention: q, k, v are strided slices of one projection."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd) from strided slices
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransposedKeyAttention(FusedQKVAttention):
    """Attention written out by hand: the matmul saves the transposed key."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # (B, H, T, T)
        y = scores.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class HardswishBlock(nn.Module):
    """A MobileNetV3 block's start: a BatchNorm, then a hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.Hardswish()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2, self.out = nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn2(self.dw(self.act(self.bn(self.conv(x))))))


def strided_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "channels-last":
        net = nn.Sequential(
            nn.Conv2d(8, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 8, 3, padding=1)
        )
        net = net.to(memory_format=torch.channels_last)
        x = torch.randn(4, 8, 16, 16).to(memory_format=torch.channels_last)
        return net, x
    attention = FusedQKVAttention() if kind == "fused-qkv" else TransposedKeyAttention()
    return nn.Sequential(attention, nn.Linear(64, 10)), torch.randn(8, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["compress-then-compile", "compile-then-compress"])
@pytest.mark.parametrize("kind", ["fused-qkv", "transposed-key", "channels-last"])
def test_compiled_backward_gets_saved_strides(kind, order):
    """Engine rule [ Strides ]: a compiled backward checks each saved tensor's strides."""
    torch._dynamo.reset()
    model, x = strided_model(kind)
    exact = copy.deepcopy(model)
    compiled = compile_in_order(model, order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo notes the graph break at a Sequential's hooks
        y = compiled(x)
    assert compiled_saved(y, model)[1] > 0
    y.square().mean().backward()
    torch.compile(exact)(x).square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


def _compresses(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a training step of ``model`` stores its activations compressed: codes in
    its compiled graphs' saved tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo notes the graph break at a Sequential's hooks
        y = model(x)
    codes = compiled_saved(y, model)[1]
    y.square().mean().backward()
    return codes > 0


@pytest.mark.slow
def test_compressing_after_a_model_of_the_class_was_compiled_still_compresses():
    """All compiled modules share Dynamo's cache of compiled frames, unguarded on hooks: a
    model compressed after an exact one of its class ran compiled would reuse that frame
    and silently store everything exact. Compressing and decompressing drop the cache."""
    torch._dynamo.reset()
    x = torch.randn(32, 64)
    exact = torch.compile(mlp())
    assert not _compresses(exact, x)
    first = compile_in_order(mlp(), "compress-then-compile")
    assert _compresses(first, x)
    assert _compresses(compile_in_order(mlp(), "compile-then-compress"), x)
    ran_first = torch.compile(mlp())
    assert not _compresses(ran_first, x)
    torchmesa.compress(ran_first)
    assert _compresses(ran_first, x)
    torchmesa.decompress(ran_first)
    assert not _compresses(ran_first, x)
    assert not _compresses(exact, x)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["exact", "compressed"])
def test_an_exact_and_a_compressed_container_of_one_class_alternate_compiled(first):
    """Both stay compiled, each with its own graphs: the compressed one's hold codes, the
    exact one's none. (Before the root's forward ran from torchmesa's frame, an exact
    container run first served its graphs to the compressed one, which stored nothing
    compressed, and after both had run, both ran uncompiled.)"""
    torch._dynamo.reset()
    x = torch.randn(32, 64)
    models = {"exact": torch.compile(mlp())}
    models["compressed"] = compile_in_order(mlp(), "compress-then-compile")
    order = [first, "compressed" if first == "exact" else "exact"]
    for _ in range(3):
        for name in order:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Dynamo notes the graph break at the hooks
                y = models[name](x)
            assert type(y.grad_fn).__name__ == "CompiledFunctionBackward", name
            assert (compiled_saved(y, models[name])[1] > 0) == (name == "compressed")
            y.square().mean().backward()


def test_decompress_gives_a_container_its_own_forward_back():
    model = torchmesa.compress(mlp())
    assert "forward" in vars(model)
    torchmesa.decompress(model)
    assert "forward" not in vars(model)


def test_a_container_whose_forward_was_set_keeps_it():
    model = mlp()
    own = model.forward
    model.forward = own  # an instance forward set by someone else (a wrapper library)
    torchmesa.compress(model)
    assert vars(model)["forward"] is own
    torchmesa.decompress(model)
    assert vars(model)["forward"] is own


@pytest.mark.slow
def test_steps_after_the_first_two_compile_nothing():
    """Dropping Dynamo's cache happens when a model is compressed, never per step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # one model in the process, as in a training script
    model = torch.compile(torchmesa.compress(mlp()))
    x = torch.randn(32, 64)
    for _ in range(2):  # the first step compiles, the second may resume a frame once
        assert _compresses(model, x)
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    for _ in range(3):
        assert _compresses(model, x)
    assert counters["frames"]["total"] == frames
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_a_vit_trains_compiled_like_compiled_exact():
    """Decomposed graphs save a norm's input where no norm op reads it (the partitioner
    recomputes the embedding sum in backward): it still gets per-token ranges."""
    from torchmesa.apps.models import Spec

    torch._dynamo.reset()
    spec = Spec("vit", "vit", dim=96, depth=2, heads=3, image=32, patch=4)
    torch.manual_seed(0)
    model = spec.build()
    exact = copy.deepcopy(model)
    x, target = spec.batch(8)
    y = torch.compile(torchmesa.compress(model))(x)
    y_exact = torch.compile(exact)(x)
    assert torch.equal(y, y_exact)
    node = y.grad_fn
    while type(node).__name__ != "CompiledFunctionBackward":
        node = node.next_functions[0][0]
    saved = node.saved_tensors
    hidden = (8, 65, 96)  # 64 patches and the class token
    per_token = [
        i for i, t in enumerate(saved[:-1])
        if t.dtype == torch.uint8 and tuple(t.shape) == hidden
        and tuple(saved[i + 1].shape) == (*hidden[:-1], 1)
    ]  # fmt: skip
    assert len(per_token) >= 2 * 2 + 1  # each norm's input or normalized value
    F.cross_entropy(y, target).backward()
    F.cross_entropy(y_exact, target).backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
def test_running_ranges_are_eager_only_and_the_graphs_say_so_once():
    torch._dynamo.reset()
    compiled = torch.compile(torchmesa.compress(Block(), torchmesa.Config(estimator="ema")))
    x = torch.randn(8, 64, 64)
    with pytest.warns(RuntimeWarning, match="estimator='ema' keeps running ranges in eager"):
        y = compiled(x)
    assert compiled_saved(y, compiled)[1] > 0  # still quantized in the graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    ["hf-gpt2", "batchnorm-cnn"],  # the CNN: 0.995 while BatchNorm inputs were 8-bit codes
)
def test_library_models_train_compiled_like_compiled_exact(kind):
    """A Hugging Face model (its own graph breaks, dropout) and a BatchNorm CNN."""
    from models import cnn_model, hf_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, run = hf_model("gpt2", "sdpa") if kind == "hf-gpt2" else cnn_model()
    exact = copy.deepcopy(model)
    compiled, compiled_exact = torch.compile(torchmesa.compress(model)), torch.compile(exact)
    torch.manual_seed(1)  # the same dropout masks in both
    out, loss = run(compiled)
    torch.manual_seed(1)
    out_exact, loss_exact = run(compiled_exact)
    assert torch.equal(out, out_exact)
    held, held_exact = compiled_saved(loss, model)[0], compiled_saved(loss_exact, exact)[0]
    assert held < 0.5 * held_exact, (held, held_exact)
    loss.backward()
    loss_exact.backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
def test_a_batch_norm_input_is_held_in_16_bits_in_the_compiled_graph():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    y = torch.compile(torchmesa.compress(model))(torch.randn(4, 3, 32, 32))
    held = [(t.dtype, tuple(t.shape)) for t in graph_saved(y)]
    assert (torch.float16, (4, 16, 32, 32)) in held  # the convolution's output, BN's input
    assert (torch.float32, (4, 16, 32, 32)) not in held
    # ReLU's mask is recomputed in backward from that input (compiled.compile_settings)
    assert (torch.bool, (4, 16, 32, 32)) not in held


@pytest.mark.slow
def test_a_piecewise_activation_input_is_saved_as_codes_that_keep_its_kinks():
    """Compiled, a hardswish's input is saved (not recomputed from the BatchNorm's 16-bit
    input, whose rounding moves values across its kinks) as 8-bit codes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HardswishBlock()
    exact = copy.deepcopy(model)
    x = torch.randn(8, 3, 16, 16) * 3
    y = torch.compile(torchmesa.compress(model))(x)
    y_exact = torch.compile(exact)(x)
    assert torch.equal(y, y_exact)
    held = [(t.dtype, tuple(t.shape)) for t in graph_saved(y)]
    assert held.count((torch.uint8, (8, 16, 16, 16))) == 1  # its input (else recomputed)
    assert (torch.float16, (8, 16, 16, 16)) in held  # the BatchNorm's input
    y.square().mean().backward()
    y_exact.square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
def test_the_partitioner_recomputes_what_eager_derives_in_compressed_calls_only():
    from torch._functorch import config as functorch

    torch._dynamo.reset()
    model = Block()
    exact = copy.deepcopy(model)
    x = torch.randn(8, 64, 64)
    y = torch.compile(torchmesa.compress(model))(x)
    assert functorch.ban_recompute_materialized_backward  # PyTorch's default, after the call
    y_exact = torch.compile(exact)(x)
    hidden = x.numel() * 4  # the MLP's hidden width: GELU's input and its output
    wide = [[t.dtype for t in graph_saved(out) if t.numel() == hidden] for out in (y, y_exact)]
    assert wide == [[torch.uint8], [torch.float32, torch.float32]]  # GELU's output recomputed
    y.sum().backward()
    y_exact.sum().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
@pytest.mark.parametrize("input_grad", [False, True])
def test_the_models_input_is_quantized_as_eager_does_and_parameters_never(input_grad):
    """The input is a graph input, not an intermediate, and an activation: codes, also
    when it requires grad (as the output of an earlier graph does, across a graph break).
    A frozen weight is a static input and stays itself, also in bf16."""
    torch._dynamo.reset()
    model = Block()
    model.up.weight.requires_grad_(False)
    compiled = torch.compile(torchmesa.compress(model))
    x = torch.randn(8, 64, 64, requires_grad=input_grad)
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            saved = graph_saved(compiled(x))
        ptrs = {t.untyped_storage().data_ptr() for t in saved}
        codes = [t for t in saved if t.dtype == torch.uint8 and t.shape == x.shape]
        held_whole = x.untyped_storage().data_ptr() in ptrs
        assert (held_whole, len(codes)) == (False, 1), autocast
        weights = [t for t in saved if t.shape == model.up.weight.shape]
        assert weights and all(t.dtype != torch.uint8 for t in weights)  # never codes
        if not autocast:
            assert model.up.weight.untyped_storage().data_ptr() in ptrs


class Dropped(nn.Module):
    """A dropout between two projections: its mask is saved for backward."""

    def __init__(self, hidden: int, p: float = 0.25) -> None:
        super().__init__()
        self.up, self.down, self.p = nn.Linear(64, hidden), nn.Linear(hidden, 64), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.dropout(F.relu(self.up(x)), self.p))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "hidden", "packed"), [((8, 64), 256, True), ((3, 7), 255, False)]
)
def test_a_dropout_mask_is_held_in_1_bit_in_the_compiled_graph(batch, hidden, packed):
    """Lossless: the compressed model's gradients match compiled exact's on the same seed.
    A mask whose size is not a multiple of 8 stays bool."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Dropped(hidden)
    exact = copy.deepcopy(model)
    x = torch.randn(*batch, 64)
    outs = []
    for m in (torch.compile(torchmesa.compress(model)), torch.compile(exact)):
        torch.manual_seed(1)
        outs.append(m(x))
    masks = [t for t in graph_saved(outs[0]) if t.dtype == torch.bool and t.numel()]
    bits = [t for t in graph_saved(outs[0]) if t.dtype == torch.uint8 and t.dim() == 1]
    size = x[..., 0].numel() * hidden
    if packed:
        assert not masks and [t.numel() for t in bits] == [size // 8]
    else:
        assert [t.numel() for t in masks] == [size] and not bits
    assert torch.equal(outs[0], outs[1])
    for out in outs:
        out.square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "hidden"), [((3, 7), 256), ((3, 7), 255), ((2, 5), 1009)])
def test_narrow_batches_of_awkward_widths_through_relu_train_like_compiled_exact(batch, hidden):
    """Small activations get a few channel groups (at least 512 values a group), which
    rarely divide the width: the graphs make them divide (Inductor's CPU kernels read a
    value broadcast from ragged groups wrong). The partitioner recomputes ReLU from the
    value saved before it, so codes keep each value's sign."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Dropped(hidden, p=0.0)
    exact = copy.deepcopy(model)
    x = torch.randn(*batch, 64)
    outs = [torch.compile(torchmesa.compress(model))(x), torch.compile(exact)(x)]
    for out in outs:
        out.square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


class LongAttention(FusedQKVAttention):
    """One attention layer three ways: written out with a causal mask ("eager", where the
    partitioner keeps the raw scores and recomputes the softmax from them), SDPA with
    dropout (its math path: the probabilities are saved), and SDPA's fused kernel."""

    def __init__(self, kind: str) -> None:
        super().__init__(d=128, heads=2)  # GPT-2's head size, 64
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.kind == "eager":
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        else:
            p = 0.1 if self.kind == "sdpa-dropout" else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eager", "sdpa-dropout", "sdpa-fused"])
def test_compiled_attention_at_1024_tokens_trains_like_compiled_exact(kind):
    # one range per head for probabilities, the scores they are recomputed from, a fused
    # kernel's q, k, v and output, and a softmax's row statistics gave GPT-2 0.80 to 0.9989
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LongAttention(kind)
    exact = copy.deepcopy(model)
    x = torch.randn(1, 1024, 128)
    outs = []
    for m in (torch.compile(torchmesa.compress(model)), torch.compile(exact)):
        torch.manual_seed(1)  # the same dropout draws
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])
    held, held_exact = compiled_saved(outs[0], model)[0], compiled_saved(outs[1], exact)[0]
    # the fused kernel's q, k, v and output in 72 bytes a row of 64 (a range each), and the
    # model's input, whose reshape the graph cannot tell from a weight's, kept
    assert held < (0.45 if kind == "sdpa-fused" else 0.3) * held_exact, (held, held_exact)
    for y in outs:
        y.square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.999


@pytest.mark.slow
def test_torchmesa_compiled_under_an_activation_memory_budget_holds_less_and_trains_alike():
    """AOTAutograd's memory budget (its knapsack over what to recompute) and torchmesa's
    codes compose: what the budget still saves is stored as codes, and backward's
    recomputation runs on their dequantized values."""
    from torch._functorch import config as functorch

    from torchmesa.apps.models import Spec

    spec = Spec("vit", "vit", dim=96, depth=2, heads=3, image=32, patch=4)
    x, target = spec.batch(8)
    held, grads = {}, {}
    for name in ("exact", "torchmesa", "torchmesa under budget"):
        torch._dynamo.reset()  # each its own graphs: the budget is read when compiling
        torch.manual_seed(0)
        model = spec.build()
        if name != "exact":
            torchmesa.compress(model)
        budget = 0.1 if name == "torchmesa under budget" else 1.0
        with functorch.patch(activation_memory_budget=budget):
            y = torch.compile(model)(x)
            held[name] = graph_held(y, model.parameters()).nbytes
            F.cross_entropy(y, target).backward()
        grads[name] = model
    assert held["torchmesa under budget"] < 0.6 * held["torchmesa"] < 0.2 * held["exact"]
    for name in ("torchmesa", "torchmesa under budget"):
        assert min(c for c, _ in grad_cosines(grads["exact"], grads[name]).values()) > 0.999


@pytest.mark.slow
@pytest.mark.parametrize("budget", [1.0, 0.2])
def test_dropout_is_never_drawn_again_in_a_compiled_backward(budget: float):
    """Backward uses forward's dropout masks, also where the partitioner recomputes under
    torchmesa's settings and a memory budget (it drew new seeds there: worst cosine 0.83)."""
    from torch._functorch import config as functorch

    torch.manual_seed(0)
    layers = [nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 256)]
    model = nn.Sequential(*layers, nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 8))
    x = torch.randn(32, 64)
    outputs, grads = {}, {}
    for name in ("exact", "torchmesa"):
        torch._dynamo.reset()
        trained = copy.deepcopy(model)
        if name == "torchmesa":
            torchmesa.compress(trained)
        with functorch.patch(activation_memory_budget=budget if name == "torchmesa" else 1.0):
            torch.manual_seed(1)  # Inductor's seeds: the same masks in both forwards
            y = torch.compile(trained)(x)
            y.square().sum().backward()
        outputs[name], grads[name] = y.detach(), trained
    assert torch.equal(outputs["exact"], outputs["torchmesa"])
    assert min(c for c, _ in grad_cosines(grads["exact"], grads["torchmesa"]).values()) > 0.9999


def _aten_graph(fn, *args) -> torch.fx.Graph:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(*args).graph


def test_a_compiled_graph_keeps_a_normalized_product_and_its_division_exact():
    """Rule [ Normalized products ] on a decomposed graph: the operands of ``q @ kv`` and
    of ``kᵀ @ v`` before it, and the division's, are kept; softmax attention (its
    decomposition divides by a sum of exponentials) and scaled scores keep nothing."""
    from torchmesa.compiled import normalized_values

    def linear(q, k, v):
        out = q @ (k.transpose(-1, -2) @ F.pad(v, (0, 1), value=1.0))
        return out[..., :-1] / (out[..., -1:] + 1e-5)

    def softmax(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / 8.0
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)) @ v

    q, k, v = (torch.rand(2, 4, 16, 8) for _ in range(3))
    graph = _aten_graph(linear, q, k, v)
    kept = normalized_values(graph)
    products = graph.find_nodes(op="call_function", target=torch.ops.aten.bmm.default)
    divisions = graph.find_nodes(op="call_function", target=torch.ops.aten.div.Tensor)
    assert len(products) == 2 and len(divisions) == 1
    assert {a for p in products for a in p.args} | set(divisions[0].args) <= kept
    assert normalized_values(_aten_graph(softmax, q, k, v)) == set()


@pytest.mark.slow
def test_a_linear_attention_trains_compiled_like_compiled_exact():
    """The toy linear attention's gradients were at worst cosine -0.005 compiled."""
    from test_normalized import LinearAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(LinearAttention(), nn.LayerNorm(64), LinearAttention())
    exact = copy.deepcopy(model)
    x = torch.randn(4, 16, 64)
    y = torch.compile(torchmesa.compress(model))(x)
    y_exact = torch.compile(exact)(x)
    assert torch.equal(y, y_exact) and compiled_saved(y, model)[1] > 0
    y.square().mean().backward()
    y_exact.square().mean().backward()
    assert min(c for c, _ in grad_cosines(exact, model).values()) > 0.99
