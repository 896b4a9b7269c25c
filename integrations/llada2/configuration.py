"""Configuration of LLaDA2.0 / LLaDA2.1 (inclusionAI's MoE block-diffusion LMs, ``model_type: llada2_moe``).

Field names and defaults are the release's ``configuration_llada2_moe.py``; a released ``config.json``
(e.g. LLaDA2.1-mini: hidden 2048, 20 layers, 16 heads, 4 KV heads, 256 experts top-8 in 8 groups,
1 shared expert, first layer dense) loads as is. Keys of the release that its code never reads
(``score_function``, ``norm_topk_prob``, ``router_dtype``, ``rotary_dim``, ...) are kept as plain
attributes; the behaviour they name is fixed in the code (sigmoid scores, renormalised top-k, float32
router), here as there. The mask token is not part of the release's config; 156895 is used for the
released vocabulary (157184).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["LLaDA2MoeConfig", "tiny_config"]


class LLaDA2MoeConfig(PretrainedConfig):
    """Hyper-parameters of :class:`~.modeling.LLaDA2MoeModelLM`.

    Layers with index < ``first_k_dense_replace`` have a dense SwiGLU MLP of ``intermediate_size``; the
    others route each token to ``num_experts_per_tok`` of ``num_experts`` experts (width
    ``moe_intermediate_size``), chosen within the ``topk_group`` best of ``n_group`` expert groups, plus
    ``num_shared_experts`` always-on experts. ``partial_rotary_factor`` of each head is rotated.
    """

    model_type = "llada2_moe"

    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 0
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = True
    rms_norm_eps: float = 1e-5
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    output_dropout: float | int = 0.1
    initializer_range: float = 0.02
    max_position_embeddings: int = 16384
    rope_theta: float | int = 10000.0
    partial_rotary_factor: float | int = 0.5
    num_experts: int = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float | int = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    mask_token_id: int | None = None
    pad_token_id: int | None = 126081
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling:
            raise NotImplementedError(
                f"LLaDA2: rope_scaling={rope_scaling!r} is not supported (the releases use plain partial RoPE); "
                "remove it from the config."
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.num_key_value_heads:
            raise ValueError("LLaDA2: num_key_value_heads must be set (> 0); the release has no fallback either")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError(f"LLaDA2: num_experts={self.num_experts} must split into n_group={self.n_group} "
                             f"groups and topk_group={self.topk_group} <= n_group")
        super().__post_init__(**kwargs)

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ``partial_rotary_factor`` of them)."""
        return int(self.head_dim * self.partial_rotary_factor)


def tiny_config(**overrides: Any) -> LLaDA2MoeConfig:
    """A tiny LLaDA2 for tests: first layer dense, then MoE (8 experts in 4 groups, top-2 within the best
    2 groups, one shared expert), GQA, partial rotary, vocabulary 128 with the mask as its last id."""
    values: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        embedding_dropout=0.0,
        attention_dropout=0.0,
        output_dropout=0.0,
        use_bias=False,
        rms_norm_eps=1e-6,
        mask_token_id=127,
        pad_token_id=1,
        eos_token_id=1,
    )
    values.update(overrides)
    return LLaDA2MoeConfig(**values)
