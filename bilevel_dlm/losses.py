"""Token losses and their reduction over a batch.

All losses work on the selected rows only ([N, V] logits or [N, d] hidden states, ``rows`` [N] giving
each row's sample index) and are reduced in one of two ways: over the whole batch (shared memory:
one gradient for everybody) or per sample and then summed (per-sample memory: sample b's fast
weights see exactly the loss they would see alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["token_loss", "weighted_mean", "INNER_LOSSES", "TEACHER_SMOOTHING"]

INNER_LOSSES = ("ce", "kl", "reverse_kl", "hidden_mse", "hidden_cosine")

# reverse_kl compares the student with the teacher mixed with this much of the uniform distribution.
TEACHER_SMOOTHING = 1e-6


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities. Terms with p = 0 (log p = -inf) count as 0, with a zero
    gradient (their logs are replaced before any arithmetic, so no inf - inf reaches the backward); a NaN
    anywhere stays NaN (it must reach the non-finite guard, not be reported as a zero loss)."""
    empty = p_log == float("-inf")
    return (p_log.exp() * (p_log.masked_fill(empty, 0.0) - q_log.masked_fill(empty, 0.0))).sum(-1)


def _smoothed(log_probs: torch.Tensor, weight: float = TEACHER_SMOOTHING) -> torch.Tensor:
    """log((1 - w) q + w / V): a distribution with full support, even where q is one-hot."""
    uniform = torch.full_like(log_probs, math.log(weight / log_probs.shape[-1]))
    return torch.logaddexp(log_probs + math.log1p(-weight), uniform)


def token_loss(
    kind: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    hidden: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss [N] of the given kind (see MEMDLM.md section 3 for the variants).

    ``ce``: CE against ``targets``. ``kl``: KL(teacher || student). ``reverse_kl``: KL(student || teacher'),
    teacher' = the teacher mixed with ``TEACHER_SMOOTHING`` of the uniform distribution, so the loss is
    finite where the teacher is one-hot (MDLM's SUBS carries a revealed token over with probability 1;
    plain KL(student || one-hot) is infinite). ``hidden_mse`` / ``hidden_cosine``: on final hidden states.
    """
    if kind == "ce":
        return F.cross_entropy(logits, targets, reduction="none")
    if kind in ("kl", "reverse_kl"):
        student, teacher = logits.log_softmax(-1), teacher_logits.log_softmax(-1)
        return _kl(teacher, student) if kind == "kl" else _kl(student, _smoothed(teacher))
    if kind == "hidden_mse":
        return (hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    if kind == "hidden_cosine":
        return 1.0 - F.cosine_similarity(hidden.float(), teacher_hidden.float(), dim=-1)
    raise ValueError(f"unknown loss {kind!r}; choose one of {INNER_LOSSES}")


def weighted_mean(
    values: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
    per_sample: bool,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(w * values) / count, over the batch or per sample (then summed over samples).

    ``denominator`` overrides the count: a scalar for batch reduction, [B] for per-sample reduction
    (default: the number of selected rows, in total or per sample).
    """
    weighted = weights * values
    if not per_sample:
        count = denominator if denominator is not None else torch.tensor(values.shape[0], device=values.device)
        return weighted.sum() / count.clamp_min(1)
    per_row = torch.zeros(batch_size, device=values.device, dtype=weighted.dtype).index_add(0, rows, weighted)
    if denominator is None:  # index_add, not bincount: bincount's output size needs a host sync
        denominator = torch.zeros_like(per_row).index_add(0, rows, torch.ones_like(weighted))
    return (per_row / denominator.clamp_min(1)).sum()
