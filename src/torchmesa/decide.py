"""Decide: how one saved tensor is kept, from the tensor and where it was saved.

:func:`decide` is a pure function: it reads the tensor (metadata, and for a float tensor
without history its values, rule [ Masks ]) and the config of the module that saved it, and
returns a *decision*: keep it exact, pack it to a 1-bit mask, or quantize it with a group
layout. It changes nothing and remembers nothing; the engine hands the decision to the
storage format registered for its type (:mod:`torchmesa.formats`).

NOTE [ Engine rules ]
  [ Scope ] Hooks are active while a module of the compressed tree runs, from the outermost
    one entered (the root, or a child called directly, as Lightning's ``training_step``
    calls ``self.net``), when that module is in training mode with grad enabled, and not
    inside a backward pass (checkpoint recomputes forward there).
  [ Other hooks ] The innermost pair wins. If another saved-tensor hooks pair (non-reentrant
    checkpoint, ``save_on_cpu``) is already active when the root starts, its rule applies to
    the whole call and we step aside, with a one-time warning. ``track()``'s pair is ours.
  [ Parameters ] Parameters and buffers (by storage), their views and AMP copies, and leaf
    tensors that require grad are returned as they are and not counted as activations. A
    frozen parameter's autocast copy carries no autograd history, so under autocast a saved
    tensor without history shaped like a frozen parameter (or its transpose) counts as that
    copy (LoRA's base weights): a false match only keeps a tensor exact.
  [ Checkpoint inputs ] A tensor ``torch.utils.checkpoint`` keeps to run its function again
    (the segment's input, saved through our hooks since they are active around it) is
    where backward's rerun of the whole segment starts, so its error reaches every
    activation in it and every norm there: a sequence's (3 dims or fewer) gets 8-bit codes
    with each row's own range (per token, as a LayerNorm's input: per-channel ranges left
    a DeiT-Ti's first block at cosine 0.988, its class token and patches differ in size),
    an image's (4+ dims) a 16-bit copy like a BatchNorm input (timm ResNet-18 at 128 px:
    0.9944 with 8-bit codes, 0.99966 with 16 bits). Recognised by checkpoint's own code
    calling the hook.
  [ Normalized products ] A product (``matmul``, ``@``, ``bmm``, ``einsum``) whose output a
    division then divides by a product's output (linear attention's ``q @ kv`` over its
    normalizer, a sum as small as its ``eps``) keeps what it saved exact, and the
    division its own: the gradient of ``q`` is a difference of two terms over that
    normalizer, which cancel, and 8-bit codes of those saves left timm's EfficientViT-B0
    at cosine 0.885 (64 px). The product's saves are packed before the division exists,
    so their records are told afterwards to give back the tensors themselves, which the
    capture holds while only layout steps, additions, sums and casts follow the product.
    Their codes stay held too. Compiled graphs find the same values in the graph
    (:func:`torchmesa.compiled.normalized_values`), with the products those multiply
    (``kᵀ @ v`` in ``q @ kv``): compiled EfficientViT-B0 held 0.9990 without them.
  [ Masks ] Bool tensors (dropout and attention masks) are packed to 1 bit, losslessly; so
    is a float tensor with no autograd history whose entries are all 0 or one other value
    (the CPU's dropout mask ``{0, 1/(1-p)}``, an additive attention mask ``{0, -inf}``),
    with that value beside it. Below 8 bits, any other float tensor without autograd history
    stays exact: an op's statistics (a fused attention's log-sum-exp, a norm's mean and
    rstd), which backward multiplies or exponentiates, or data the model was given. A
    reduction of an activation, it is small beside it (1/head-dim of the keys for the
    log-sum-exp); at 4 bits its error dominated the character GPT's gradient error (0.27 ->
    0.16 kept exact), at 8 bits it is below the rest (0.0146 -> 0.0129), so there it is
    stored as before.
  [ Quantized ] fp32/bf16/fp16 tensors with at least ``min_numel`` elements are quantized
    with the module's config: per token inside LayerNorm-like layers, head-wise when they
    have 4+ dims, channel groups otherwise; per-token ranges are always the batch's own.
    Inside ``scaled_dot_product_attention`` (its fused kernels save q, k, v and the output,
    and recompute the probabilities from q and k against an exact log-sum-exp) the
    log-sum-exp stays exact, and from ``ROW_RANGES_FROM_TOKENS`` tokens on every row of one
    token gets its own range: one range per head loses late rows at long context. Attention
    probabilities (a softmax's output, a view, cast or dropped copy of it) not rebuilt by
    rule [ Probabilities ] are stored as 8-bit codes of their logarithm relative to their
    row's maximum: one linear range per head rounds most of them to zero at long context,
    where they are ``1/s`` in size (``PerBlock`` configs keep their blocks). Inside
    BatchNorm and InstanceNorm layers they are a 16-bit float copy instead
    (``Config.batch_norm``): their weight gradient is a sum over batch and image that
    cancels to a small value, and 8-bit codes of the input left it 7 % off (EfficientNet-B0;
    fp16: 2.3 %); so is the input of a depthwise 1x1 convolution, a per-channel scale whose
    gradient cancels the same way (:func:`module_norm_kind`). A piecewise activation
    module's input (hardswish, hardsigmoid, ReLU6, hardtanh: :func:`module_kinks`) gets the
    batch's own ranges, moved so that each kink lies halfway between two codes, rounded to
    nearest: a value moved across a kink would get the other piece's derivative, a jump of
    0.5 or more where a BatchNorm weight before it needs its sum exact (MobileNetV3:
    0.9986 from two values of 122,880, in 16-bit copies). With ``groups=PerBlock(n)``
    every such tensor is stored in blocks of ``n`` along its last dim, each with its own
    step (block-scaled codes, optionally rotated).
    Others stay exact: integers, fp64, small ones; sparse, nested, complex, quantized and
    float8 tensors and tensor subclasses (warned once per kind). An exact tensor that is a
    small view of a larger storage (the CLS token of a hidden state) is kept as a compact
    copy, so it does not hold the whole storage alive.
  [ Savings only ] Only what saves memory is stored: a tensor whose storage is smaller than
    its compressed copy (an expanded mask, say) stays exact.
  [ Stored once ] A tensor saved twice in one forward (same storage, view and version) is
    stored once, and only while the first tensor is alive: a freed address may be reused. A
    view that lies inside an earlier quantized dense tensor of the same storage and version
    (softmax saves ``(B, H, N, N)``, the next matmul ``(B·H, N, N)``) is stored as a view of
    that copy, at no cost.
  [ Non-finite ] A tensor to quantize that holds NaN or Inf is kept exact, with one warning
    naming the module: codes cannot hold ``-inf``, which models use on purpose (log-space
    zeros: CTC's alphas, found by the zoo's wav2vec2, whose gradients came back NaN). With
    ``Config(check_finite=True)`` it raises instead. Estimates skip such groups. fp16
    tensors on CUDA are not looked at (it costs a device sync; fp16 ranges never overflow):
    there a non-finite group dequantizes to NaN (see quant.reference). A tensor whose finite
    values span more than fp32 can hold (|x| near 3.4e38: fp32 or bf16) cannot be quantized
    in fp32 arithmetic and stays exact, with a one-time warning.
  [ No grad ] Pack runs under ``no_grad``: nothing it computes joins the graph.
  [ Strides ] A compiled backward asserts the size and strides of each saved tensor it reads
    (Inductor's ``assert_size_stride``), while a restored copy is laid out densely. So a
    saved tensor that is not contiguous (the q/k/v slices of a fused projection, a
    transposed key, a channels-last map) keeps its strides in its record, and a compiled
    backward gets it back with those strides; an eager one gets the dense copy.
  [ Compiled frames ] All ``torch.compile``-d modules share one cache of compiled frames,
    and Dynamo does not guard on module hooks by default: compressing or decompressing a
    model drops that cache, so that no model runs a frame compiled without (or with)
    torchmesa's hooks. Each compiled module then compiles once more on its next call.
  [ Derived ] Derive, don't store (``Config(derive=True)``, eager forwards). A norm or
    activation module (:func:`torchmesa.derive.recognise.is_derivable`: a deterministic leaf) whose
    input it saves is the *anchor*: its other saves, and its output where later ops save it,
    are rebuilt in backward by running its ``forward`` again on the restored input, under
    the autocast state of the call, once for all of them, and matched by their order (a
    rerun that saves other tensors raises, naming the module). A layout copy of a stored or
    derived tensor (view, reshape, transpose, permute, clone, at most one cast), and a
    product of two (a dropout's input times its stored mask; SwiGLU), is rebuilt from them,
    found through the saved tensor's autograd history; anything else on the way is stored. A
    known tensor changed in place (its version moved) is not derived from. What is rebuilt
    is dropped after its last use and at the end of the backward pass that rebuilt it; a
    second backward (``retain_graph``) rebuilds it again. Masks, tensors kept exact and
    16-bit BatchNorm inputs stay as they are: a rebuild from 8-bit codes would lose the
    precision they are kept at.

  [ Compiled graphs ] (PyTorch 2.13+; 2.8 does not tell the hooks their graph node, so there
    the eager hooks run, with one warning). Under ``torch.compile``, the root's hooks run
    outside Dynamo (before and after the compiled forward) and make
    :class:`torchmesa.compiled.GraphHooks` ambient: graph-module hooks that AOTAutograd
    inlines into the compiled forward and backward, so Inductor fuses the quantization and
    no graph breaks at torchmesa. Each saved intermediate is decided at trace time by rules
    [ Quantized ] and [ Savings only ] (rule [ Masks ] does not apply: no tensor in a graph
    has history) with each batch's ranges: per token where a normalization op reads it, per
    head for 4+ dims, per channel otherwise; parameters (and their casts) stay exact, other
    graph inputs are activations; a value backward compares with constants other than
    zero gets codes that keep its side of each (a piecewise activation's kinks), and a
    piecewise activation module's input is saved rather than recomputed
    (:func:`torchmesa.compiled.keep_kinked_inputs`). Module hooks traced into the graph do
    nothing. A config
    the graphs cannot store (below 8 bits, ``PerBlock``, stochastic rounding,
    ``check_finite``, different configs per module) or an older PyTorch warns once, and the
    eager hooks store what the compiled graphs save, in Python at run time.

  [ Probabilities ] Attention probabilities are rebuilt, not stored
    (``Config(derive=True)``, eager forwards). A softmax over the last dim (or a
    soft-capping ``tanh`` before it) whose input is a short chain of known steps (views,
    casts, a scalar scale, an added mask or bias, ``where`` and ``masked_fill``) over a
    product ``bmm``/``mm``/``baddbmm`` of two stored activations with an inner dim of at
    most 512, saves nothing: backward runs the product again on the stored operands, replays
    the chain and the softmax, once for all its readers (the softmax's backward, a dropout
    product, a cast), and drops the result after the last of them and at the end of the
    backward pass. What the chain adds that autograd does not keep is recorded during the
    compressed forward by a pass-through ``TorchFunctionMode``
    (:class:`torchmesa.derive.scores.Capture`; inside ``scaled_dot_product_attention``'s math path,
    from the call's arguments) and stored losslessly (a mask in 1 bit, a bias as it is, once
    per forward); if that costs more than storing the probabilities, or an operand changed
    in place before the softmax, or any other op is on the way, the probabilities are stored
    (rule [ Quantized ]). An operand kept exact that changed in place after forward makes
    backward raise, as PyTorch does for the tensors it saves itself.

[ Parameters ], [ Masks ], [ Quantized ] and [ Savings only ] are decided here
(:func:`is_activation`, :func:`decide`, :func:`decide_operand`); [ Scope ],
[ Other hooks ], [ Checkpoint inputs ], [ Normalized products ] (with
:mod:`torchmesa.normalized`), [ Stored once ], [ No grad ], [ Compiled frames ],
[ Derived ] and [ Probabilities ] are the engine's (the last two with :mod:`torchmesa.derive` and
:mod:`torchmesa.derive.scores`); [ Non-finite ] is the quantizing format's (it needs the ranges);
[ Strides ] is every record's (:class:`torchmesa.formats.Record`); [ Compiled graphs ] is
the engine's with :mod:`torchmesa.compiled`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from torchmesa import quant
from torchmesa.config import (
    Config,
    Estimator,
    Granularity,
    NormKind,
    PerBlock,
    PerHead,
    Rounding,
    norm_kind,
)
from torchmesa.tensors import is_parameter_like, is_probabilities, storage_nbytes

METADATA_BYTES_PER_GROUP = 8  # a group's shift and scale, fp32 each
# Inside a fused attention, q, k, v and the output get a range per row (one token of one
# head) from this many tokens on. A causal row averages over as many values as its
# position, so its size falls with the position, and one range per head leaves late rows
# few steps; below it a range per head holds, and ranges per row of 64 values would add
# 1/8 to those tensors (measured: docs/attention.md, "Ranges inside a fused kernel").
ROW_RANGES_FROM_TOKENS = 256


@dataclass(frozen=True)
class Exact:
    """Keep the tensor as it is (a compact copy if it views a larger storage, rule [ Quantized ]).

    ``unsupported`` names a kind of tensor never compressed (a subclass, ``"sparse"``,
    ``"float8"``...), which the engine warns about once; ``""`` for the ordinary cases.
    """

    unsupported: str = ""


@dataclass(frozen=True)
class Mask:
    """Pack to 1 bit per element, losslessly: a bool tensor (``value`` None), or a float
    tensor whose entries are all 0 or ``value`` (rule [ Masks ])."""

    value: torch.Tensor | None = None


@dataclass(frozen=True)
class Quantize:
    """Store low-bit codes with one range per group of ``layout`` (rule [ Quantized ]).

    ``estimator`` is the config's, except for per-token layouts, whose ranges are always
    the batch's own (``"dynamic"``).
    """

    layout: quant.GroupLayout
    bits: int
    rounding: Rounding
    estimator: Estimator
    kinks: quant.Kinks = ()


@dataclass(frozen=True)
class Half:
    """Store a 16-bit float copy: fp16, scaled by a power of two when the values exceed
    its range (inside BatchNorm layers, ``Config.batch_norm="half"``, rule [ Quantized ])."""


@dataclass(frozen=True)
class LogQuantize:
    """Store 8-bit codes of each value's logarithm relative to its row's maximum
    (rule [ Quantized ]): probabilities, whose sizes span orders of magnitude within a row,
    each to a fixed relative precision, where one linear range per head rounds most of them
    to zero."""

    window: float = quant.LOG_WINDOW


@dataclass(frozen=True)
class BlockQuantize:
    """Store block-scaled codes, each block with its own step (``PerBlock``, rule [ Quantized ])."""

    layout: quant.BlockLayout
    bits: int
    rounding: Rounding


class Source(Protocol):
    """Something a derived tensor is rebuilt from: ``take()`` gives its values once per
    use announced with ``add_use()``."""

    def add_use(self) -> None: ...

    def take(self) -> torch.Tensor: ...


Step = tuple[Any, ...]
"""One layout op replayed on the source: ``("transpose", d0, d1)``, ``("permute", dims)``,
``("t",)``, or ``("view", shape)`` for any op that keeps the row-major order (views,
reshapes, clones, squeezes: a reshape to the shape it gave)."""


@dataclass(frozen=True)
class Derive:
    """Rebuild the tensor in backward: ``source``'s values, then ``steps``, then a cast
    to the saved tensor's dtype and device and a reshape to its shape."""

    source: Source
    steps: tuple[Step, ...] = ()


