"""Generation with inference-time memory: the backbone's sampler with each prompt's fast weights bound,
optionally re-adapted after every committed block. ``MemoryWrapper.generate`` is :func:`generate`."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from .engine import Engine
from .sampling import Sampler, SampleOutput, default_sampler

__all__ = ["generate"]


def generate(
    wrapper: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    adapt: bool | str = True,
    sampler: Sampler | None = None,
    seed: int | None = None,
    return_history: bool = False,
    **sampler_settings: Any,
) -> torch.Tensor | SampleOutput:
    """Generate after each prompt of ``input_ids`` [B, P] (left-padded when lengths differ).

    ``adapt``: ``True`` / ``"prompt"`` gives each prompt its own memory (:func:`adapt`), bound while
    sampling; ``"blocks"`` also re-adapts it after every committed block on the prompt plus the tokens
    committed so far (memory while decoding; block samplers only); ``False`` is exactly the plain
    sampler. The sampler is the backbone's default built from ``sampler_settings`` unless one is given.
    Returns the sequences [B, P + max_new_tokens], or the full :class:`SampleOutput` with ``return_history``.
    """
    if sampler is not None and sampler_settings:
        raise ValueError(f"pass either sampler= or sampler settings, not both (got {sorted(sampler_settings)})")
    if adapt not in (True, False, "prompt", "blocks"):
        raise ValueError(f"adapt must be True, False, 'prompt' or 'blocks', got {adapt!r}")
    sampler = sampler or default_sampler(wrapper.backbone, **sampler_settings)
    wrapper.prepare({"input_ids": input_ids, "attention_mask": attention_mask}, where="generate")  # validation
    margin = sampler.canvas_margin  # a block sampler may complete its last block
    needed = input_ids.shape[-1] + max_new_tokens + margin
    if wrapper.max_length is not None and needed > wrapper.max_length:
        room = wrapper.max_length - margin
        fix = (f"shorten the prompt (e.g. keep its last {room - max_new_tokens} tokens) or generate at most "
               f"{room - input_ids.shape[-1]} tokens" if max_new_tokens < room
               else f"generate at most {room - input_ids.shape[-1]} tokens after this prompt")
        completed = f" (+ {margin} to complete a block)" if margin else ""
        raise ValueError(
            f"a prompt of {input_ids.shape[-1]} tokens (padding included) + max_new_tokens={max_new_tokens}"
            f"{completed} needs {needed} positions, more than the model's maximum length {wrapper.max_length}: {fix}")
    seed = wrapper.config.seed if seed is None else seed
    input_ids = input_ids.to(wrapper.device)
    attention_mask = None if attention_mask is None else attention_mask.to(wrapper.device)
    was_training = wrapper.model.training
    memory = wrapper.adapt(input_ids, attention_mask, seed=seed) if adapt else None

    def refresh(canvas: torch.Tensor, end: int) -> None:
        """Re-adapt on the prompt and the committed tokens (masks and padding hidden)."""
        committed = canvas[:, :end] != wrapper.mask_token_id
        if attention_mask is not None:
            committed[:, : attention_mask.shape[1]] &= attention_mask.bool()
        with memory.suspended():
            memory.set(wrapper.adapt(canvas[:, :end], committed.long(), seed=seed).values)
        wrapper.prompt_memory = memory

    wrapper.model.eval()
    try:
        with memory.bind() if memory is not None else nullcontext():
            output = sampler.sample(wrapper.view, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    generator=torch.Generator(wrapper.device).manual_seed(seed),
                                    return_history=return_history,
                                    on_block_end=refresh if adapt == "blocks" else None)
    finally:
        wrapper.model.train(was_training)
    return output if return_history else output.sequences
