"""Built-in backbone integrations (importable as ``bilevel_dlm.integrations``).

Each subpackage holds a native, checkpoint-compatible transformers implementation of one family and
its :class:`~bilevel_dlm.backbone.Backbone` adapter; importing it registers the adapter.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import dream, llada, llada_moe, mdlm

__all__ = ["dream", "llada", "llada_moe", "mdlm", "TINY_FAMILIES", "tiny_model"]

TINY_FAMILIES = ("llada", "dream", "llada_moe", "mdlm")


def tiny_model(family: str, tokenizer: Any, *, width: int = 64, layers: int = 4, max_length: int = 512) -> nn.Module:
    """A random model of ``family`` with ``layers`` blocks of width ``width`` (FFN 4x, MoE experts 1x),
    whose vocabulary and special token ids are the tokenizer's: for examples, the CLI and tests."""
    vocab = dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llada":
        return llada.LLaDAModelLM(llada.tiny_config(
            **vocab, **special, embedding_size=len(tokenizer), d_model=width, n_layers=layers,
            mlp_hidden_size=4 * width, max_sequence_length=max(512, max_length)))
    if family == "dream":
        return dream.DreamModel(dream.tiny_config(
            **vocab, **special, bos_token_id=tokenizer.bos_token_id, hidden_size=width, num_hidden_layers=layers,
            intermediate_size=4 * width, max_position_embeddings=max(256, max_length)))
    if family == "llada_moe":
        return llada_moe.LLaDAMoEModelLM(llada_moe.tiny_config(
            **vocab, **special, hidden_size=width, num_hidden_layers=layers, intermediate_size=width,
            max_position_embeddings=max(256, max_length)))
    if family == "mdlm":
        return mdlm.MDLM(mdlm.tiny_config(**vocab, hidden_dim=width, n_blocks=layers, model_length=max(64, max_length)))
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {TINY_FAMILIES}")
