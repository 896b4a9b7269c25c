"""Exposure bias of iterative denoising: R_EB(step) = L_seq / L_static (MEMDLM.md section 7).

Starting from a fully masked response, the model commits its own argmax predictions a few positions
per step (most-confident first, or in random order). After each step, with the set S of positions
still masked:

- L_seq: CE at S of the model run on the canvas holding its OWN committed predictions;
- L_static: CE at the same S of the model run on the canvas holding the GROUND TRUTH elsewhere.

Both losses use the same masked positions, so the ratio isolates the effect of conditioning on
self-generated context; with random commit order S is a uniformly random subset (the usual static
loss), while confidence order leaves the hardest tokens masked in both losses alike. A model whose
predictions ignore its input has R_EB = 1 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .forward import ModelView
from .rng import RandomSource, uniform
from .selection import Selection

__all__ = ["ExposureBias", "exposure_bias"]


@dataclass
class ExposureBias:
    """Per commit step k = 1..steps-1: remaining mask ratio, L_seq, L_static and their ratio."""

    mask_ratio: list[float]
    seq_loss: list[float]
    static_loss: list[float]

    @property
    def ratio(self) -> list[float]:
        return [seq / static for seq, static in zip(self.seq_loss, self.static_loss)]


def _masked_ce(view: ModelView, canvas: torch.Tensor, select: torch.Tensor, x0: torch.Tensor,
               attention_mask: torch.Tensor | None, ratio: torch.Tensor) -> torch.Tensor:
    selection = Selection.of(select)
    logits, _ = view.logits_at(selection, canvas, attention_mask, ratio)
    return F.cross_entropy(logits, selection.take(x0), reduction="sum")


@torch.no_grad()
def exposure_bias(
    view: ModelView,
    x0: torch.Tensor,
    response: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int = 8,
    order: str = "confidence",
    generator: RandomSource = None,
) -> ExposureBias:
    """R_EB curve on a batch: ``x0`` [B, L] ground truth, ``response`` [B, L] bool (the positions to
    generate; everything else is context). ``steps`` commit steps reveal the response about evenly."""
    if order not in ("confidence", "random"):
        raise ValueError(f"order must be 'confidence' or 'random', got {order!r}")
    if steps < 2:
        raise ValueError("exposure_bias needs steps >= 2")
    mask_id = view.mask_token_id
    n_response = response.sum(1)
    canvas = torch.where(response, mask_id, x0)
    still = response.clone()
    result = ExposureBias([], [], [])
    for k in range(1, steps):
        ratio = still.sum(1) / n_response.clamp_min(1)
        logits = view.logits(canvas, attention_mask, ratio)
        probs, predictions = logits.softmax(-1).max(-1)
        keys = probs if order == "confidence" else uniform(x0.shape, generator, x0.device)
        keys = keys.masked_fill(~still, -1.0)
        target_left = n_response - torch.div(n_response * k, steps, rounding_mode="floor")
        n_commit = still.sum(1) - target_left
        ranks = keys.argsort(dim=1, descending=True).argsort(dim=1)
        commit = still & (ranks < n_commit[:, None])
        canvas = torch.where(commit, predictions, canvas)
        still = still & ~commit
        count = still.sum()
        if int(count) == 0:
            break
        ratio = still.sum(1) / n_response.clamp_min(1)
        truth_canvas = torch.where(still, mask_id, x0)
        result.mask_ratio.append(float(still.sum() / response.sum()))
        result.seq_loss.append(float(_masked_ce(view, canvas, still, x0, attention_mask, ratio) / count))
        result.static_loss.append(float(_masked_ce(view, truth_canvas, still, x0, attention_mask, ratio) / count))
    return result
