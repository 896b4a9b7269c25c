"""Backbone adapter for dense LLaDA (native ``LLaDAModelLM`` and the release's remote-code model alike).

Only attribute paths of the released module tree are used, never class checks, so the adapter serves both
objects. LLaDA's logits are already aligned with its input and it takes a plain 2D attention mask, so the
base class's forward call, alignment and logit post-processing apply unchanged; the mask token id is read
from ``config.mask_token_id`` (the tokenizer declares none).
"""

from __future__ import annotations

from torch import nn

from bilevel_dlm.backbone import Backbone, register_backbone

__all__ = ["LLaDABackbone"]


@register_backbone
class LLaDABackbone(Backbone):
    """LLaDA-8B layout: blocks at ``model.transformer.blocks``, LM head at ``model.transformer.ff_out``."""

    name = "llada"
    blocks_path = "model.transformer.blocks"
    model_types = ("llada",)
    class_names = ("LLaDAModelLM",)
    ffn_targets = ("ff_proj", "up_proj", "ff_out")
    attention_targets = ("q_proj", "k_proj", "v_proj", "attn_out")
    default_sampler = "llada"

    def output_head(self, model: nn.Module) -> nn.Module:
        """The LM head module. The native model always has one (tied to ``wte`` under weight tying); the
        release's remote code computes tied logits with ``F.linear`` instead, which nothing can hook."""
        head = getattr(model.model.transformer, "ff_out", None)
        if head is None:
            raise TypeError(
                f"{type(model).__name__} has no LM head module (model.transformer.ff_out): its config sets "
                "weight_tying=True and its code computes the logits from the embedding matrix directly, so the "
                "final hidden states cannot be captured. Load the checkpoint with the native "
                "bilevel_dlm.integrations.llada.LLaDAModelLM, which exposes the tied head as a module."
            )
        return head
