"""Inner optimizers: functional, differentiable gradient transformations (torchopt's init/update API).

Any ``torchopt.base.GradientTransformation`` plugs into the inner loop. This module adds the paper's
per-tensor ("local") clipping, the presets, and MetaSGD (per-tensor learning rates learned by the
outer optimizer through unrolled inner updates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchopt
from torch import nn
from torchopt.base import EmptyState, GradientTransformation

from .config import InnerConfig

__all__ = ["per_tensor_clip", "sgd", "adam", "MetaSGD", "build_inner_optimizer"]


def _matrix_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two dims: per tensor for shared memory, per sample and tensor
    for per-sample memory (leading batch dim), so each sample is clipped as if it were alone."""
    return torch.linalg.vector_norm(tensor, dim=(-2, -1), keepdim=True)


def per_tensor_clip(max_norm: float) -> GradientTransformation:
    """Scale each gradient tensor g by min(1, max_norm / ||g||) (the paper's local clipping)."""
    if max_norm <= 0:
        raise ValueError(f"per_tensor_clip needs max_norm > 0, got {max_norm}")

    def init_fn(params):
        return EmptyState()

    def update_fn(updates, state, *, params=None, inplace=True):
        clipped = tuple(
            g * torch.clamp(max_norm / _matrix_norm(g).clamp_min(1e-12), max=1.0) for g in updates
        )
        return clipped, state

    return GradientTransformation(init_fn, update_fn)


def sgd(lr: float = 0.1, clip: float | None = 1.0) -> GradientTransformation:
    """The MemDLM preset: per-tensor clip ``clip`` then plain SGD with learning rate ``lr``."""
    steps = [per_tensor_clip(clip)] if clip is not None else []
    return torchopt.chain(*steps, torchopt.sgd(lr))


def adam(lr: float = 1e-2, clip: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
         eps_root: float = 0.0) -> GradientTransformation:
    """Adam on the fast weights (state re-initialised every batch), optional per-tensor clip first.

    ``eps_root`` is added inside the square root of the second moment. Differentiating through an
    update (unrolled mode) needs it > 0: d sqrt(v) / dv is infinite at v = 0, which a fast weight whose
    gradient is still zero (LoRA's A while B = 0) has, and the outer gradient becomes NaN.
    """
    steps = [per_tensor_clip(clip)] if clip is not None else []
    return torchopt.chain(*steps, torchopt.adam(lr, betas=betas, eps_root=eps_root))


# eps_root of Adam when the inner loop is differentiated through (see ``adam``).
UNROLLED_ADAM_EPS_ROOT = 1e-16


class MetaSGD(nn.Module):
    """SGD with one learned learning rate per fast-weight tensor (Li et al., 2017).

    The rates are stored as logs (always positive) and are ordinary parameters: give them to the
    outer optimizer and run the inner loop in ``unrolled`` mode so they receive gradients.
    """

    def __init__(self, names: Sequence[str], lr: float = 0.1, clip: float | None = 1.0) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"MetaSGD needs an initial lr > 0 (it learns log-rates), got {lr}")
        self.names = tuple(names)
        self.log_lr = nn.Parameter(torch.full((len(self.names),), math.log(lr), dtype=torch.float32))
        self.clip = clip

    @property
    def lrs(self) -> torch.Tensor:
        return self.log_lr.exp()

    def transformation(self) -> GradientTransformation:
        """A GradientTransformation reading the current learned rates."""
        clip = per_tensor_clip(self.clip) if self.clip is not None else None

        def init_fn(params):
            if len(params) != len(self.names):
                raise ValueError(f"MetaSGD was built for {len(self.names)} tensors, got {len(params)}")
            return EmptyState()

        def update_fn(updates, state, *, params=None, inplace=True):
            if clip is not None:
                updates, _ = clip.update(updates, state)
            lrs = self.lrs.to(updates[0].device)
            return tuple(-lrs[i] * g for i, g in enumerate(updates)), state

        return GradientTransformation(init_fn, update_fn)


def build_inner_optimizer(config: InnerConfig, names: Sequence[str]) -> GradientTransformation | MetaSGD:
    """The inner optimizer named in the config (``metasgd`` returns the module holding the rates)."""
    if config.optimizer == "sgd":
        return sgd(config.lr, config.clip)
    if config.optimizer == "adam":
        return adam(config.lr, config.clip, eps_root=UNROLLED_ADAM_EPS_ROOT if config.mode == "unrolled" else 0.0)
    if config.optimizer == "metasgd":
        return MetaSGD(names, config.lr, config.clip)
    raise ValueError(f"unknown inner optimizer {config.optimizer!r}")
