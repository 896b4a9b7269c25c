"""The MDLM evaluation loss with memory off or adapted on each prompt, as an exact aggregate over the data
(summable terms, so shards on several processes add up to the whole set's loss). ``MemoryWrapper.eval_loss``
is :func:`eval_loss`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch

from .adaptation import adapt_positions
from .data import iterate_batches, leading_real_tokens
from .engine import Engine

__all__ = ["EVAL_SEED", "eval_loss", "eval_loss_terms", "loss_from_terms"]

EVAL_SEED = 1234  # the default seed of evaluation anchors


@torch.no_grad()
def eval_loss(
    wrapper: Engine,
    data: Iterable[Mapping[str, Any]],
    memory: str = "off",
    *,
    batch_size: int = 8,
    seed: int = EVAL_SEED,
) -> float:
    """MDLM loss on ``data`` with memory ``off`` or adapted on each sample's ``prompt``.

    The loss is the configured normalisation over the whole data set (``token``: weighted CE summed
    over every example, divided by the number of maskable tokens), not a mean of batch means. Each
    example's anchor is drawn from its own tokens and ``seed`` (identical in both modes), so the
    value does not depend on the batch size, the order or the padding. Memory is never adapted on
    the tokens it scores: with ``prompt`` it adapts on the prompt positions alone (responses hidden
    from attention), then scores the response.
    """
    return loss_from_terms(eval_loss_terms(wrapper, data, memory, batch_size=batch_size, seed=seed), seed)

@torch.no_grad()
def eval_loss_terms(
    wrapper: Engine,
    data: Iterable[Mapping[str, Any]],
    memory: str = "off",
    *,
    batch_size: int = 8,
    seed: int = EVAL_SEED,
) -> torch.Tensor:
    """(numerator, denominator, masked tokens) [3] of :func:`eval_loss`, summed over the data: add the
    terms of several shards (processes) and give them to :func:`loss_from_terms` for their union's loss."""
    if memory not in ("off", "prompt"):
        raise ValueError(f"memory must be 'off' or 'prompt', got {memory!r}")
    was_training = wrapper.model.training
    wrapper.model.eval()
    totals = torch.zeros(3, device=wrapper.device, dtype=torch.float64)
    try:
        for raw in iterate_batches(data, batch_size, pad_token_id=wrapper.pad_token_id(), shuffle=False, repeat=False):
            batch = wrapper.prepare(raw)
            if not batch.has_maskable:
                continue
            anchor = wrapper.outer.keyed_anchor(batch.x0, batch.maskable, batch.attention_mask, seed)
            bound = nullcontext()
            if memory == "prompt":
                protected = leading_real_tokens(batch.attention_mask, wrapper.backbone.protected_prefix)
                adapted = adapt_positions(wrapper, batch.x0, batch.prompt & ~protected, batch.prompt.long(), seed)
                bound = adapted.bind()
            with bound:
                terms = wrapper.outer.loss_terms(batch.x0, batch.maskable, anchor, batch.model_attention_mask)
            totals += torch.stack([*terms, anchor.masked.sum()]).double()
    finally:
        wrapper.model.train(was_training)
    return totals


def loss_from_terms(terms: torch.Tensor, seed: int) -> float:
    """The evaluation loss of summed :func:`eval_loss_terms`; refused when the data has no
    maskable token, or when no anchor masked a token (a loss of 0 would measure nothing: each example's
    anchor masks a fraction t ~ U(0, 1) of its tokens, so a few short examples can mask none)."""
    numerator, denominator, masked = terms.tolist()
    if denominator == 0:
        raise ValueError("eval data has no maskable (response) token")
    if masked == 0:
        raise ValueError(f"no evaluation anchor (seed {seed}) masked a token of this data, so there is no loss to "
                         "report; evaluate more (or longer) examples, or another seed")
    return numerator / denominator
