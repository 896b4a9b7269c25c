"""Noise schedules of the masked diffusion forward process and the anchor (t, A, x_t) they produce.

alpha(t) is the probability that a token is still clean at time t; every maskable token is masked
independently with probability 1 - alpha(t). The ELBO weight is w(t) = -alpha'(t) / (1 - alpha(t)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rng import RandomSource, content_keys, keyed_uniform, row_uniform, uniform

__all__ = ["NoiseSchedule", "LinearSchedule", "CosineSchedule", "make_schedule", "Anchor", "sample_anchor",
           "anchor_from_draws", "keyed_anchor"]


class NoiseSchedule:
    """Base class: ``mask_prob(t)`` = 1 - alpha(t) and ``weight(t)`` = -alpha'(t) / (1 - alpha(t))."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t: mask probability t, weight 1/t."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t


class CosineSchedule(NoiseSchedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)): mask probability cos(pi/2 (1 - t)), weight pi/2 tan(pi/2 (1 - t))."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(math.pi / 2 * (1 - t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return math.pi / 2 * torch.tan(math.pi / 2 * (1 - t))


def make_schedule(name: str) -> NoiseSchedule:
    schedules = {"linear": LinearSchedule, "cosine": CosineSchedule}
    if name not in schedules:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(schedules)}")
    return schedules[name]()


@dataclass(frozen=True)
class Anchor:
    """One noised batch: time t [B], masked set [B, L] (bool) and the noised input x_t [B, L]."""

    t: torch.Tensor
    masked: torch.Tensor
    input_ids: torch.Tensor


def anchor_from_draws(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    schedule: NoiseSchedule,
    mask_token_id: int,
    t_eps: float,
    t_draw: torch.Tensor,
    mask_draws: torch.Tensor,
) -> Anchor:
    """t = t_eps + (1 - t_eps) u per sequence; a maskable token is masked where its draw < 1 - alpha(t)."""
    t = t_eps + (1 - t_eps) * t_draw
    masked = maskable & (mask_draws < schedule.mask_prob(t)[:, None])
    return Anchor(t=t, masked=masked, input_ids=torch.where(masked, mask_token_id, x0))


def sample_anchor(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    schedule: NoiseSchedule,
    mask_token_id: int,
    t_eps: float,
    generator: RandomSource = None,
) -> Anchor:
    """t ~ U(t_eps, 1) per sequence; each maskable token masked with probability 1 - alpha(t) (draws from
    ``generator``: a torch.Generator, or a :class:`~bilevel_dlm.rng.KeyedRandom` keyed by example)."""
    t_draw = row_uniform(x0.shape[0], 1, generator, x0.device)[:, 0]
    draws = uniform(x0.shape, generator, x0.device)
    return anchor_from_draws(x0, maskable, schedule, mask_token_id, t_eps, t_draw, draws)


def keyed_anchor(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    attention_mask: torch.Tensor,
    schedule: NoiseSchedule,
    mask_token_id: int,
    t_eps: float,
    seed: int,
) -> Anchor:
    """An anchor whose draws depend only on (seed, the example's real tokens, the position among them).

    Used for evaluation: an example gets the same t and mask whatever batch, padding, data order or
    process it is scored in, so aggregate losses are independent of the batching.
    """
    keys = content_keys(x0, attention_mask)
    positions = attention_mask.long().cumsum(1) - 1
    t_draw = keyed_uniform(seed, keys, torch.full_like(keys[:, None], -1))[:, 0]
    draws = keyed_uniform(seed, keys, positions)
    dtype = torch.float32
    return anchor_from_draws(x0, maskable, schedule, mask_token_id, t_eps, t_draw.to(dtype), draws.to(dtype))
