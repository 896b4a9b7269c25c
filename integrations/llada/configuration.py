"""LLaDA configuration with the OLMo-style field names of the released ``config.json``.

Defaults are the released LLaDA-8B values, so ``LLaDAConfig()`` describes LLaDA-8B and a released
``config.json`` loads as is. Keys the implementation does not use (``init_fn``, ``precision``,
``flash_attention``, ``auto_map``...) are kept as plain attributes, as for any ``PreTrainedConfig``.
"""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

__all__ = ["LLaDAConfig", "tiny_config"]


@strict
class LLaDAConfig(PreTrainedConfig):
    """Configuration of a dense LLaDA model (released field names; defaults = LLaDA-8B).

    ``n_kv_heads`` None means ``n_heads`` (1 with ``multi_query_attention``); ``embedding_size`` None means
    ``vocab_size`` (the released models pad the embedding and logits to ``embedding_size``);
    ``mlp_hidden_size`` None means ``mlp_ratio * d_model``. ``weight_tying`` makes the LM head share
    the token embedding (it is exposed as ``tie_word_embeddings`` to transformers).
    """

    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = 32
    multi_query_attention: bool | None = None
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope: bool = True
    rope_theta: int | float = 500000.0
    alibi: bool = False
    activation_type: str = "silu"
    block_type: str = "llama"
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = None
    attention_layer_norm: bool = False
    rms_norm_eps: int | float = 1e-5
    include_bias: bool = False
    include_qkv_bias: bool = False
    clip_qkv: int | float | None = None
    input_emb_norm: bool = False
    scale_logits: bool = False
    weight_tying: bool = False
    embedding_dropout: int | float = 0.0
    attention_dropout: int | float = 0.0
    residual_dropout: int | float = 0.0
    init_std: int | float = 0.02
    mask_token_id: int | None = 126336
    eos_token_id: int | list[int] | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    use_cache: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = 1 if self.multi_query_attention else self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate_architecture(self) -> None:
        """Reject head layouts no attention implementation can run (called by ``@strict``)."""
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")


def tiny_config(**overrides: Any) -> LLaDAConfig:
    """A tiny LLaDA (~180k parameters) for tests and examples: 4 blocks of width 64, vocabulary 128, mask 127."""
    values: dict[str, Any] = dict(
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=128,
        vocab_size=128,
        embedding_size=128,
        mask_token_id=127,
        eos_token_id=1,
        pad_token_id=1,
        max_sequence_length=512,
    )
    values.update(overrides)
    return LLaDAConfig(**values)
