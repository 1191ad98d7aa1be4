"""track(): saved-activation bytes once per storage, parameters excluded, lifetimes."""

import pytest
import torch
from torch import nn

import torchmesa
from torchmesa import Config


def test_uncompressed_model_counts_exact_bytes():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    x = torch.randn(32, 64)
    with torchmesa.track() as t:
        model(x)
    # Linear1 saves x (no grad needed for x: weight grad only), GELU its input, Linear2 its
    # input: each saved storage once, weights excluded
    assert t.exact_bytes == t.stored_bytes == (32 * 64 + 32 * 128 + 32 * 128) * 4
    assert t.ratio == 1.0


@pytest.mark.parametrize("derive", [False, True])
def test_fp32_ratio_and_nothing_alive_after_backward(derive):
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)), Config(derive=derive)
    )
    with torchmesa.track() as t:
        y = model(torch.randn(512, 256))
    if derive:  # the GELU output is rebuilt: 8 bits for 256 + 512 of 1280 channels
        assert 0.98 * 1280 / 768 * 4 < t.ratio <= 1280 / 768 * 4
        assert t.kept()["derived"].tensors == 1
    else:
        assert 3.8 < t.ratio <= 4.0
    loss = y.square().mean()
    assert t.held_bytes > 0
    loss.backward()
    assert t.held_bytes == 0


def test_bf16_autocast_ratio():
    model = torchmesa.compress(
        nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)), Config(derive=False)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16), torchmesa.track() as t:
        model(torch.randn(512, 256))  # at 64 rows, 8 bytes a channel would not be noise
    assert 1.9 < t.ratio <= 2.0


def test_summary_mentions_both_sizes():
    with torchmesa.track() as t:
        torchmesa.compress(nn.GELU())(torch.randn(64, 64, requires_grad=True) * 1)
    assert "exact" in t.summary() and "stored" in t.summary()


def test_every_way_a_tensor_is_kept_is_counted_once():
    # a BatchNorm input is a 16-bit copy ("half"): the totals by kind add up to the whole
    model = torchmesa.compress(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Flatten(),
            nn.Linear(16 * 64, 10),
        )
    )
    with torchmesa.track() as t:
        model(torch.randn(8, 3, 8, 8)).sum().backward()
    kept = t.kept()
    assert kept["half"].tensors == 1
    assert kept["half"].stored_bytes == 8 * 16 * 64 * 2 + 4
    assert {"quantized", "mask"} <= set(kept)
    assert sum(k.stored_bytes for k in kept.values()) == t.stored_bytes
    assert sum(k.exact_bytes for k in kept.values()) == t.exact_bytes
    rows = torchmesa.report(model, torch.randn(8, 3, 8, 8)).modules
    assert any(r.kept_label() == "1h 2e" for r in rows)  # the BatchNorm: its input, mean, rstd


def test_what_a_recipe_stores_of_its_own_is_counted_once():
    from torchmesa import quant
    from torchmesa.formats import MaskRecord

    mask = MaskRecord(quant.pack_mask(torch.rand(64, 64) > 0.5), None)
    bias = torch.randn(4, 64, 64)
    t = torchmesa.Tracker()
    for _ in range(3):  # three layers share one mask and one bias
        t.record_operand(mask, "attn")
        t.record_operand(bias, "attn")
    assert t.stored_bytes == mask.nbytes + bias.numel() * 4 and t.exact_bytes == 0
    kept = t.kept()
    assert (
        kept["mask"].stored_bytes == mask.nbytes and kept["exact"].stored_bytes == bias.numel() * 4
    )
