"""bilevel-dlm generate: decode generations for prompts with a checkpoint's tokenizer."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..sampling import default_sampler
from ..wrapper import MemoryWrapper
from . import CLIError
from .common import load_checkpoint, loading_options, progress_bars, reported, resolve_device

__all__ = ["run", "decode", "generation_settings"]


def generation_settings(args: argparse.Namespace, wrapper: MemoryWrapper) -> dict[str, Any]:
    """Keyword arguments of ``MemoryWrapper.generate``; the sampler is built here so bad settings fail early."""
    with reported("--sampler"):
        sampler = default_sampler(wrapper.backbone, **dict(args.sampler or []))
    return {"adapt": not args.no_adapt, "seed": args.seed, "sampler": sampler}


def decode(tokenizer: Any, ids: torch.Tensor) -> str:
    """Text of generated ids up to the first EOS (the response is answer + EOS padding)."""
    tokens = ids.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def refuse_unknown_words(tokenizer: Any, prompt: str) -> None:
    """A prompt with words the tokenizer can only encode as its unknown token is refused, as training refuses
    such data (the model would read ``<unk>`` in their place)."""
    unknown_id = tokenizer.unk_token_id
    if unknown_id is None:
        return
    if not getattr(tokenizer, "is_fast", False):  # no character offsets: count the unknown tokens
        count = tokenizer(prompt, add_special_tokens=False)["input_ids"].count(unknown_id)
        unknown = [f"{count} word(s)"] if count else []
    else:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        unknown = [prompt[start:end] for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
                   if token == unknown_id]
    if unknown:
        raise CLIError(f"--prompt {prompt if len(prompt) <= 40 else prompt[:40] + '...'!r}: words outside the tokenizer's vocabulary: {sorted(set(unknown))}; "
                       "the model would read them as its unknown token")


def run(args: argparse.Namespace) -> int:
    with progress_bars(not args.no_progress):
        wrapper = load_checkpoint(args.checkpoint, resolve_device(args.device), loading_options(args))
    if wrapper.tokenizer is None:
        raise CLIError(f"--checkpoint {args.checkpoint} has no tokenizer, so prompts cannot be encoded")
    settings = generation_settings(args, wrapper)
    for prompt in args.prompt:
        refuse_unknown_words(wrapper.tokenizer, prompt)
        ids = wrapper.tokenizer(prompt, return_tensors="pt")["input_ids"].to(wrapper.device)
        with reported("generation"):
            output = wrapper.generate(ids, max_new_tokens=args.max_new_tokens, **settings)
        print(decode(wrapper.tokenizer, output[0, ids.shape[1]:]))
    return 0
