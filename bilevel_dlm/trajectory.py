"""Trajectory simulators: the inner loop's stages, built from the clean batch and the outer anchor.

A stage is one point on a simulated denoising trajectory: an input with some positions masked, the
positions that are supervised, and the per-sample time t_k (the masked fraction of the maskable
positions). Everything is vectorised over the batch and drawn from an explicit random source (a ``torch.Generator``, or
in training a :class:`~bilevel_dlm.rng.KeyedRandom` keyed by example; see :mod:`bilevel_dlm.rng`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import Anchor
from .rng import RandomSource, uniform

__all__ = [
    "Stage",
    "TrajectorySimulator",
    "AnchorConsistent",
    "PreAnchorOnly",
    "AnchorOnly",
    "Progressive",
    "random_ranks",
    "random_subset",
    "pre_anchor_mask",
    "make_simulator",
]


@dataclass(frozen=True)
class Stage:
    """Input [B, L], masked and supervised positions [B, L] (bool), time t [B].

    ``is_anchor`` marks a stage whose input is exactly the outer anchor's x_t (its early blocks can be
    shared with the outer pass).
    """

    input_ids: torch.Tensor
    masked: torch.Tensor
    supervised: torch.Tensor
    t: torch.Tensor
    is_anchor: bool = False


def masked_fraction(masked: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Per-sample |masked| / |maskable| (0 for rows without maskable positions)."""
    return masked.sum(1) / maskable.sum(1).clamp_min(1)


def random_ranks(candidates: torch.Tensor, generator: RandomSource) -> torch.Tensor:
    """A uniformly random order of each row's candidate positions: rank [B, L], candidates first."""
    keys = uniform(candidates.shape, generator, candidates.device)
    return keys.masked_fill(~candidates, 2.0).argsort(dim=1).argsort(dim=1)


def random_subset(candidates: torch.Tensor, counts: torch.Tensor, generator: RandomSource) -> torch.Tensor:
    """Per row, ``counts[b]`` positions drawn uniformly without replacement from ``candidates[b]``
    (vectorised: no Python loop over rows, no host sync)."""
    return candidates & (random_ranks(candidates, generator) < counts[:, None])


def pre_anchor_mask(
    anchor_masked: torch.Tensor, maskable: torch.Tensor, s_pre: float, generator: RandomSource
) -> torch.Tensor:
    """Superset P of the anchor: |P| = max(|A|, floor(|M| * min(1, max(s_pre * r, r)))), r = |A| / |M|."""
    n_maskable = maskable.sum(1).double()
    n_anchor = anchor_masked.sum(1).double()
    ratio = n_anchor / n_maskable.clamp_min(1)
    ratio_pre = torch.clamp(torch.maximum(s_pre * ratio, ratio), max=1.0)
    extra = (torch.floor(n_maskable * ratio_pre) - n_anchor).clamp_min(0).long()
    return anchor_masked | random_subset(maskable & ~anchor_masked, extra, generator)


def _stage(x0: torch.Tensor, masked: torch.Tensor, supervised: torch.Tensor, maskable: torch.Tensor,
           mask_token_id: int, is_anchor: bool = False) -> Stage:
    return Stage(
        input_ids=torch.where(masked, mask_token_id, x0),
        masked=masked,
        supervised=supervised,
        t=masked_fraction(masked, maskable),
        is_anchor=is_anchor,
    )


class TrajectorySimulator:
    """Base class. ``__call__`` returns exactly ``steps`` stages; subclass and implement it.

    :meth:`teacher_inputs` gives the teacher's input of each stage for the teacher-based inner losses
    (``kl``, ``reverse_kl``, ``hidden_*``): by default the next, less masked stage, and the clean x0
    for the last one. A simulator whose stages do not get less masked must override it.
    """

    def teacher_inputs(self, stages: list[Stage], x0: torch.Tensor) -> list[torch.Tensor]:
        return [stage.input_ids for stage in stages[1:]] + [x0]

    def __call__(
        self,
        x0: torch.Tensor,
        maskable: torch.Tensor,
        anchor: Anchor,
        steps: int,
        mask_token_id: int,
        generator: RandomSource = None,
    ) -> list[Stage]:
        raise NotImplementedError


