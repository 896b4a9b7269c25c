"""bilevel-dlm eval: eval loss with memory off and with prompt memory, optionally exact-match accuracy."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..tasks import exact_match
from ..tasks.tokenizer import IGNORE_INDEX
from ..wrapper import MemoryWrapper
from . import CLIError
from .common import check_vocabulary, load_checkpoint, load_data, progress_bars, reported, resolve_device
from .generation import decode, generation_settings

__all__ = ["run", "accuracy"]


def accuracy(wrapper: MemoryWrapper, answered: list[tuple[dict[str, torch.Tensor], str]], *, batch_size: int,
             max_new_tokens: int | None, settings: dict[str, Any]) -> int:
    """Number of exact-match answers, generating from each row's prompt (its -100-labelled prefix).

    Prompts of equal length are batched, so no padding enters a generation. Without ``max_new_tokens``
    the model fills the row's response length, as in training. ``settings`` go to ``generate``.
    """
    by_length: dict[int, list[int]] = {}
    for index, (row, _) in enumerate(answered):
        by_length.setdefault(int((row["labels"] == IGNORE_INDEX).sum()), []).append(index)
    correct = 0
    for prompt_length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = [answered[i][0] for i in chunk]
            prompts = torch.stack([row["input_ids"][:prompt_length] for row in rows]).to(wrapper.device)
            new_tokens = max_new_tokens or len(rows[0]["input_ids"]) - prompt_length
            with reported("generation"):
                output = wrapper.generate(prompts, max_new_tokens=new_tokens, **settings)
            for i, generated in zip(chunk, output[:, prompt_length:]):
                correct += exact_match(decode(wrapper.tokenizer, generated), answered[i][1])
    return correct


def run(args: argparse.Namespace) -> int:
    with progress_bars(not args.no_progress):
        wrapper = load_checkpoint(args.checkpoint, resolve_device(args.device))
    data = load_data(args, wrapper.tokenizer, f"--checkpoint {args.checkpoint}")
    check_vocabulary(data.rows, wrapper.model)
    if args.accuracy and not data.answered:
        raise CLIError("--accuracy needs reference answers: use --synthetic or prompt/answer records")
    settings = generation_settings(args, wrapper) if args.accuracy else {}
    with reported("evaluation"):
        off = wrapper.eval_loss(data.rows, memory="off", batch_size=args.batch_size)
        prompt = wrapper.eval_loss(data.rows, memory="prompt", batch_size=args.batch_size)
    print(f"eval loss, memory off:    {off:.4f}")
    print(f"eval loss, prompt memory: {prompt:.4f}")
    if args.accuracy:
        correct = accuracy(wrapper, data.answered, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, settings=settings)
        total = len(data.answered)
        print(f"exact match: {correct / total:.4f} ({correct}/{total})")
    return 0
