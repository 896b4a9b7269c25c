"""Configuration of LLaDA-MoE (OLMoE-derived masked diffusion LM, bidirectional attention).

Defaults are the released LLaDA-MoE-7B-A1B. The release's ``config.json`` names the expert width
``expert_intermediate_size``; it is accepted as an alias of the OLMoE-style ``intermediate_size`` (likewise
``moe_shared_expert_intermediate_size`` for ``shared_expert_intermediate_size``). Unknown keys of the
release (``dense_intermediate_size``, ``router_aux_loss_coef``, ...) are kept as plain attributes.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["LLaDAMoEConfig", "tiny_config"]


class LLaDAMoEConfig(PretrainedConfig):
    """Hyper-parameters of :class:`~.modeling.LLaDAMoEModelLM` (see the module docstring for aliases).

    ``intermediate_size`` is the width of one routed expert; ``shared_expert_intermediate_size`` None
    or 0 means no shared expert. The router is a softmax over ``num_experts`` followed by top-k, with the
    top-k weights renormalised only when ``norm_topk_prob`` is set (the release does not).
    """

    model_type = "lladamoe"
    attribute_map = {
        "expert_intermediate_size": "intermediate_size",
        "moe_shared_expert_intermediate_size": "shared_expert_intermediate_size",
        "num_local_experts": "num_experts",
    }

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float | int = 50000.0
    partial_rotary_factor: float | int = 1.0
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    clip_qkv: float | None = None
    qk_layernorm: bool | None = True
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool | None = False
    moe_layer_freq: list[int] | None = None
    moe_router_enable_expert_bias: bool | None = None
    mask_token_id: int = 156895
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # The release's config.json says "llada"; the class attribute is the type of this config.
        kwargs.pop("model_type", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling:
            raise NotImplementedError(
                f"LLaDA-MoE: rope_scaling={rope_scaling!r} is not supported (the release uses plain RoPE); "
                "remove it from the config."
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden_size / num_attention_heads, as in the release)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def has_shared_expert(self) -> bool:
        return bool(self.shared_expert_intermediate_size)


def tiny_config(shared_expert: bool = False, **overrides: Any) -> LLaDAMoEConfig:
    """A few-thousand-parameter LLaDA-MoE for tests: 4 experts of width 32, top-2, vocab 128."""
    values: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        shared_expert_intermediate_size=48 if shared_expert else None,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
        mask_token_id=127,
        pad_token_id=1,
        eos_token_id=1,
    )
    values.update(overrides)
    return LLaDAMoEConfig(**values)
