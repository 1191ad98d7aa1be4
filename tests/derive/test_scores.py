"""Attention probabilities rebuilt from their score product (torchmesa.derive.scores, rule
[ Probabilities ]).

The recipe is tested against the forward's own probabilities with exact operands (it
must give them back bit for bit), then inside the engine: what is recognised, what falls
back, the edge cases of the issue that asked for it, and gradients at the lengths models
train at.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Lambda, compare
from torch import nn

import torchmesa
from torchmesa.derive import StoredSource, scores

B, H, N, D = 2, 3, 37, 16  # awkward sizes: a prime length, an odd head count


def _min(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    causal = torch.ones(N, N, dtype=torch.bool).tril()
    empty_row = torch.zeros(B, 1, N, N, dtype=torch.bool)
    empty_row[:, :, 5] = True  # every score of query 5 masked
    return {
        "q": leaf(B, H, N, D),
        "k": leaf(B, H, N, D),
        "v": leaf(B, H, N, D),
        "k_cross": leaf(B, H, 19, D),
        "causal": causal,
        "additive": torch.zeros(B, 1, N, N, dtype=dtype).masked_fill(~causal, _min(dtype)),
        "bias": leaf(1, H, N, N),
        "alibi": torch.randn(B * H, 1, N, generator=g).to(dtype),
        "empty_row": empty_row,
        "window": causal & ~torch.ones(N, N, dtype=torch.bool).tril(-8),
    }


def _scores(x: dict) -> torch.Tensor:
    return x["q"] @ x["k"].transpose(-1, -2)


# name -> forward; each ends in (or contains) one softmax over the last dim of q·kᵀ
RECOGNISED = {
    # Hugging Face's eager attention: scale, additive mask, cast, dropout
    "hf eager": lambda x: (
        F.dropout(
            F.softmax(
                torch.matmul(x["q"], x["k"].transpose(-1, -2)) * D**-0.5 + x["additive"], -1
            ).type(x["v"].dtype),
            0.1,
        )
        @ x["v"]
    ),
    # older GPT-2: divide by a 0-dim tensor, where() with a 0-dim minimum
    "where": lambda x: F.softmax(
        torch.where(
            x["causal"],
            _scores(x) / torch.full([], D**0.5, dtype=x["q"].dtype),
            torch.full([], _min(x["q"].dtype), dtype=x["q"].dtype),
        ),
        -1,
    ),
    "masked_fill": lambda x: _scores(x).masked_fill(~x["causal"], float("-inf")).softmax(-1),
    "masked_fill_ in place": lambda x: (
        lambda s: s.masked_fill_(~x["window"], float("-inf")).softmax(-1)
    )(_scores(x) * 1.0),
    "sdpa float mask": lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=x["additive"], dropout_p=0.1
    ),
    "sdpa bool mask": lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=x["window"], dropout_p=0.1
    ),
    "sdpa causal": lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], is_causal=True, dropout_p=0.1, scale=0.3
    ),
    "sdpa no mask": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], dropout_p=0.1),
    "sdpa gqa": lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"][:, :1], x["v"][:, :1], dropout_p=0.1, enable_gqa=True
    ),
    "einsum": lambda x: torch.einsum("bhqd,bhkd->bhqk", x["q"], x["k"]).softmax(-1),
    "soft-capped": lambda x: (torch.tanh(_scores(x) / 5.0) * 5.0).softmax(-1),
    "learned bias (T5)": lambda x: (_scores(x) + x["bias"]).softmax(-1),
    "broadcast bias (Swin)": lambda x: (_scores(x) + x["bias"][0].unsqueeze(0)).softmax(-1),
    "ALiBi (baddbmm)": lambda x: (
        torch.baddbmm(
            x["alibi"],
            x["q"].reshape(B * H, N, D),
            x["k"].reshape(B * H, N, D).transpose(1, 2),
            beta=1.0,
            alpha=0.25,
        )
        .view(B, H, N, N)
        .softmax(-1, dtype=torch.float32)
    ),
    "cross-attention": lambda x: (x["q"] @ x["k_cross"].transpose(-1, -2)).softmax(-1),
    "fully masked row, -inf": lambda x: (
        _scores(x).masked_fill(x["empty_row"], -math.inf).softmax(-1)
    ),
    "fully masked row, minimum": lambda x: (
        _scores(x)
        + torch.zeros(B, 1, N, N, dtype=x["q"].dtype).masked_fill(
            x["empty_row"], _min(x["q"].dtype)
        )
    ).softmax(-1),
    "sdpa fully masked row": lambda x: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=~x["empty_row"], dropout_p=0.1
    ),
}

NOT_RECOGNISED = {
    "softmax over the queries": lambda x: _scores(x).softmax(-2),
    "scores subtracted from a mask": lambda x: (x["additive"] - _scores(x)).softmax(-1),
    "an op it does not know": lambda x: (_scores(x) ** 2).softmax(-1),
    "no product": lambda x: x["bias"].softmax(-1),
    "a mask changed after it was added": lambda x: _changed_mask(x),
}


def _changed_mask(x: dict) -> torch.Tensor:
    mask = x["additive"].clone()
    s = _scores(x) + mask
    mask.zero_()  # the recorded operand no longer holds what was added
    return s.softmax(-1)


def _recipes(fn, x: dict, autocast: torch.dtype | None = None) -> list:
    """Run ``fn`` with exact saves and :class:`scores.Capture` on; for every softmax saved,
    (its output, the recipe recognise() gave, or None)."""
    capture = scores.Capture()
    found = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if scores.is_softmax_output(t):

            def store(y: torch.Tensor) -> tuple[torch.Tensor, int]:
                return y.detach().clone(), 0

            probe = lambda node, attr: getattr(node, attr, None)  # noqa: E731
            recipe = scores.recognise(t, capture, probe, store, StoredSource)
            found.append((t.detach().clone(), recipe))
        return t

    ctx = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), capture:
        fn(x)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(RECOGNISED))
def test_the_recipe_gives_the_forwards_probabilities_back_bit_for_bit(name, dtype):
    found = _recipes(RECOGNISED[name], _inputs(dtype))
    assert len(found) == 1
    p, recipe = found[0]
    assert recipe is not None, f"{name}: not recognised"
    rebuilt = recipe.source.rebuild()
    assert rebuilt.dtype == p.dtype and rebuilt.shape == p.shape
    assert torch.equal(rebuilt.nan_to_num(7.0), p.nan_to_num(7.0))  # a -inf row is NaN


@pytest.mark.parametrize("name", ["hf eager", "sdpa causal", "learned bias (T5)"])
def test_under_autocast_the_recipe_rebuilds_in_the_dtypes_forward_used(name):
    found = _recipes(RECOGNISED[name], _inputs(), autocast=torch.bfloat16)
    p, recipe = found[0]
    assert recipe is not None
    assert torch.equal(recipe.source.rebuild(), p)


@pytest.mark.parametrize("name", sorted(NOT_RECOGNISED))
def test_anything_else_on_the_way_is_not_recognised(name):
    found = _recipes(NOT_RECOGNISED[name], _inputs())
    assert found and all(recipe is None for _, recipe in found), name


# -- in the engine ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Eager attention written by hand: q and k from one projection, a causal mask added,
    the probabilities dropped out, optionally multiplied by a head mask."""

    def __init__(self, dim: int = 64, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), MIN32)
        p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask).softmax(-1)
        p = self.dropout(p)
        if head_mask is not None:
            p = p * head_mask
        return self.out((p @ v).transpose(1, 2).reshape(b, n, c))


