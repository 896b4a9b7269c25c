"""Configuration of MDLM's DiT backbone (kuleshov-group OWT release, GPT-2 tokens plus one mask token)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["MDLMConfig", "tiny_config"]


class MDLMConfig(PretrainedConfig):
    """DiT hyper-parameters under the release's key names; defaults are the released OWT values.

    Unknown keys of a released ``config.json`` are kept as attributes. ``mask_token_id`` is not in the
    release's config: the release appends the mask after GPT-2's 50257 tokens, so it is the last id.
    """

    model_type = "mdlm"
    attribute_map = {
        "hidden_size": "hidden_dim",
        "num_hidden_layers": "n_blocks",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "model_length",
    }

    vocab_size: int = 50258
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    mask_token_id: int | None = 50257

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Heads must split the width evenly, into an even head size (rotary rotates half of it)."""
        super().validate_architecture()
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(
                f"MDLMConfig: hidden_dim={self.hidden_dim} must be n_heads={self.n_heads} times an even head size; "
                "change hidden_dim or n_heads."
            )

    @property
    def head_size(self) -> int:
        return self.hidden_dim // self.n_heads


def tiny_config(**overrides: Any) -> MDLMConfig:
    """A few-thousand-parameter MDLM for tests (vocab 128 with the mask as its last id, no dropout)."""
    values: dict[str, Any] = dict(
        vocab_size=128,
        model_length=64,
        hidden_dim=64,
        cond_dim=32,
        n_blocks=2,
        n_heads=4,
        dropout=0.0,
        time_conditioning=False,
        mask_token_id=127,
    )
    values.update(overrides)
    return MDLMConfig(**values)
