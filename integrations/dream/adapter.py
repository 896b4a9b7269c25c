"""Backbone adapter for Dream-v0: native :class:`DreamModel` and the release's remote-code model alike."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel_dlm.backbone import Backbone, register_backbone

from .modeling import padding_attention_mask, padding_position_ids

__all__ = ["DreamBackbone"]


@register_backbone
class DreamBackbone(Backbone):
    """Dream's logits are shifted by one (AR heritage) and its BOS at position 0 is never masked."""

    name = "dream"
    blocks_path = "model.layers"
    model_types = ("Dream",)
    class_names = ("DreamModel",)
    ffn_targets = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    attention_targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    protected_prefix = 1
    hidden_lookback = 1
    default_sampler = "dream"
    likelihood_protocol = "dream"

    def output_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def call(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask_ratio: torch.Tensor | None = None,
        **forward_kwargs: Any,
    ) -> Any:
        """Padding becomes the release's 4D bool mask plus position ids, which both implementations accept; a
        4D bool mask (packed documents kept apart) is passed as it is."""
        if attention_mask is None or bool(attention_mask.bool().all()):
            return model(input_ids=input_ids, **forward_kwargs)
        if attention_mask.dim() == 4:
            return model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        return model(
            input_ids=input_ids,
            attention_mask=padding_attention_mask(attention_mask),
            position_ids=padding_position_ids(attention_mask),
            **forward_kwargs,
        )

    def align_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shift right by one so position i predicts token i; position 0 (BOS, never supervised) keeps its own."""
        return torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
