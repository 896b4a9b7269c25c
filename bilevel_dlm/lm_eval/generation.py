"""How ``generate_until`` turns a task's request into a decoding run and the decoded tokens into its answer.

A diffusion sampler fills a canvas of a fixed length, in blocks for the LLaDA and Dream samplers, so a
task's ``max_gen_toks`` is rounded up to whole blocks (as LLaDA's and dllm's evaluations generate a whole
``gen_length`` and cut). The answer is then cut as dllm cuts it (at the first EOS / end-of-turn token
after the prompt) and as lm-eval cuts it (at the task's stop strings).
"""

from __future__ import annotations

import logging
import math

from ..sampling import BlockSampler, Sampler

__all__ = ["decoding_run", "stop_token_ids", "answer_tokens"]

logger = logging.getLogger(__name__)


def decoding_run(sampler: Sampler, wanted: int) -> tuple[int, Sampler]:
    """(tokens to generate, the sampler to generate them) for ``wanted`` new tokens.

    A block sampler generates ``wanted`` rounded up to whole blocks. Its ``steps`` (the whole generation's)
    are capped at one per generated token (beyond that LLaDA's schedule only adds steps that reveal
    nothing: with deterministic decoding the tokens are the same) and rounded down to a multiple of the
    block count (at least one step per block), so any ``max_gen_toks`` runs with any ``block_length`` and
    ``steps``."""
    if not isinstance(sampler, BlockSampler) or sampler.block_length is None:
        return wanted, sampler
    length = math.ceil(wanted / sampler.block_length) * sampler.block_length
    if sampler.steps is None:
        return length, sampler
    blocks = length // sampler.block_length
    steps = max(blocks, min(sampler.steps, length) // blocks * blocks)
    if steps != sampler.steps:
        logger.warning("generating %d tokens (%d wanted) in %d blocks: steps=%d -> %d", length, wanted, blocks,
                    sampler.steps, steps)
        sampler = sampler.model_copy(update={"steps": steps})
    return length, sampler


def stop_token_ids(tokenizer, model) -> frozenset[int]:
    """Token ids that end an answer: the tokenizer's EOS and end-of-turn (``eot_token_id``) and the model's
    ``generation_config.eos_token_id`` (instruct releases list their end-of-turn token there)."""
    ids = [tokenizer.eos_token_id, getattr(tokenizer, "eot_token_id", None)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return frozenset(int(i) for i in ids if i is not None)


def answer_tokens(generated: list[int], limit: int | None, stops: frozenset[int]) -> list[int]:
    """The first ``limit`` generated tokens (all with None), up to the first stop token."""
    generated = generated if limit is None else generated[:limit]
    for position, token in enumerate(generated):
        if token in stops:
            return generated[:position]
    return generated
