"""The compiled path: torchmesa's quantizer inside ``torch.compile`` graphs.

AOTAutograd inlines ambient saved-tensor hooks that are ``torch.fx`` graph modules
(PyTorch 2.13 to 2.15 tested; 2.8 inlines them but does not tell them the graph node,
see :func:`inlining_available`): it traces the pack hook once per tensor the compiled
forward saves (a fake tensor, with the graph node that produced it) into the end of the
forward graph, and the unpack hook into the start of the backward graph. Inductor then fuses the
quantization with the kernels around it, and no Python runs per saved tensor.

:class:`GraphHooks` is that pair for one config. What to store is decided at trace time
from what the graph knows, with the eager rules (:func:`torchmesa.decide.decide`): 8-bit
codes with one range per head for 4+-dim tensors, per token for a tensor that a
normalization op reads, per channel otherwise; bool masks 1 bit per element; small
and integer tensors exact. Attention is told apart by its graph (:func:`attention_kind`):
probabilities are stored as log codes; the rows a fused attention kernel reads, and the
scores a softmax is recomputed from, with a range per row; a softmax's row statistics
and a fused kernel's log-sum-exp exact. Rebuilding probabilities from q and k (engine
rule [ Probabilities ]) is eager-only: the partitioner recomputes pointwise ops, never the score
product, and each hook sees one saved value, not the q and k the scores came from.
Parameters never reach the hooks (``saved_tensors_hooks_filtering_mode="no_static"``:
AOTAutograd hands them every saved value but its static inputs), and their casts and views
stay exact. The graph's other inputs are activations (the model's input, or a tensor
that an earlier graph made, across a graph break) and are stored as eager torchmesa
stores them. Ranges are each batch's own
(``estimator="dynamic"``); running estimates are eager-only.
Derived tensors (engine rule [ Derived ]) have a compiled counterpart in the partitioner: graphs
compiled in a compressed call may recompute in backward a pointwise value that backward
needs whole (a norm's output, GELU's output), from a value saved anyway, the way eager
torchmesa derives them (:func:`compile_settings`). Outside a compiled region (after
a graph break) the same hooks run as ordinary Python hooks on real tensors, with the same
results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torchmesa import quant
from torchmesa.config import Config, NormKind, PerBlock, norm_kind
from torchmesa.decide import Half, Mask, Quantize, decide

PackedSave = tuple[torch.Tensor, ...]
TOKEN_NORM_OPS = ("layer_norm", "rms_norm", "group_norm")
BATCH_NORM_OPS = ("batch_norm", "instance_norm")
SIGN_OPS = ("relu", "threshold", "hardtanh", "clamp", "aten.le.", "aten.lt.", "aten.gt.",
            "aten.ge.", "aten.sign.", "leaky_relu", "aten.elu", "hardsigmoid",
            "hardswish")  # fmt: skip
LAYOUT_OPS = ("convert_element_type", "_to_copy", "view", "reshape", "permute", "transpose",
              "expand", "aten.t.", "clone", "alias")  # fmt: skip
FUSED_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient",
                       "_scaled_dot_product_cudnn", "_scaled_dot_product_fused")  # fmt: skip
SOFTMAX_OPS = ("aten._softmax.", "aten._safe_softmax.")
# between probabilities and a saved copy: layout, a safe softmax's zeroing, dropout's product
PROBABILITY_OPS = (*LAYOUT_OPS, "aten.where.", "aten.mul.")
# products, and the steps between a product and a division that normalizes by it
PRODUCT_OPS = ("aten.bmm.", "aten.mm.")
NORMALIZER_OPS = (*LAYOUT_OPS, "aten.slice.", "aten.select.", "aten.add.", "aten.sum.",
                  "unsqueeze", "squeeze", "aten.clamp")  # fmt: skip
# between a softmax's input and its row maximum: layout, a scale, a mask added or filled
LOGIT_OPS = (*LAYOUT_OPS, "aten.mul.", "aten.div.", "aten.add.", "aten.where.", "masked_fill",
             "aten.tanh.")  # fmt: skip


def inlining_available() -> bool:
    """Whether this PyTorch inlines graph-module saved-tensor hooks and tells them which
    graph node each saved value is (2.13 to 2.15 tested). 2.8 inlines them without that:
    its hooks see bare fake tensors, whose decisions would keep every tensor exact."""
    try:
        from torch._functorch._aot_autograd import graph_compile, utils
    except ImportError:
        return False
    return hasattr(utils, "saved_tensors_hooks_are_inlineable") and hasattr(
        graph_compile, "_get_saved_tensor_hook_context"
    )


# AOTAutograd's settings for the graphs compiled in a compressed call. Its partitioner
# saves, by default, every value that backward uses whole (a matmul's input) rather than
# recompute it there; torchmesa's graphs let it recompute the pointwise ones (a norm's
# affine output, GELU's output), which eager torchmesa derives. Its hooks see by default
# only the graph's intermediates; torchmesa's see its non-static inputs too (the model's
# input, as eager sees it), never the parameters, which are static.
COMPILE_SETTINGS: dict[str, Any] = {
    "ban_recompute_materialized_backward": False,
    "saved_tensors_hooks_filtering_mode": "no_static",
}


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """:data:`COMPILE_SETTINGS`, set for the graphs compiled while it is entered (the
    settings this PyTorch has; they are part of AOTAutograd's cache key), and Inductor's
    joint-graph passes :func:`keep_kinked_inputs` (before its own passes) and
    :func:`keep_random_draws` (after them) where this PyTorch has the hooks."""
    from torch._functorch import config as functorch
    from torch._inductor import config as inductor

    known, passes = functorch.get_config_copy(), inductor.get_config_copy()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            functorch.patch(**{k: v for k, v in COMPILE_SETTINGS.items() if k in known})
        )
        if "joint_custom_pre_pass" in passes:
            kinked = _graph_pass(keep_kinked_inputs, "keep_kinked_inputs/1")
            stack.enter_context(inductor.patch(joint_custom_pre_pass=kinked))
        if "joint_custom_post_pass" in passes:
            draws = _graph_pass(keep_random_draws, "keep_random_draws/1")
            stack.enter_context(inductor.patch(joint_custom_post_pass=draws))
        yield


def unsupported(config: Config) -> str:
    """What in ``config`` the compiled path cannot store, or ``""``: it stores Mesa's
    8-bit codes with each batch's ranges, rounded to nearest."""
    if config.bits != 8 or config.attention_bits not in (None, 8):
        return f"bits={config.bits}, attention_bits={config.attention_bits}"
    if isinstance(config.groups, PerBlock):
        return "groups=PerBlock(...)"
    if config.rounding != "nearest":
        return f"rounding={config.rounding!r}"
    if config.check_finite:
        return "check_finite=True"
    return ""


class _HookGraph(torch.fx.GraphModule):
    """A graph module whose forward is a Python function: AOTAutograd inlines only graph
    modules, and traces whatever their forward runs, once per saved tensor.

    Its graph is one call of that function. The graph is all that AOTAutograd's cache of
    compiled graphs can see of a hook, and a call of a Python function makes it bypass
    the cache (an empty graph would let a graph compiled with other decisions, another
    config or torchmesa version, be served from disk)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        graph = torch.fx.Graph()
        graph.output(graph.call_function(fn, (graph.placeholder("saved"),)))
        super().__init__(nn.Module(), graph)
        self.forward = fn


def _trace_state() -> dict[str, Any] | None:
    """AOTAutograd's note of the saved value being packed (its forward node, both
    graphs), or None when the hook runs eagerly, on a real tensor."""
    try:
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context
    except ImportError:
        return None
    return _get_saved_tensor_hook_context()


def _target_in(node: Any, ops: tuple[str, ...]) -> bool:
    """Whether a graph node's op is one of ``ops`` (matched by name)."""
    target = str(node.target)
    return any(op in target for op in ops)


