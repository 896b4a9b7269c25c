"""OuterLoop: the MDLM objective at the anchor (with whatever memory is bound) and theta's optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import OuterConfig
from .forward import ModelView
from .losses import weighted_mean
from .noise import Anchor, keyed_anchor, make_schedule, sample_anchor
from .selection import Selection
from .trajectory import masked_fraction

__all__ = ["OuterLoop", "build_outer_optimizer"]


class OuterLoop:
    """Masked diffusion loss: sum over masked positions of w(t) CE(logits(x_t), x0), normalised by

    ``token``: the number of maskable tokens in the batch; ``sequence``: each sample's maskable count,
    then the mean over samples that have any; ``batch``: the batch size.
    """

    def __init__(self, view: ModelView, config: OuterConfig | None = None) -> None:
        self.view = view
        self.config = config or OuterConfig()
        self.schedule = make_schedule(self.config.schedule)

    def sample_anchor(self, x0: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator | None = None) -> Anchor:
        return sample_anchor(x0, maskable, self.schedule, self.view.mask_token_id, self.config.t_eps, generator)

    def keyed_anchor(self, x0: torch.Tensor, maskable: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> Anchor:
        """An anchor drawn from each example's own content (:func:`bilevel_dlm.noise.keyed_anchor`)."""
        return keyed_anchor(x0, maskable, attention_mask, self.schedule, self.view.mask_token_id, self.config.t_eps, seed)

    def loss(
        self,
        x0: torch.Tensor,
        maskable: torch.Tensor,
        anchor: Anchor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The normalised loss of the batch (``numerator / denominator`` of :meth:`loss_terms`)."""
        numerator, denominator = self.loss_terms(x0, maskable, anchor, attention_mask)
        return numerator / denominator.clamp_min(1)

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
        weight = self.schedule.weight(anchor.t) if self.config.weighting == "elbo" else torch.ones_like(anchor.t)
        weights = weight[select.rows]
        one = torch.ones((), device=x0.device)
        if self.config.normalization == "sequence":
            numerator = weighted_mean(ce, weights, select.rows, batch, per_sample=True, denominator=maskable.sum(1))
        else:
            numerator = weighted_mean(ce, weights, select.rows, batch, per_sample=False, denominator=one)
        return numerator, self.denominator(maskable)

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


def build_outer_optimizer(
    params: Iterable[nn.Parameter], config: OuterConfig, max_steps: int | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on theta (plus any meta-parameters) with the configured warmup + decay schedule over
    ``max_steps``; without a horizon (``None``) the learning rate stays constant."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the outer optimizer got no trainable parameters (all requires_grad=False)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    warmup = 0 if max_steps is None else int(config.warmup_ratio * max_steps)
    factor = warmup_schedule(config.lr_schedule, warmup, max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
