"""Backbone adapter for LLaDA2.0 / LLaDA2.1 (native :class:`~.modeling.LLaDA2MoeModelLM` or the release's code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel_dlm.backbone import Backbone, register_backbone

from .modeling import LLaDA2MoeSparseMoeBlock, additive_attention_mask

__all__ = ["LLaDA2Backbone"]

_EXPERT_PATTERNS = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj")
_SHARED_PATTERNS = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")
_RELEASED_VOCAB_SIZE = 157184
_RELEASED_MASK_TOKEN_ID = 156895


@register_backbone
class LLaDA2Backbone(Backbone):
    """Blocks at ``model.model.layers``. FFN targets: every routed expert and the shared experts of the
    MoE layers, as MemDLM places them; the dense MLP of the first ``first_k_dense_replace`` layers gets
    fast weights only when named explicitly (``MemoryConfig(targets=("mlp.gate_proj", ...))``).

    The forward gets the release's attention format, a 4D additive ``[B, 1, L, L]`` mask (all zeros:
    bidirectional, as the release is fine-tuned; padding hidden; a sampler's 4D bool mask converted);
    the native model gets None for an unpadded batch. The release runs its routed experts under
    ``no_grad`` in eval mode, so adaptation runs in train mode (dropout must then be 0).
    """

    name = "llada2"
    blocks_path = "model.layers"
    model_types = ("llada2_moe",)
    class_names = ("LLaDA2MoeModelLM",)
    ffn_targets = _EXPERT_PATTERNS + _SHARED_PATTERNS
    attention_targets = ("attention.query_key_value", "attention.dense")
    token_mixing_targets = _EXPERT_PATTERNS
    adapt_in_train_mode = True
    default_sampler = "block_diffusion"

    def ffn_target_patterns(self, model: nn.Module) -> tuple[str, ...]:
        """Routed experts, and the shared experts when the config has them."""
        has_shared = bool(getattr(model.config, "num_shared_experts", 0))
        return _EXPERT_PATTERNS + (_SHARED_PATTERNS if has_shared else ())

    def reports_routed_tokens(self, model: nn.Module) -> bool:
        return any(isinstance(block.mlp, LLaDA2MoeSparseMoeBlock) for block in self.blocks(model))

    def mask_token_id(self, model: nn.Module) -> int | None:
        declared = super().mask_token_id(model)
        if declared is None and getattr(model.config, "vocab_size", None) == _RELEASED_VOCAB_SIZE:
            return _RELEASED_MASK_TOKEN_ID
        return declared

    def call(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             mask_ratio: torch.Tensor | None = None, **forward_kwargs: Any) -> Any:
        native = self.reports_routed_tokens(model)
        if attention_mask is None and native:
            return model(input_ids=input_ids, **forward_kwargs)
        if attention_mask is None:
            batch, length = input_ids.shape
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
        dtype = model.get_input_embeddings().weight.dtype
        return model(input_ids=input_ids, attention_mask=additive_attention_mask(attention_mask, dtype), **forward_kwargs)