def _norm_module(node: Any) -> NormKind:
    """The kind of normalization module a graph node was traced inside, or ``""``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return norm_kind(str(getattr(cls, "__name__", cls)))


def _norm_op(node: Any) -> NormKind:
    """The kind of normalization op a graph node is, or ``""``. A decomposed BatchNorm
    is a ``var_mean`` over the batch dim (dim 0) among others."""
    if _target_in(node, BATCH_NORM_OPS):
        return "batch"
    if _target_in(node, ("var_mean",)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, (list, tuple)) and 0 in dims and len(dims) < _rank(node.args[0]):
            return "batch"
    return "token" if _target_in(node, TOKEN_NORM_OPS) else ""


def _rank(node: Any) -> int:
    """The number of dims of a graph node's value (0 when unknown)."""
    value = getattr(node, "meta", {}).get("val")
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _backward_uses(state: dict[str, Any]) -> list[Any]:
    """The backward graph's uses of the saved node (its placeholder's users); none when
    the backward graph is not known."""
    backward, name = state.get("_bw_graph"), state["_node"].name
    inputs = backward.find_nodes(op="placeholder") if backward is not None else []
    return [user for p in inputs if p.name == name for user in p.users]


def _through_views(nodes: list[Any]) -> Iterator[Any]:
    """``nodes`` and, through layout ops (views, casts), the nodes that use them."""
    todo, seen = list(nodes), set()
    while todo:
        node = todo.pop()
        yield node
        if node not in seen and _target_in(node, LAYOUT_OPS):
            seen.add(node)
            todo.extend(node.users)