Decision = Exact | Mask | Half | Quantize | LogQuantize | BlockQuantize | Derive
EXACT = Exact()
HALF = Half()
LOG = LogQuantize()


def is_activation(
    t: torch.Tensor, param_storages: set[int], frozen_shapes: set[tuple[int, ...]]
) -> bool:
    """Rule [ Parameters ]: False for parameters and buffers, their views and AMP copies, leaves
    that require grad, and (``frozen_shapes`` non-empty only under autocast) history-free
    tensors shaped like a frozen parameter or its transpose."""
    if is_parameter_like(t, param_storages):
        return False
    if frozen_shapes and t.grad_fn is None and not t.requires_grad:
        return tuple(t.shape) not in frozen_shapes
    return True


def decide(
    t: torch.Tensor, config: Config, norm: NormKind, compiled: bool = False, kinks: quant.Kinks = ()
) -> Decision:
    """How to keep activation ``t``, saved by a module with ``config`` (a normalization
    layer of kind ``norm``, see :func:`torchmesa.config.norm_kind`, or ``""``): rules
    [ Masks ], [ Quantized ] and [ Savings only ]. ``compiled``: a compiled graph saves ``t``
    (rule [ Compiled graphs ]), where no tensor has autograd history, so that rule [ Masks ]
    does not apply, and where it may be a fake tensor being traced, whose metadata alone can
    be read."""
    if type(t) is not torch.Tensor and not compiled:
        return Exact(type(t).__name__)
    unusual = unusual_layout(t)
    if unusual:
        return Exact(unusual)
    numel = t.numel()
    if numel == 0 or numel < config.min_numel:
        return EXACT
    if t.dtype == torch.bool:
        return Mask() if storage_nbytes(t) > -(-numel // 8) else EXACT
    if t.dtype not in quant.FLOAT_DTYPES:
        return EXACT
    if norm == "batch" and config.batch_norm != "quantize":
        keep = config.batch_norm == "exact" or t.element_size() <= 2
        return EXACT if keep else HALF
    if t.dim() >= 2 and is_probabilities(t):
        if config.probabilities != "linear" and not isinstance(config.groups, PerBlock):
            rows = numel // t.shape[-1]
            return LOG if storage_nbytes(t) > numel + 8 * rows else EXACT
        norm = ""  # stored like any other tensor: one range per head, as Mesa stores them
    bits = config.bits
    if config.attention_bits is not None and config.head_wise and t.dim() >= 4:
        bits = config.attention_bits
    decision: Quantize | BlockQuantize
    if isinstance(config.groups, PerBlock):
        blocks = quant.BlockLayout.of(
            t.shape, config.groups.size, config.groups.scale, config.rotation == "hadamard"
        )
        scale_bytes = config.groups.scale_bits // 8
        packed = -(-numel * bits // 8) + scale_bytes * blocks.num_blocks
        decision = BlockQuantize(blocks, bits, config.rounding)
    else:
        layout = quant.GroupLayout.of(t.shape, granularity(t, config, norm))
        packed = numel * bits // 8 + METADATA_BYTES_PER_GROUP * layout.num_groups
        if kinks:  # the grid is placed by the batch's own ranges, values rounded to nearest
            decision = Quantize(layout, bits, "nearest", "dynamic", kinks)
        else:
            estimator = "dynamic" if layout.kind == "per_token" else config.estimator
            decision = Quantize(layout, bits, config.rounding, estimator)
    if storage_nbytes(t) <= packed:
        return EXACT
    if not compiled and t.grad_fn is None and not t.requires_grad:  # a mask, or statistics
        value = quant.two_level_value(t)
        if value is not None:
            return Mask(value)
        if bits < 8 or norm == "attention":  # a fused attention's log-sum-exp: exponentiated
            return EXACT
    return decision


def decide_operand(t: torch.Tensor) -> Mask | Exact:
    """How to keep a tensor that attention scores were added to, masked or filled with
    (rule [ Probabilities ]): losslessly, since any error in it is an error in the scores. A mask
    (bool, or zeros and one value such as ``-inf``) in 1 bit; anything else (a position bias) as
    it is."""
    if t.dtype == torch.bool:
        return Mask() if t.numel() >= 8 else EXACT
    if t.is_floating_point() and t.numel() >= 8:
        value = quant.two_level_value(t)
        if value is not None:
            return Mask(value)
    return EXACT


def granularity(t: torch.Tensor, config: Config, norm: NormKind) -> Granularity:
    """Per token inside LayerNorm-like layers and long fused attention, head-wise for 4+
    dims, else channel groups."""
    if norm == "token" or (norm == "attention" and long_rows(t)):
        return config.norm_groups
    if config.head_wise and t.dim() >= 4:
        return PerHead()
    return config.groups


def module_norm_kind(module: nn.Module) -> NormKind:
    """How a module's saves are laid out (:func:`torchmesa.config.norm_kind` of its class),
    and ``"batch"`` for a per-channel scale (a depthwise 1x1 convolution): its weight's
    gradient sums input times gradient over batch and image as a BatchNorm weight's does,
    and cancels as much before a norm, so its input is kept like a BatchNorm's."""
    kind = norm_kind(type(module).__name__)
    if kind or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return kind
    scale = module.groups == module.in_channels == module.out_channels
    return "batch" if scale and all(k == 1 for k in module.kernel_size) else ""


def module_kinks(module: nn.Module) -> quant.Kinks:
    """Where the derivative of a piecewise activation module jumps (its input is stored
    with codes that keep each value on its side, rule [ Quantized ]), or ``()``."""
    if isinstance(module, (nn.Hardswish, nn.Hardsigmoid)):
        return (-3.0, 3.0)
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return (float(module.min_val), float(module.max_val))
    return ()


def long_rows(t: torch.Tensor) -> bool:
    """Whether a fused attention's ``(..., N, D)`` tensor has enough tokens that each row
    needs its own range (``ROW_RANGES_FROM_TOKENS``)."""
    return t.dim() >= 2 and t.shape[-2] >= ROW_RANGES_FROM_TOKENS


def unusual_layout(t: torch.Tensor) -> str:
    """A name for layouts never compressed, or ``""``."""
    if t.is_nested:
        return "nested"
    if t.layout != torch.strided:
        return "sparse"
    if t.is_complex():
        return "complex"
    if t.is_quantized:
        return "quantized"
    if t.is_floating_point() and t.element_size() == 1:
        return "float8"
    return ""
