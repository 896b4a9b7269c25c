"""Token losses and their reduction over a batch.

All losses work on the selected rows only ([N, V] logits or [N, d] hidden states, ``rows`` [N] giving
each row's sample index) and are reduced in one of two ways: over the whole batch (shared memory:
one gradient for everybody) or per sample and then summed (per-sample memory: sample b's fast
weights see exactly the loss they would see alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_loss", "weighted_mean", "selected_rows", "INNER_LOSSES"]

INNER_LOSSES = ("ce", "kl", "reverse_kl", "hidden_mse", "hidden_cosine")


def selected_rows(select: torch.Tensor) -> torch.Tensor:
    """Sample index [N] of every position selected by the bool mask ``select`` [B, L] (row-major order,
    the order of ``tensor[select]``)."""
    return torch.arange(select.shape[0], device=select.device)[:, None].expand_as(select)[select]


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; 0 * log 0 terms (including -inf) count as 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def token_loss(
    kind: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    hidden: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss [N] of the given kind (see MEMDLM.md section 3 for the variants)."""
    if kind == "ce":
        return F.cross_entropy(logits, targets, reduction="none")
    if kind in ("kl", "reverse_kl"):
        student, teacher = logits.log_softmax(-1), teacher_logits.log_softmax(-1)
        return _kl(teacher, student) if kind == "kl" else _kl(student, teacher)
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
    if denominator is None:
        denominator = torch.bincount(rows, minlength=batch_size)
    return (per_row / denominator.clamp_min(1)).sum()