def _read_by_norm(state: dict[str, Any]) -> NormKind:
    """Eager's frame kind (:func:`torchmesa.config.norm_kind`) for a saved node of a
    decomposed graph: it was made inside a normalization module (a norm's normalized
    input), or backward uses it, within two ops, inside one (a norm's input, from which
    its normalized value is computed again), or a normalization op reads it, through
    views. ``""`` when none does."""
    node = state["_node"]
    kind = _norm_module(node)
    if kind:
        return kind
    todo = [(user, 1) for user in _backward_uses(state)]
    while todo:
        user, depth = todo.pop()
        kind = _norm_module(user)
        if kind:
            return kind
        if depth < 2:
            todo.extend((u, depth + 1) for u in user.users)
    for user in _through_views(list(node.users)):
        kind = _norm_op(user)
        if kind:
            return kind
    return ""


def _is_softmax(node: Any) -> bool:
    """Whether a graph node is a softmax: the op, or its decomposition ``exp(x) / sum``."""
    if _target_in(node, SOFTMAX_OPS):
        return True
    if not _target_in(node, ("aten.div.Tensor",)) or len(node.args) < 2:
        return False
    top, bottom = node.args[0], node.args[1]
    return (
        hasattr(top, "target") and _target_in(top, ("aten.exp.",))
        and hasattr(bottom, "target") and _target_in(bottom, ("aten.sum.",))
        and bool(bottom.args) and bottom.args[0] is top
    )  # fmt: skip


def attention_kind(node: Any) -> str:
    """What a saved graph node is to attention (engine rule [ Probabilities ]'s compiled
    counterpart):
    ``"probabilities"`` (a softmax's output, through layout ops, a safe softmax's zeroing
    and dropout), ``"logits"`` (what a softmax's row maximum is taken of, through a scale,
    a mask and layout: the partitioner keeps it to recompute the probabilities from it),
    ``"attention"`` (what a fused attention kernel reads or gives, but its statistics),
    ``"statistics"`` (its log-sum-exp; a decomposed softmax's row maximum and sum, which
    backward divides and exponentiates by), or ``""``."""
    first = node.args[0] if node.args else None
    if _target_in(node, ("aten.amax.",)) or (
        _target_in(node, ("aten.sum.",))
        and hasattr(first, "target")
        and _target_in(first, ("aten.exp.",))
    ):
        return "statistics"
    todo, seen = [(node, 0)], set()
    while todo:  # back from the value, for the softmax it is a copy of
        current, depth = todo.pop()
        if _is_softmax(current):
            return "probabilities"
        if depth < 4 and _target_in(current, PROBABILITY_OPS) and current not in seen:
            seen.add(current)
            todo.extend((a, depth + 1) for a in current.args if hasattr(a, "target"))
    if any(_target_in(user, FUSED_ATTENTION_OPS) for user in node.users):
        return "attention"
    if (
        _target_in(node, ("getitem",))
        and node.args
        and _target_in(node.args[0], FUSED_ATTENTION_OPS)
    ):
        return "attention" if node.args[1] == 0 else "statistics"
    todo = [(user, 0) for user in node.users]
    while todo:  # forward from the value, for a row maximum taken of it
        current, depth = todo.pop()
        if _target_in(current, ("aten.amax.",)):
            return "logits"
        if depth < 4 and _target_in(current, LOGIT_OPS):
            todo.extend((user, depth + 1) for user in current.users)
    return ""


