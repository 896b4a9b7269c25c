"""Outer objectives (the MDLM loss, and Dream's CART-weighted variant) and theta's optimizer.

The objective is computed at the anchor with whatever memory is bound. ``make_objective`` picks the
one named by ``OuterConfig.objective`` from :data:`OBJECTIVES`; any :class:`~bilevel_dlm.contracts.
OuterObjective` plugs into ``MemoryWrapper(outer=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import OuterConfig
from .contracts import OuterObjective
from .forward import ModelView
from .losses import weighted_mean
from .noise import Anchor, keyed_anchor, make_schedule, sample_anchor
from .rng import RandomSource
from .selection import Selection
from .trajectory import masked_fraction

__all__ = ["OuterLoop", "CARTObjective", "OBJECTIVES", "make_objective", "build_outer_optimizer", "warmup_schedule"]


class OuterLoop(OuterObjective):
    """Masked diffusion loss: sum over masked positions of w(t) CE(logits(x_t), x0), normalised by

    ``token``: the number of maskable tokens in the batch; ``sequence``: each sample's maskable count,
    then the mean over samples that have any; ``batch``: the batch size.
    """

    def __init__(self, view: ModelView, config: OuterConfig | None = None) -> None:
        self.view = view
        self.config = config or OuterConfig()
        self.schedule = make_schedule(self.config.schedule)

    def sample_anchor(self, x0: torch.Tensor, maskable: torch.Tensor, generator: RandomSource = None) -> Anchor:
        return sample_anchor(x0, maskable, self.schedule, self.view.mask_token_id, self.config.t_eps, generator)

    def keyed_anchor(self, x0: torch.Tensor, maskable: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> Anchor:
        """An anchor drawn from each example's own content (:func:`bilevel_dlm.noise.keyed_anchor`)."""
        return keyed_anchor(x0, maskable, attention_mask, self.schedule, self.view.mask_token_id, self.config.t_eps, seed)

    def loss_terms(
        self,
        x0: torch.Tensor,
        maskable: torch.Tensor,
        anchor: Anchor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(numerator, denominator) of the loss, so that sums over batches or processes give the exact
        loss of their union: weighted CE sum and maskable-token count (``token``), sum of per-sequence
        means and number of sequences with a maskable token (``sequence``), weighted CE sum and batch
        size (``batch``)."""
        select = Selection.of(anchor.masked)
        logits, _ = self.view.logits_at(select, anchor.input_ids, attention_mask, masked_fraction(anchor.masked, maskable))
        ce = F.cross_entropy(logits, select.take(x0), reduction="none")
        batch = x0.shape[0]
        weights = self.token_weights(anchor, select, attention_mask)
        one = torch.ones((), device=x0.device)
        if self.config.normalization == "sequence":
            numerator = weighted_mean(ce, weights, select.rows, batch, per_sample=True, denominator=maskable.sum(1))
        else:
            numerator = weighted_mean(ce, weights, select.rows, batch, per_sample=False, denominator=one)
        return numerator, self.denominator(maskable)

    def token_weights(self, anchor: Anchor, select: Selection, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weight [N] of each selected (masked) position: w(t) = -alpha'(t) / (1 - alpha(t)) of its
        sequence (``elbo``), or 1 (``uniform``)."""
        weight = self.schedule.weight(anchor.t) if self.config.weighting == "elbo" else torch.ones_like(anchor.t)
        return weight[select.rows]

    def denominator(self, maskable: torch.Tensor) -> torch.Tensor:
        """The normaliser of a batch: its maskable tokens (``token``), its sequences with a maskable
        token (``sequence``) or its samples (``batch``). Summed over micro-batches and processes, it is
        the normaliser of their union."""
        if self.config.normalization == "token":
            return maskable.sum()
        if self.config.normalization == "sequence":
            return maskable.any(1).sum()
        return torch.tensor(maskable.shape[0], device=maskable.device)


def warmup_schedule(kind: str, warmup: int, total: int | None):
    """The learning-rate factor per step: linear warmup over ``warmup`` steps, then ``cosine`` (half a
    cosine to 0 at ``total``), ``linear`` (to 0 at ``total``) or ``constant`` decay. The formulas are
    transformers' ``get_*_schedule_with_warmup``, so MemDLMTrainer's schedules match fit's; they are
    written here because importing transformers' optimisation module also imports PEFT and bitsandbytes."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant" or total is None:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)

    return factor


class CARTObjective(OuterLoop):
    """The MDLM loss with Dream's CART weights (context-adaptive token-level rescheduling, Dream SFT).

    A masked position i is weighted by how much clean context surrounds it instead of by 1/t:
    ``w_i = 0.5 * sum_{j unmasked, j != i} p (1 - p)^(|i - j| - 1)``, a geometric kernel in the distance to
    each unmasked, attended token (p = ``OuterConfig.cart_p``, 0.3 in the reference SFT; padding is no
    context). The weights replace the ELBO's, so ``weighting`` must stay ``elbo``; normalisation as configured.
    """

    def token_weights(self, anchor: Anchor, select: Selection, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise NotImplementedError("CART weights a token by its clean context along the row, which packed documents "
                                      "kept apart (document_ids) would cross; use objective='mdlm' for such batches")
        length = anchor.masked.shape[1]
        # The kernel as a function of the offset i - j in [-(L-1), L-1]: a convolution, O(L) memory.
        distance = torch.arange(1 - length, length, device=anchor.masked.device).abs()
        p = self.config.cart_p
        kernel = (0.5 * p * (1 - p) ** (distance - 1).clamp_min(0).double()).masked_fill(distance == 0, 0.0).float()
        context = ~anchor.masked if attention_mask is None else ~anchor.masked & attention_mask.bool()
        # [B, L]: sum over unmasked, attended j of kernel(i - j)
        weights = F.conv1d(context.float()[:, None], kernel[None, None], padding=length - 1)[:, 0]
        return select.take(weights)


OBJECTIVES: dict[str, type[OuterObjective]] = {"mdlm": OuterLoop, "cart": CARTObjective}


def make_objective(view: ModelView, config: OuterConfig) -> OuterObjective:
    """The outer objective named by ``config.objective``."""
    return OBJECTIVES[config.objective](view, config)


def build_outer_optimizer(
    params: Iterable[nn.Parameter], config: OuterConfig, max_steps: int | None,
    meta_parameters: Iterable[nn.Parameter] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on theta with the configured warmup + decay schedule over ``max_steps`` (``None``: the
    learning rate stays constant); the inner method's meta-parameters form a second group at
    ``config.meta_lr`` (default ``config.lr``) without weight decay, under the same schedule."""
    params = [p for p in params if p.requires_grad]
    meta = [p for p in meta_parameters if p.requires_grad]
    if not params and not meta:
        raise ValueError("the outer optimizer got no trainable parameters (all requires_grad=False)")
    groups = [{"params": params}] if params else []
    if meta:
        groups.append({"params": meta, "lr": config.meta_lr or config.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    warmup = 0 if max_steps is None else int(config.warmup_ratio * max_steps)
    factor = warmup_schedule(config.lr_schedule, warmup, max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