MIN32 = torch.finfo(torch.float32).min


def _rebuilt_count(monkeypatch) -> dict[str, int]:
    """Counts softmax outputs rebuilt and stored while the returned dict is alive."""
    counts = {"rebuilt": 0, "stored": 0}
    real = scores.recognise

    def spy(t, *args, **kwargs):
        found = real(t, *args, **kwargs)
        if t.grad_fn is not None and type(t.grad_fn).__name__ != "TanhBackward0":
            counts["rebuilt" if found is not None else "stored"] += 1
        return found

    monkeypatch.setattr(scores, "recognise", spy)
    return counts


def test_probabilities_are_rebuilt_not_stored(monkeypatch):
    counts = _rebuilt_count(monkeypatch)
    x = torch.randn(2, 256, 64)
    res = compare(Attention(), lambda m: (lambda y: (y, y.square().mean()))(m(x)))
    assert counts == {"rebuilt": 1, "stored": 0}
    assert res.forward_equal and res.held_after_backward == 0
    assert res.min_cosine > 0.9999, (res.worst_param, res.min_cosine)
    # the probabilities and their dropped copy: 2 * 4 * 256² fp32, stored as nothing
    assert res.exact_bytes - res.stored_bytes > 2 * 2 * 4 * 256 * 256 * 4