def normalized_values(graph: torch.fx.Graph) -> set[Any]:
    """The nodes whose saves rule [ Normalized products ] keeps exact in ``graph``: the
    operands of a product (``bmm``, ``mm``) whose output a division divides by, within a
    few steps of :data:`NORMALIZER_OPS`, and the operands of that division. Computed once
    per graph."""
    cached: set[Any] | None = getattr(graph, "_torchmesa_normalized", None)
    if cached is not None:
        return cached
    kept: set[Any] = set()
    for div in graph.find_nodes(op="call_function", target=torch.ops.aten.div.Tensor):
        if len(div.args) < 2:
            continue
        products = _products_before(div.args[1])
        if not products:
            continue
        products |= _products_before(div.args[0])
        for product in list(products):  # the products these multiply (kᵀ @ v in q @ kv)
            for arg in product.args:
                products |= _products_before(arg)
        kept |= {a for a in div.args if isinstance(a, torch.fx.Node)}
        kept |= {a for p in products for a in p.args if isinstance(a, torch.fx.Node)}
    graph._torchmesa_normalized = kept  # type: ignore[attr-defined]
    return kept


def _products_before(node: Any, steps: int = 8) -> set[Any]:
    """The product nodes ``node`` comes from through at most ``steps`` normalizer steps."""
    found: set[Any] = set()
    todo, seen = [node], set[Any]()
    while todo and len(seen) < steps:
        n = todo.pop()
        if not isinstance(n, torch.fx.Node) or n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if _target_in(n, PRODUCT_OPS):
            found.add(n)
        elif _target_in(n, NORMALIZER_OPS):
            todo.extend(a for a in n.args if isinstance(a, torch.fx.Node))
    return found


def _in_normalized(node: Any, steps: int = 8) -> bool:
    """Whether the saved node is a layout copy of a value :func:`normalized_values` keeps
    (the transposed operand a product's backward reads), or is or reaches one through at
    most ``steps`` normalizer steps (a product's output the division reads through a
    slice, a product's operand through a view)."""
    kept = normalized_values(node.graph)
    if not kept:
        return False
    if any(source in kept for source in itertools.islice(_layout_sources(node), steps)):
        return True
    todo, seen = [node], set[Any]()
    while todo and len(seen) < steps:
        n = todo.pop()
        if n in seen:
            continue
        if n in kept:
            return True
        seen.add(n)
        if n is node or _target_in(n, NORMALIZER_OPS):
            todo.extend(n.users)
    return False


def _copy_of_input(node: Any) -> bool:
    """Whether the saved node is an input of the graph (a parameter, most often)
    reshaped or cast: autocast's bf16 copy of a weight is an intermediate of the graph,
    and a parameter's copy is never quantized (engine rule [ Parameters ])."""
    if node is None or node.op != "call_function":
        return False
    *_, source = _layout_sources(node)
    return bool(source.op == "placeholder")


def _layout_sources(node: Any) -> Iterator[Any]:
    """``node``, and the values it is a layout copy of (views, casts: first arguments)."""
    while isinstance(node, torch.fx.Node):
        yield node
        if node.op != "call_function" or not node.args or not _target_in(node, LAYOUT_OPS):
            return
        node = node.args[0]


