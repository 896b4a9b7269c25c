"""Trajectory simulators: mask algebra checked over many random cases (hypothesis)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel_dlm.noise import Anchor
from bilevel_dlm.trajectory import AnchorConsistent, AnchorOnly, PreAnchorOnly, Progressive, pre_anchor_mask, random_subset

MASK = 99


@st.composite
def masked_batches(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    maskable = torch.rand(batch, length, generator=g) < draw(st.floats(0.0, 1.0))
    anchor = maskable & (torch.rand(batch, length, generator=g) < draw(st.floats(0.0, 1.0)))
    x0 = torch.randint(0, MASK, (batch, length), generator=g)
    return x0, maskable, anchor, g


def _anchor(x0, anchor_mask):
    return Anchor(t=torch.rand(x0.shape[0]), masked=anchor_mask, input_ids=torch.where(anchor_mask, MASK, x0))


@settings(max_examples=250, deadline=None)
@given(masked_batches(), st.floats(1.0, 3.0))
def test_pre_anchor_is_superset_with_the_documented_count(case, s_pre):
    x0, maskable, anchor, g = case
    pre = pre_anchor_mask(anchor, maskable, s_pre, g)
    assert not bool((anchor & ~pre).any()), "pre-anchor must contain the anchor"
    assert not bool((pre & ~maskable).any()), "pre-anchor touched a prompt / non-maskable position"
    for b in range(x0.shape[0]):
        m, a = int(maskable[b].sum()), int(anchor[b].sum())
        r = a / m if m else 0.0
        expected = a + max(0, math.floor(m * min(1.0, max(s_pre * r, r))) - a)
        assert int(pre[b].sum()) == expected


@settings(max_examples=250, deadline=None)
@given(masked_batches(), st.integers(2, 5), st.sampled_from(["broad", "newly_revealed"]))
def test_anchor_consistent_stages(case, steps, targets):
    x0, maskable, anchor, g = case
    stages = AnchorConsistent(1.5, targets)(x0, maskable, _anchor(x0, anchor), steps, MASK, g)
    assert len(stages) == steps
    assert torch.equal(stages[-1].masked, anchor) and stages[-1].is_anchor
    assert not any(s.is_anchor for s in stages[:-1])
    for earlier, later in zip(stages, stages[1:]):
        assert not bool((later.masked & ~earlier.masked).any()), "stages must reveal, never re-mask"
    n_maskable = maskable.sum(1).clamp_min(1)
    for stage in stages:
        assert not bool((stage.masked & ~maskable).any())
        assert torch.equal(stage.input_ids, torch.where(stage.masked, MASK, x0))
        assert torch.allclose(stage.t, stage.masked.sum(1) / n_maskable)
    expected_first = stages[0].masked & ~anchor if targets == "newly_revealed" else stages[0].masked
    assert torch.equal(stages[0].supervised, expected_first)
    for stage in stages[1:]:
        assert torch.equal(stage.supervised, stage.masked)
    # revealing is about even: consecutive stages differ in size by floor-spaced counts
    extra = (stages[0].masked & ~anchor).sum(1)
    for k, stage in enumerate(stages):
        assert torch.equal((stage.masked & ~anchor).sum(1), torch.div(extra * (steps - 1 - k), steps - 1, rounding_mode="floor"))


@settings(max_examples=200, deadline=None)
@given(masked_batches(), st.integers(1, 4))
def test_progressive_is_nested_and_unrelated_to_the_anchor(case, steps):
    x0, maskable, anchor, g = case
    stages = Progressive(0.8, 0.2)(x0, maskable, _anchor(x0, anchor), steps, MASK, g)
    ratios = [0.8 + (0.2 - 0.8) * k / max(steps - 1, 1) for k in range(steps)]
    for stage, ratio in zip(stages, ratios):
        assert torch.equal(stage.masked.sum(1), torch.floor(maskable.sum(1).double() * ratio).long())
        assert not bool((stage.masked & ~maskable).any())
        assert not stage.is_anchor
    for earlier, later in zip(stages, stages[1:]):
        assert not bool((later.masked & ~earlier.masked).any())


@settings(max_examples=200, deadline=None)
@given(masked_batches(), st.integers(1, 3))
def test_single_stage_ablations_repeat_their_stage(case, steps):
    x0, maskable, anchor, g = case
    a = _anchor(x0, anchor)
    only_anchor = AnchorOnly()(x0, maskable, a, steps, MASK, g)
    assert len(only_anchor) == steps and all(torch.equal(s.masked, anchor) and s.is_anchor for s in only_anchor)
    only_pre = PreAnchorOnly(1.5)(x0, maskable, a, steps, MASK, g)
    assert len(only_pre) == steps
    assert all(not bool((anchor & ~s.masked).any()) for s in only_pre)


@settings(max_examples=200, deadline=None)
@given(masked_batches(), st.integers(0, 30))
def test_random_subset_counts(case, want):
    x0, maskable, _, g = case
    counts = torch.full((x0.shape[0],), want)
    chosen = random_subset(maskable, counts, g)
    assert not bool((chosen & ~maskable).any())
    assert torch.equal(chosen.sum(1), torch.minimum(counts, maskable.sum(1)))


def test_random_subset_is_uniform():
    """Each of 5 candidates is picked about 2/5 of the time when choosing 2."""
    g = torch.Generator().manual_seed(0)
    candidates = torch.tensor([[True, False, True, True, False, True, True]]).expand(4000, 7)
    freq = random_subset(candidates, torch.full((4000,), 2), g).float().mean(0)
    assert torch.allclose(freq[candidates[0]], torch.full((5,), 0.4), atol=0.03)
    assert freq[~candidates[0]].sum() == 0