def test_a_head_mask_after_the_softmax_is_a_product_of_the_rebuilt_probabilities(monkeypatch):
    counts = _rebuilt_count(monkeypatch)
    x, head_mask = torch.randn(2, 128, 64), torch.rand(1, 4, 1, 1)
    res = compare(Attention(dropout=0.0), lambda m: (lambda y: (y, y.sum()))(m(x, head_mask)))
    assert counts["rebuilt"] == 1 and res.min_cosine > 0.9999
    assert res.stored_bytes < res.exact_bytes / 8


class SquaredScores(Attention):
    """Attention over squared scores: a step torchmesa does not know, so its
    probabilities are stored, not rebuilt."""

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = ((q @ k.transpose(-1, -2)) ** 2 / q.shape[-1]).softmax(-1)
        return self.out((p @ v).transpose(1, 2).reshape(b, n, c))


def test_an_unrecognised_softmax_is_stored_as_log_codes_not_per_head(monkeypatch):
    counts = _rebuilt_count(monkeypatch)
    x = torch.randn(1, 1024, 64)
    res = compare(SquaredScores(), lambda m: (lambda y: (y, y.square().mean()))(m(x)))
    assert counts == {"rebuilt": 0, "stored": 1}
    # one linear range per head: 0.99959; log codes: 0.99998
    assert res.min_cosine > 0.9999, (res.worst_param, res.min_cosine)
    assert res.ratio > 3.5


def test_retain_graph_rebuilds_again_and_accumulates_exactly_twice():
    model = torchmesa.compress(Attention())
    x = torch.randn(2, 128, 64)
    torch.manual_seed(3)
    loss = model(x).square().mean()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    for g1, p in zip(once, model.parameters(), strict=False):
        torch.testing.assert_close(p.grad, 2 * g1, rtol=1e-5, atol=1e-7)


