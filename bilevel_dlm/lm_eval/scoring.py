"""The two scores of an lm-eval log-likelihood request for a masked diffusion model, as LLaDA's evaluation
computes them: the Monte Carlo ELBO over given masks, and the greedy check, both optionally with
classifier-free guidance.

With ``cfg_scale`` > 0 every forward is paired with one on the same input whose context positions are
masked (unconditional), and the logits are ``u + (cfg_scale + 1) (c - u)``. Fast weights bound by the
caller apply to both passes (as in the samplers' guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..forward import ModelView
from ..selection import Selection

__all__ = ["guided_logits", "monte_carlo_loglikelihood", "greedy_reproduces"]


def guided_logits(view: ModelView, select: Selection, inputs: torch.Tensor, context_length: int,
                  ratio: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Logits [N, V] at the selected positions of ``inputs`` [B, L] (``ratio`` [B]: the masked fraction,
    for models conditioned on time), classifier-free guided when ``cfg_scale`` > 0."""
    logits, _ = view.logits_at(select, inputs, None, ratio)
    if cfg_scale == 0:
        return logits
    unconditional = inputs.clone()
    unconditional[:, :context_length] = view.mask_token_id
    plain, _ = view.logits_at(select, unconditional, None, ratio)
    return plain + (cfg_scale + 1) * (logits - plain)


@torch.no_grad()
def monte_carlo_loglikelihood(view: ModelView, sequence: torch.Tensor, context_length: int,
                              draws: list[tuple[torch.Tensor, torch.Tensor]], cfg_scale: float = 0.0) -> float:
    """``-(1 / D) sum_d sum_{i masked in d} CE_i / p_d`` for ``sequence`` [L] (context, then continuation)
    over the draws: groups of masks [b, L] (one forward each) and masked fractions p [b]; D counts every row."""
    total, rows = 0.0, 0
    for masks, ratio in draws:
        masks, ratio = masks.to(sequence.device), ratio.to(sequence.device)
        inputs = torch.where(masks, view.mask_token_id, sequence)
        select = Selection.of(masks)
        logits = guided_logits(view, select, inputs, context_length, ratio, cfg_scale)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: CE in float32
        ce = F.cross_entropy(logits, select.take(sequence.expand_as(inputs)), reduction="none")
        total += float((ce / ratio[select.rows]).sum())
        rows += masks.shape[0]
    return -total / rows


@torch.no_grad()
def greedy_reproduces(view: ModelView, sequence: torch.Tensor, context_length: int, cfg_scale: float = 0.0) -> bool:
    """LLaDA's ``suffix_greedy_prediction``: from the continuation fully masked, reveal one token per step,
    the argmax at the most confident masked position; True when the result is the continuation."""
    canvas = sequence.clone()
    canvas[context_length:] = view.mask_token_id
    target_length = sequence.shape[0] - context_length
    for _ in range(target_length):
        masked = (canvas == view.mask_token_id)[None]
        masked[:, :context_length] = False
        select = Selection.of(masked)
        ratio = masked.sum(1).float() / target_length
        logits = guided_logits(view, select, canvas[None], context_length, ratio, cfg_scale)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        confidence, proposal = logits.softmax(-1).max(-1)
        best = int(confidence.argmax())
        canvas[select.columns[best]] = proposal[best]
    return bool(torch.equal(canvas, sequence))
