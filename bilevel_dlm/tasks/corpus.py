"""Encoded training rows mixing several tasks and context lengths."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerFast

from .generators import Example, make_dataset
from .tokenizer import encode_example

__all__ = ["build_corpus"]


def build_corpus(
    tokenizer: PreTrainedTokenizerFast,
    tasks: Sequence[str],
    n_per_task: int,
    context_lengths: Sequence[int],
    seed: int,
    max_length: int,
) -> list[dict[str, torch.Tensor]]:
    """``n_per_task`` rows per task, spread as evenly as possible over ``context_lengths``, shuffled.

    Each row is ``encode_example`` of one example (``input_ids``, ``labels``, ``attention_mask``, all of
    length ``max_length``); a ``ValueError`` names any example that does not fit.
    """
    if not context_lengths:
        raise ValueError("context_lengths is empty; give at least one context length")
    examples: list[Example] = []
    for task in tasks:
        for index, length in enumerate(context_lengths):
            count = n_per_task // len(context_lengths) + (index < n_per_task % len(context_lengths))
            examples.extend(make_dataset(task, count, length, seed))
    random.Random(f"corpus:{seed}").shuffle(examples)
    return [encode_example(tokenizer, example.prompt, example.answer, max_length) for example in examples]
