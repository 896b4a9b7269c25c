"""Built-in backbone integrations (importable as ``bilevel_dlm.integrations``).

Each subpackage holds a native, checkpoint-compatible transformers implementation of one family and
its :class:`~bilevel_dlm.backbone.Backbone` adapter; importing it registers the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from . import dream, llada, llada2, llada_moe, mdlm

__all__ = ["dream", "llada", "llada2", "llada_moe", "mdlm", "TINY_FAMILIES", "tiny_model", "model_class_for",
           "native_model_class", "load_pretrained"]

_FAMILIES = (dream, llada, llada2, llada_moe, mdlm)

TINY_FAMILIES = ("llada", "dream", "llada_moe", "mdlm", "llada2")


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
    if family == "llada2":
        return llada2.LLaDA2MoeModelLM(llada2.tiny_config(
            **vocab, **special, hidden_size=width, num_hidden_layers=layers, intermediate_size=4 * width,
            moe_intermediate_size=width, max_position_embeddings=max(256, max_length)))
    if family == "mdlm":
        return mdlm.MDLM(mdlm.tiny_config(**vocab, hidden_dim=width, n_blocks=layers, model_length=max(64, max_length)))
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {TINY_FAMILIES}")


def model_class_for(architectures: list[str]) -> type[nn.Module] | None:
    """The native class named in a config's ``architectures`` (the LLaDA-MoE release says model_type
    "llada", so its class name, not Auto* dispatch on the model type, picks the right family)."""
    for name in architectures:
        for family in _FAMILIES:
            found = getattr(family, name, None)
            if isinstance(found, type) and issubclass(found, nn.Module):
                return found
    return None


def native_model_class(path: str) -> type[nn.Module] | None:
    """The built-in family's model class whose "module:Name" is ``path`` (as a checkpoint records it), or
    None; found among the families' exports, never by importing ``path``."""
    for family in _FAMILIES:
        for name in family.__all__:
            found = getattr(family, name)
            if isinstance(found, type) and issubclass(found, nn.Module) and \
                    f"{found.__module__}:{found.__qualname__}" == path:
                return found
    return None


def load_pretrained(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a ``save_pretrained`` / released checkpoint folder of any built-in family with its native class.

    Raises a ValueError naming the folder when its config.json names no built-in architecture.
    """
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a save_pretrained model folder)")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    model_class = model_class_for(architectures)
    if model_class is None:
        raise ValueError(f"{config_file}: architectures {architectures} name no built-in model class "
                         f"(supported families: {', '.join(TINY_FAMILIES)})")
    return model_class.from_pretrained(path, **kwargs)
