"""Inference-time parametric memory: fast weights adapted on each prompt (MEMDLM.md section 5), the base
weights untouched. ``MemoryWrapper.adapt`` is :func:`adapt`."""

from __future__ import annotations

import torch

from .contracts import FastWeights
from .engine import Engine
from .noise import Anchor
from .prefix import random_state, same_random_state
from .rng import RowSharedRandom, leading_padding
from .trajectory import masked_fraction, random_subset

__all__ = ["adapt", "adapt_positions"]


def adapt(
    wrapper: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    seed: int | None = None,
) -> FastWeights:
    """Per-sample memory adapted on each prompt alone (MEMDLM.md section 5); base weights untouched.

    Every attended prompt token is maskable; the anchor masks ``adapt.anchor_ratio`` of them, and
    the inner method's ``for_prompts(memory, config.adapt)`` adapts on it (MemDLM's: the training
    trajectory and inner optimizer, ``adapt.steps`` stages with uniform weights, from phi_0 if learned).
    Random draws are shared by the rows, independent of the batch and aligned on each row's first
    real token, so row b of a batch (left- or right-padded) is adapted exactly as it would be alone.
    Returns the memory (also kept as ``wrapper.prompt_memory``); bind it with ``memory.bind()``.
    """
    batch = wrapper.prepare({"input_ids": input_ids, "attention_mask": attention_mask}, where="adapt")
    return adapt_positions(wrapper, batch.x0, batch.maskable, batch.model_attention_mask, seed)


def adapt_positions(wrapper: Engine, x0: torch.Tensor, maskable: torch.Tensor, attention_mask: torch.Tensor | None,
                    seed: int | None = None) -> FastWeights:
    """Adapt a fresh per-prompt memory on the ``maskable`` positions of ``x0`` (what :func:`adapt` and the
    prompt-memory evaluation share); the model sees ``attention_mask`` (None: no padding)."""
    settings = wrapper.config.adapt
    offsets = None if attention_mask is None else leading_padding(attention_mask)
    source = RowSharedRandom(wrapper.config.seed if seed is None else seed, offsets)
    # One prompt needs no batch dimension (and MoE experts, which mix the tokens of a batch, accept it).
    per_sample = x0.shape[0] > 1
    memory = wrapper.memory.spawn(per_sample)
    loop = wrapper.inner.for_prompts(memory, settings)
    counts = torch.floor(maskable.sum(1) * settings.anchor_ratio).long().clamp_min(1)
    masked = random_subset(maskable, counts, source)
    anchor = Anchor(t=masked_fraction(masked, maskable), masked=masked,
                    input_ids=torch.where(masked, wrapper.mask_token_id, x0))
    was_training = wrapper.model.training
    wrapper.model.train(wrapper.backbone.adapt_in_train_mode)
    before = random_state(wrapper.device)  # adaptation itself draws from its own generators only
    try:
        with torch.enable_grad():
            loop.run(x0, maskable, anchor, attention_mask, generator=source, weighting=settings.weighting)
    finally:
        wrapper.model.train(was_training)
    if not same_random_state(before, random_state(wrapper.device)):
        raise ValueError(
            f"{type(wrapper.backbone).__name__} adapts in train() mode and the model drew random numbers while "
            "adapting (dropout is active), which would make the memory random: set the model's dropout "
            "probabilities (config attention/embedding/residual dropout) to 0 for inference-time memory"
        )
    wrapper.prompt_memory = memory
    return memory