def test_second_order_gradients_follow_exact_ones():
    model = Attention(dropout=0.0)
    x = torch.randn(2, 96, 64)
    grads = []
    for m in (model, torchmesa.compress(__import__("copy").deepcopy(model))):
        first = torch.autograd.grad(m(x).square().sum(), list(m.parameters()), create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), list(m.parameters()))
        grads.append(torch.cat([g.flatten() for g in second]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.999


def test_nothing_rebuilt_outlives_backward(monkeypatch):
    import weakref

    rebuilt = []
    real = scores.ScoresSource.rebuild

    def keep(self):
        out = real(self)
        rebuilt.append(weakref.ref(out))
        return out

    monkeypatch.setattr(scores.ScoresSource, "rebuild", keep)
    model = torchmesa.compress(Attention())
    with torchmesa.track() as t:
        loss = model(torch.randn(2, 128, 64)).sum()
    loss.backward()
    assert len(rebuilt) == 1 and rebuilt[0]() is None and t.held_bytes == 0


def test_the_capture_mode_is_gone_after_forward_even_when_it_raises():
    class Raises(nn.Module):
        def forward(self, x):
            (x @ x.transpose(-1, -2)).softmax(-1)
            raise ValueError("boom")

    before = torch._C._len_torch_function_stack()
    model = torchmesa.compress(Attention())
    model(torch.randn(1, 16, 64))
    assert torch._C._len_torch_function_stack() == before
    with pytest.raises(ValueError, match="boom"):
        torchmesa.compress(Raises())(torch.randn(1, 32, 64, requires_grad=True))
    assert torch._C._len_torch_function_stack() == before


def test_a_product_operand_kept_exact_and_changed_in_place_is_refused_in_backward():
    # q and k are small (kept exact, min_numel), their probabilities are not
    class Changes(nn.Module):
        def forward(self, q, k):
            p = (q @ k.transpose(-1, -2)).softmax(-1)
            q.mul_(2)
            return p

    q = torch.randn(1, 1, 64, 8, requires_grad=True) * 1
    k = torch.randn(1, 1, 64, 8, requires_grad=True)
    out = torchmesa.compress(Changes())(q, k)
    with pytest.raises(RuntimeError, match="modified by an in-place operation after forward"):
        out.square().sum().backward()


def test_a_mask_changed_after_forward_does_not_reach_the_rebuilt_probabilities():
    mask = torch.zeros(128, 128).masked_fill(torch.ones(128, 128, dtype=torch.bool).triu(1), MIN32)
    mask[3, :5] = 1.5  # not a two-level mask: stored as a copy of its own
    q, k = (torch.randn(1, 2, 128, 32, requires_grad=True) for _ in range(2))

    def attend(q, k):
        return (q @ k.transpose(-1, -2) + mask).softmax(-1)

    exact = attend(q, k)
    (gq_exact,) = torch.autograd.grad(exact.square().sum(), q)
    out = torchmesa.compress(Lambda(attend))(q, k)
    mask.zero_()
    (gq,) = torch.autograd.grad(out.square().sum(), q)
    assert F.cosine_similarity(gq.flatten(), gq_exact.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("probabilities, kind", [("log", "quantized"), ("linear", "quantized")])
def test_probabilities_can_be_stored_instead(probabilities, kind, monkeypatch):
    counts = _rebuilt_count(monkeypatch)
    model = torchmesa.compress(Attention(), torchmesa.Config(probabilities=probabilities))
    with torchmesa.track() as t:
        loss = model(torch.randn(2, 256, 64)).sum()
    assert counts == {"rebuilt": 0, "stored": 0}  # not even tried
    loss.backward()
    # the probabilities (2 x 4 x 256 x 256 fp32): about a byte each either way
    assert t.kept()[kind].exact_bytes >= 2 * 4 * 256 * 256 * 4
    assert t.held_bytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("minus_inf_row", [False, True])
def test_a_safe_softmax_is_rebuilt_bitwise_with_and_without_rows_of_minus_inf(dtype, minus_inf_row):
    # the CPU rebuild runs the plain softmax, and the safe one only when a row of the
    # scores is all -inf (the plain one gives it NaN): both must give the forward's values
    a = torch.randn(6, 17, 8).to(dtype)
    b = (-torch.rand(6, 8, 17) - 0.1).to(dtype)
    if minus_inf_row:
        a[:, 0, :] = float("inf")  # times negative keys: a row of -inf scores
    want = torch.ops.aten._safe_softmax(torch.bmm(a, b), -1)
    product = scores.Product("bmm", StoredSource(a), StoredSource(b))
    source = scores.ScoresSource(product, (), "SafeSoftmaxBackward0", (want.shape, dtype, a.device))
    source.add_use()
    got = source.take()
    assert got.dtype == dtype and torch.equal(got, want)
    assert bool((got[:, 0] == 0).all()) == minus_inf_row
