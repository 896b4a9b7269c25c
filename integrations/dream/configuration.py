"""Dream-v0 configuration: a Qwen2 config with the released model type, mask token and special ids.

The released ``config.json`` (``model_type`` ``"Dream"``, ``rope_theta``, ``rope_scaling``, ``auto_map``, ...)
loads into :class:`DreamConfig` unchanged; transformers 5 moves ``rope_theta`` into ``rope_parameters``.
Defaults describe Dream-v0-7B.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

__all__ = ["DreamConfig", "tiny_config"]


@strict
class DreamConfig(Qwen2Config):
    """Qwen2.5 layout, bidirectional attention; ``mask_token_id`` is the ``<|mask|>`` token."""

    model_type = "Dream"
    default_theta = 1_000_000.0

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 131072
    use_cache: bool = False
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151665
    eos_token_id: int | list[int] | None = 151643


def tiny_config(**overrides: Any) -> DreamConfig:
    """A small random-init Dream config for tests and examples (vocab 128, mask 127, BOS 126, pad/EOS 1)."""
    fields: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        mask_token_id=127,
        bos_token_id=126,
        pad_token_id=1,
        eos_token_id=1,
    )
    fields.update(overrides)
    return DreamConfig(**fields)
