"""OuterLoop: the MDLM loss against an explicit per-sample loop, schedules against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from bilevel_dlm import Anchor, CARTObjective, CosineSchedule, LinearSchedule, ModelView, OuterConfig, OuterLoop
from bilevel_dlm.outer import make_objective
from toy import MASK_ID, ToyBackbone, ToyDLM, toy_batch


@pytest.mark.parametrize("normalization", ["token", "sequence", "batch"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_loss_equals_an_explicit_loop(normalization, schedule):
    model = ToyDLM()
    outer = OuterLoop(ModelView(ToyBackbone(), model, MASK_ID), OuterConfig(normalization=normalization, schedule=schedule))
    raw = toy_batch(4, 12, prompt=3, seed=5)
    x0, maskable = raw["input_ids"], raw["labels"] != -100
    maskable[3] = False  # a sample without any maskable token
    maskable[2, 8:] = False  # and one with fewer
    anchor = outer.sample_anchor(x0, maskable, torch.Generator().manual_seed(0))
    loss = outer.loss(x0, maskable, anchor)

    logits = model(anchor.input_ids)
    per_sample, counts = [], []
    for b in range(4):
        t = anchor.t[b].item()
        w = 1 / t if schedule == "linear" else math.pi / 2 * math.tan(math.pi / 2 * (1 - t))
        ce = F.cross_entropy(logits[b][anchor.masked[b]], x0[b][anchor.masked[b]], reduction="sum")
        per_sample.append(w * ce)
        counts.append(int(maskable[b].sum()))
    if normalization == "token":
        expected = sum(per_sample) / sum(counts)
    elif normalization == "sequence":  # mean over samples that have maskable tokens of sum / own count
        valid = [s / c for s, c in zip(per_sample, counts) if c > 0]
        expected = sum(valid) / len(valid)
    else:
        expected = sum(per_sample) / 4
    assert torch.allclose(loss, torch.as_tensor(expected, dtype=loss.dtype), rtol=1e-5)


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()])
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    alpha = lambda s: 1 - schedule.mask_prob(s)  # noqa: E731
    derivative = (alpha(t + h) - alpha(t - h)) / (2 * h)
    assert torch.allclose(schedule.weight(t), -derivative / (1 - alpha(t)), rtol=1e-6)


def test_anchor_masks_maskable_tokens_at_rate_mask_prob():
    outer = OuterLoop(ModelView(ToyBackbone(), ToyDLM(), MASK_ID))
    x0 = torch.randint(1, MASK_ID, (2000, 50), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :10] = False
    anchor = outer.sample_anchor(x0, maskable, torch.Generator().manual_seed(1))
    assert not bool(anchor.masked[:, :10].any())
    assert ((anchor.t >= 1e-3) & (anchor.t <= 1)).all()
    rate = anchor.masked[:, 10:].float().mean(1)
    assert (rate - anchor.t).abs().mean() < 0.06  # binomial noise with 40 draws per row
    assert torch.corrcoef(torch.stack([rate, anchor.t]))[0, 1] > 0.95
    assert torch.equal(anchor.input_ids, torch.where(anchor.masked, MASK_ID, x0))


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_cart_loss_equals_an_explicit_loop_over_the_geometric_context_weights(p):
    """w_i = 0.5 sum_{j unmasked} p (1 - p)^(|i - j| - 1) for each masked i, token-normalised (Dream's CART)."""
    model = ToyDLM()
    view = ModelView(ToyBackbone(), model, MASK_ID)
    outer = CARTObjective(view, OuterConfig(objective="cart", cart_p=p))
    raw = toy_batch(3, 12, prompt=3, seed=2)
    x0, maskable = raw["input_ids"], raw["labels"] != -100
    anchor = outer.sample_anchor(x0, maskable, torch.Generator().manual_seed(4))
    logits = model(anchor.input_ids)
    total = 0.0
    for b in range(3):
        for i in range(12):
            if anchor.masked[b, i]:
                weight = sum(0.5 * p * (1 - p) ** (abs(i - j) - 1) for j in range(12) if not anchor.masked[b, j])
                total += weight * F.cross_entropy(logits[b, i], x0[b, i]).item()
    expected = total / maskable.sum().item()
    assert outer.loss(x0, maskable, anchor).item() == pytest.approx(expected, rel=1e-5)
    assert not math.isclose(expected, OuterLoop(view).loss(x0, maskable, anchor).item(), rel_tol=1e-3)


def test_the_config_picks_the_objective():
    view = ModelView(ToyBackbone(), ToyDLM(), MASK_ID)
    assert type(make_objective(view, OuterConfig(objective="cart"))) is CARTObjective
    assert type(make_objective(view, OuterConfig())) is OuterLoop


def test_cart_weights_ignore_padding():
    """Padding is no clean context: a right-padded row has the loss terms of the row alone."""
    model = ToyDLM()
    outer = CARTObjective(ModelView(ToyBackbone(), model, MASK_ID), OuterConfig(objective="cart"))
    raw = toy_batch(1, 8, prompt=2, seed=3)
    x0, maskable = raw["input_ids"], raw["labels"] != -100
    masked = maskable & (torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    anchor = Anchor(t=masked.sum(1) / maskable.sum(1), masked=masked, input_ids=torch.where(masked, MASK_ID, x0))
    alone = outer.loss_terms(x0, maskable, anchor, torch.ones_like(x0))
    pad = lambda t, value: torch.cat([t, torch.full((1, 4), value, dtype=t.dtype)], 1)  # noqa: E731
    padded_anchor = Anchor(t=anchor.t, masked=pad(masked, False), input_ids=pad(anchor.input_ids, 0))
    padded = outer.loss_terms(pad(x0, 0), pad(maskable, False), padded_anchor, pad(torch.ones_like(x0), 0))
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-6, atol=1e-7)
    assert int(padded[1]) == int(alone[1])


def test_cart_refuses_a_weighting_it_would_ignore():
    with pytest.raises(ValueError, match="leave weighting='elbo' with CART"):
        OuterConfig(objective="cart", weighting="uniform")