class AnchorConsistent(TrajectorySimulator):
    """MemDLM's default: pre-anchor P ⊇ A, then (K > 2) evenly revealing P \\ A, ending exactly at A.

    Stage 1 supervises every position of P ("broad", the reference default) or only P \\ A
    ("newly_revealed", the paper's Eq. 7). Later stages supervise their own masked set.
    """

    def __init__(self, s_pre: float = 1.5, stage1_targets: str = "broad") -> None:
        if stage1_targets not in ("broad", "newly_revealed"):
            raise ValueError(f"stage1_targets must be 'broad' or 'newly_revealed', got {stage1_targets!r}")
        self.s_pre = s_pre
        self.stage1_targets = stage1_targets

    def __call__(self, x0, maskable, anchor, steps, mask_token_id, generator=None):
        if steps < 2:
            raise ValueError("the anchor-consistent trajectory needs steps >= 2 (pre-anchor, ..., anchor)")
        pre = pre_anchor_mask(anchor.masked, maskable, self.s_pre, generator)
        extra = pre & ~anchor.masked
        # Reveal order of the extra positions: a random rank per row; stage k keeps the first n_k masked.
        ranks = random_ranks(extra, generator)
        n_extra = extra.sum(1)
        stages = []
        for k in range(steps):
            keep = torch.div(n_extra * (steps - 1 - k), steps - 1, rounding_mode="floor")
            masked = anchor.masked | (extra & (ranks < keep[:, None]))
            supervised = extra if (k == 0 and self.stage1_targets == "newly_revealed") else masked
            stages.append(_stage(x0, masked, supervised, maskable, mask_token_id, is_anchor=k == steps - 1))
        return stages


class PreAnchorOnly(TrajectorySimulator):
    """Ablation: every step on the pre-anchor state (stage 1 only)."""

    def __init__(self, s_pre: float = 1.5, stage1_targets: str = "broad") -> None:
        self._consistent = AnchorConsistent(s_pre, stage1_targets)

    def __call__(self, x0, maskable, anchor, steps, mask_token_id, generator=None):
        first = self._consistent(x0, maskable, anchor, 2, mask_token_id, generator)[0]
        return [first] * steps

    def teacher_inputs(self, stages, x0):
        """Every stage is the same state, so its teacher is the clean x0."""
        return [x0] * len(stages)


class AnchorOnly(TrajectorySimulator):
    """Ablation (reference name "no_progressive"): every step on the anchor itself (stage 2 only)."""

    def __call__(self, x0, maskable, anchor, steps, mask_token_id, generator=None):
        stage = Stage(anchor.input_ids, anchor.masked, anchor.masked, masked_fraction(anchor.masked, maskable), True)
        return [stage] * steps

    def teacher_inputs(self, stages, x0):
        """Every stage is the anchor itself, so its teacher is the clean x0."""
        return [x0] * len(stages)


class Progressive(TrajectorySimulator):
    """The inconsistent ablation ("progressive_memory"): its own nested masks, unrelated to the anchor,
    with mask ratio annealed linearly from ``start`` to ``end`` over the K steps."""

    def __init__(self, start: float = 0.8, end: float = 0.2) -> None:
        self.start, self.end = start, end

    def __call__(self, x0, maskable, anchor, steps, mask_token_id, generator=None):
        ranks = random_ranks(maskable, generator)
        n_maskable = maskable.sum(1).double()
        ratios = [self.start + (self.end - self.start) * k / max(steps - 1, 1) for k in range(steps)]
        stages = []
        for ratio in ratios:
            count = torch.floor(n_maskable * ratio).long()
            masked = maskable & (ranks < count[:, None])
            stages.append(_stage(x0, masked, masked, maskable, mask_token_id))
        return stages


def make_simulator(kind: str, s_pre: float = 1.5, stage1_targets: str = "broad",
                   progressive_start: float = 0.8, progressive_end: float = 0.2) -> TrajectorySimulator:
    """Build a simulator from its config name."""
    if kind == "anchor_consistent":
        return AnchorConsistent(s_pre, stage1_targets)
    if kind == "pre_only":
        return PreAnchorOnly(s_pre, stage1_targets)
    if kind == "anchor_only":
        return AnchorOnly()
    if kind == "progressive":
        return Progressive(progressive_start, progressive_end)
    raise ValueError(f"unknown trajectory {kind!r}; choose anchor_consistent, pre_only, anchor_only or progressive")
