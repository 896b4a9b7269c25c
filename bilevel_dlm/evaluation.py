"""Task-level evaluation: exact-match accuracy by generation, with and without prompt memory.

Prompts of a batch are left-padded so that every row continues at the same column; the answer is
read from the generated tokens up to the first EOS and compared with the reference by exact match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tasks import Example, exact_match
from .engine import Engine

__all__ = ["encode_prompts", "left_pad", "task_accuracy", "decode_answers"]


def encode_prompts(tokenizer, prompts: Sequence[str], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``<bos> prompt`` ids [B, P] and attention mask (0 on the padding)."""
    return left_pad([tokenizer(prompt)["input_ids"] for prompt in prompts], pad_token_id)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as one left-padded batch [B, P] and its attention mask (0 on the padding)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def decode_answers(tokenizer, generated: torch.Tensor) -> list[str]:
    """Text of each row's generated tokens up to (not including) the first EOS."""
    answers = []
    for row in generated.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def task_accuracy(
    wrapper: Engine,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    adapt: bool,
    batch_size: int = 16,
    seed: int = 0,
    **sampler_settings,
) -> tuple[float, list[str]]:
    """Exact-match accuracy of generated answers, and the predictions."""
    predictions: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, [e.prompt for e in chunk], pad)
        out = wrapper.generate(ids, mask, max_new_tokens=max_new_tokens, adapt=adapt, seed=seed, **sampler_settings)
        predictions += decode_answers(tokenizer, out[:, ids.shape[1]:].cpu())
    correct = sum(exact_match(p, e.answer) for p, e in zip(predictions, examples))
    return correct / max(len(examples), 1), predictions