def _even_groups(layout: quant.GroupLayout) -> quant.GroupLayout:
    """``layout`` with channel groups that divide the channels. A value broadcast from
    groups of which the last is smaller (``repeat_interleave`` then a slice) is read wrong
    by Inductor's CPU kernels when they fuse it into its consumer (PyTorch 2.13: codes off
    by up to 255). The group size becomes the nearest divisor of the channels: below,
    while that gives at most twice the groups (finer ranges, metadata still noise), else
    above (coarser)."""
    size, channels = layout.group_size, layout.channels
    if layout.kind != "per_channel_group" or channels % size == 0:
        return layout
    below = max(d for d in range(1, size) if channels % d == 0)
    if channels // below <= 2 * layout.num_groups:
        size = below
    else:
        size = min(d for d in range(size + 1, channels + 1) if channels % d == 0)
    return dataclasses.replace(layout, num_groups=channels // size, group_size=size)


def _signs_read(state: dict[str, Any]) -> bool:
    """Whether backward reads the saved node's signs: a ReLU, a clamp or a comparison
    uses it (through views), as when the partitioner recomputes a ReLU from its input.
    True when the backward graph is not known."""
    if state.get("_bw_graph") is None:
        return True
    return any(_target_in(user, SIGN_OPS) for user in _through_views(_backward_uses(state)))


COMPARISONS = ("aten.lt.Scalar", "aten.le.Scalar", "aten.gt.Scalar", "aten.ge.Scalar")
KINKED_MODULES = ("Hardswish", "Hardsigmoid", "Hardtanh", "ReLU6")


def _kinks_read(state: dict[str, Any]) -> quant.Kinks:
    """Where backward compares the saved node with a constant other than zero (a piecewise
    activation's kinks: hardswish's and hardsigmoid's ±3, ReLU6's 6), at most two,
    ascending; ``()`` when it compares with none or with more."""
    if state.get("_bw_graph") is None:
        return ()
    points = {
        float(user.args[1])
        for user in _through_views(_backward_uses(state))
        if _target_in(user, COMPARISONS) and len(user.args) > 1
        and isinstance(user.args[1], (int, float)) and user.args[1] != 0
    }  # fmt: skip
    return tuple(sorted(points)) if 1 <= len(points) <= 2 else ()


def keep_kinked_inputs(graph: torch.fx.Graph) -> None:
    """A joint-graph pass: the input of a piecewise activation module is saved for
    backward, never recomputed there from a value stored before it (a BatchNorm's 16-bit
    input, whose rounding would move values across the kinks again), so that its own codes
    keep each value on its side of each kink."""
    from torch.utils.checkpoint import CheckpointPolicy

    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or not node.args:
            continue
        path, (_, cls) = list(stack.items())[-1]
        if str(getattr(cls, "__name__", cls)) not in KINKED_MODULES:
            continue
        first = node.args[0]
        outer = getattr(first, "meta", {}).get("nn_module_stack") or {}
        if isinstance(first, torch.fx.Node) and path not in outer:
            first.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def keep_random_draws(graph: torch.fx.Graph) -> None:
    """A joint-graph pass: every op that draws random numbers (dropout's mask, Inductor's
    seeds) runs in forward only, never again in backward, where it would draw other
    numbers than forward used and give silently wrong gradients.

    The partitioner may recompute a value in backward. It never recomputes a random op
    under its default settings, but with :data:`COMPILE_SETTINGS` (a value backward
    needs whole may be recomputed) it recomputes Inductor's seeds, and under an
    activation memory budget below 1 its knapsack trades banned random ops back into
    recomputation; it leaves a value marked ``MUST_SAVE`` alone. A random op that a
    checkpoint policy marked already (selective checkpointing) keeps its mark: the
    partitioner replays its generator's state for those."""
    from torch.utils.checkpoint import CheckpointPolicy

    for node in graph.nodes:
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def _graph_pass(run: Callable[[torch.fx.Graph], None], name: str) -> Any:
    """``run`` as Inductor's custom joint-graph pass, named so that its caches know it."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class TorchmesaPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            run(graph)

        def uuid(self) -> str:
            return f"torchmesa.compiled.{name}"

    return TorchmesaPass()


def _keep_signs(
    codes: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """``codes`` moved by at most one step so that each restores to a value of ``x``'s
    sign: positive exactly where ``x`` is. The partitioner recomputes a ReLU (its mask)
    in backward from the value saved before it, and a code rounded across zero would
    flip the mask there; eager torchmesa keeps the ReLU's output instead."""
    last = torch.floor(-shift / step)  # the largest code that restores to a value <= 0
    lifted = torch.where(x > 0, torch.maximum(codes.float(), last + 1), codes.float())
    kept = torch.where(x > 0, lifted, torch.minimum(lifted, last))
    return kept.clamp(0, 255).to(torch.uint8)


MASK, HALF, LOG, CODES = range(1, 5)
"""The encodings a compiled graph saves, each named by its tag (:func:`_tagged`). A save
kept as it is packs to ``(x,)``, untagged: AOTAutograd passes a graph input saved as
itself through only alone."""


def _tagged(kind: int, x: torch.Tensor, *parts: torch.Tensor) -> PackedSave:
    """``parts`` and the tag that says how to restore them: an empty tensor of ``x``'s
    dtype shaped ``(kind, 0, *x.shape)``, whose shape the unpack graph reads when it is
    traced."""
    return (*parts, x.new_empty((kind, 0, *x.shape)))


def _mask(mask: torch.Tensor) -> PackedSave:
    """A bool tensor in 1 bit per element (engine rule [ Masks ]), packed as the eager
    reference packs it: shifts and ors that Inductor fuses into one pass. A mask that is
    not contiguous or whose size is not a multiple of 8 stays as it is."""
    if not mask.is_contiguous() or mask.numel() % 8:
        return (mask,)
    return _tagged(MASK, mask, quant.reference.pack_mask(mask, None).bits)


RESTORE: dict[int, Callable[[tuple[torch.Tensor, ...], torch.dtype, torch.Size], torch.Tensor]] = {
    MASK: lambda parts, dtype, shape: quant.reference.unpack_mask(
        quant.PackedMask(parts[0], shape, None)
    ),
    HALF: lambda parts, dtype, shape: quant.from_half(parts[0], parts[1], dtype),
    LOG: lambda parts, dtype, shape: quant.from_log_codes(parts[0], parts[1], dtype),
    CODES: lambda parts, dtype, shape: quant.reference.affine(parts[0], parts[1], parts[2], dtype),
}
"""How each encoding restores its tensor, from its parts, the dtype and the shape saved."""


class GraphHooks:
    """The pack / unpack pair for one config, as graph modules (see the module docstring).

    A save kept as it is packs to ``(x,)``; every other to its parts and a tag
    (:func:`_tagged`): a bool mask in 1 bit per element (``MASK``), a 16-bit copy inside BatchNorm
    (``HALF``: values, scale), probabilities as log codes (``LOG``: codes, row maxima),
    or 8-bit codes (``CODES``: uint8 codes in ``x``'s shape and layout, and its groups'
    shift and step shaped to broadcast against them). The numbers come from the same
    functions as the eager formats', through the same dispatch table, which gives a
    traced (fake) tensor to the reference's torch ops.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pack = _HookGraph(self._pack)
        self.unpack = _HookGraph(self._unpack)

    def _pack(self, x: torch.Tensor) -> PackedSave:
        state = _trace_state()  # None when this runs eagerly, on a real tensor
        node = state["_node"] if state else None
        if _copy_of_input(node) or (node is not None and _in_normalized(node)):
            return (x,)  # a parameter's copy, or rule [ Normalized products ]
        kind = attention_kind(node) if node is not None else ""
        if kind == "statistics":
            return (x,)
        probabilities = kind == "probabilities" and x.is_floating_point() and x.dim() >= 2
        probabilities = probabilities and self.config.probabilities != "linear"
        if probabilities and x.numel() >= self.config.min_numel:
            with torch.no_grad():
                codes, rows = quant.to_log_codes(x)
            return _tagged(LOG, x, codes, rows)
        if kind == "logits":  # rows of their own offsets: a range each
            norm: NormKind = "token"
        elif kind == "attention":  # a range per row at long context, as eagerly
            norm = "attention"
        else:
            norm = _read_by_norm(state) if state is not None else ""
        kinks = _kinks_read(state) if state is not None else ()
        if kinks:  # a piecewise activation's input: codes that keep its sides, not 16 bits
            norm = ""
        decision = decide(x, self.config, norm, compiled=state is not None)
        if isinstance(decision, Half):
            scale = quant.half_scale(x)
            return _tagged(HALF, x, quant.to_half(x, scale), scale)
        if isinstance(decision, Mask) and decision.value is None:
            return _mask(x)
        if not isinstance(decision, Quantize):
            return (x,)
        layout, ndim = _even_groups(decision.layout), x.dim()
        with torch.no_grad():
            lo, hi = quant.group_minmax(x, layout)
            if kinks:
                lo, width = quant.kink_ranges(lo, hi, kinks, 8)
            else:
                width = hi - lo
            q = quant.quantize(x, layout, lo, width, bits=8)
            shift, step = layout.broadcast(lo, ndim), layout.broadcast(q.scale, ndim)
            codes = q.codes
            if state is None or _signs_read(state):
                codes = _keep_signs(codes, x, shift, step)
        return _tagged(CODES, x, codes, shift, step)

    @staticmethod
    def _unpack(packed: PackedSave) -> torch.Tensor:
        if len(packed) == 1:
            return packed[0]
        *parts, tag = packed
        return RESTORE[tag.shape[0]](tuple(parts), tag.dtype, tag.shape[2:])
