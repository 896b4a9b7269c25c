"""bilevel-dlm eval: eval loss with memory off and with prompt memory, optionally exact-match accuracy.

``--synthetic`` scores the suite the run was trained on (its tasks, context lengths, examples per task and
row length, recorded in the checkpoint by ``train``) on held-out examples (the run's data seed + 1), each
option given on the command line overriding; the command prints what it scored.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..tasks import exact_match
from ..tasks.tokenizer import IGNORE_INDEX
from ..wrapper import MemoryWrapper
from . import DEFAULT_CONTEXT_LENGTHS, DEFAULT_EVAL_DATA_SEED, DEFAULT_EXAMPLES_PER_TASK, TASK_NAMES, CLIError
from .common import (Data, check_vocabulary, load_checkpoint, load_data, loading_options, progress_bars, reported,
                     resolve_device)
from .generation import decode, generation_settings

__all__ = ["run", "accuracy", "with_suite_defaults", "scored"]

_SUITE_OPTIONS = ("tasks", "context_lengths", "examples_per_task", "data_seed", "max_length")


def with_suite_defaults(args: argparse.Namespace, trained_on: dict[str, Any] | None) -> tuple[argparse.Namespace, str]:
    """For ``--synthetic``: ``args`` with each suite option not given taken from the run's recorded training
    suite on held-out examples (its data seed + 1), else from the built-in suite (all tasks, context
    length 128); and a note saying which. Other data is returned as it is."""
    if not args.synthetic:
        return args, ""
    if trained_on is not None and trained_on.get("source") == "synthetic":
        defaults = {name: trained_on[name] for name in _SUITE_OPTIONS}
        defaults["data_seed"] += 1
        origin = f"options not given are the run's training suite (data seed {trained_on['data_seed']} + 1: held out)"
    else:
        defaults = {"tasks": list(TASK_NAMES), "context_lengths": list(DEFAULT_CONTEXT_LENGTHS),
                    "examples_per_task": DEFAULT_EXAMPLES_PER_TASK, "data_seed": DEFAULT_EVAL_DATA_SEED,
                    "max_length": None}
        trained = f"it was trained on {trained_on['path']}" if trained_on else "it records no training data"
        origin = f"options not given are the built-in defaults: {trained}"
    given = {name: getattr(args, name) for name in _SUITE_OPTIONS if getattr(args, name) is not None}
    return argparse.Namespace(**{**vars(args), **defaults, **given}), origin


def scored(args: argparse.Namespace, data: Data, origin: str) -> str:
    """What was scored, for the output: the suite's options (and where those not given came from), or the file."""
    count = len(data.rows)
    shape = f"{count} row{'s' * (count != 1)} of up to {max(len(row['input_ids']) for row in data.rows)} tokens"
    if not args.synthetic:
        return f"scored: {args.data}, {shape}"
    lengths = " ".join(map(str, args.context_lengths))
    return (f"scored: synthetic tasks {' '.join(args.tasks)}, context lengths {lengths}, {args.examples_per_task} "
            f"examples per task, data seed {args.data_seed}, {shape}\n  ({origin})")


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
        wrapper = load_checkpoint(args.checkpoint, resolve_device(args.device), loading_options(args))
    args, origin = with_suite_defaults(args, wrapper.trained_on)
    data = load_data(args, wrapper.tokenizer, f"--checkpoint {args.checkpoint}")
    check_vocabulary(data.rows, wrapper.model)
    if args.accuracy and not data.answered:
        raise CLIError("--accuracy needs reference answers: use --synthetic or prompt/answer records")
    settings = generation_settings(args, wrapper) if args.accuracy else {}
    with reported("evaluation"):
        off = wrapper.eval_loss(data.rows, memory="off", batch_size=args.batch_size)
        prompt = wrapper.eval_loss(data.rows, memory="prompt", batch_size=args.batch_size)
    print(scored(args, data, origin))
    print(f"eval loss, memory off:    {off:.4f}")
    print(f"eval loss, prompt memory: {prompt:.4f}")
    if args.accuracy:
        correct = accuracy(wrapper, data.answered, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, settings=settings)
        total = len(data.answered)
        print(f"exact match: {correct / total:.4f} ({correct}/{total})")
    return 0
