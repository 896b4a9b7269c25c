"""Backbone adapter for LLaDA-MoE (native :class:`~.modeling.LLaDAMoEModelLM` or the release's remote code)."""

from __future__ import annotations

from torch import nn

from bilevel_dlm.backbone import Backbone, register_backbone

from .modeling import LLaDAMoESparseMoeBlock

__all__ = ["LLaDAMoEBackbone"]

_EXPERT_PATTERNS = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj")
_SHARED_EXPERT_PATTERNS = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")
_RELEASED_VOCAB_SIZE = 157184
_RELEASED_MASK_TOKEN_ID = 156895


@register_backbone
class LLaDAMoEBackbone(Backbone):
    """Blocks at ``model.model.layers``; FFN targets are every routed expert's SwiGLU linears, plus the
    shared expert's when the model has one. Routed experts see the tokens of all samples of a batch
    flattened together, so they are token-mixing; the shared expert runs on [B, L, d] and is not.
    The native model declares each expert call's routed tokens, so per-sample memory works on it."""

    name = "llada_moe"
    blocks_path = "model.layers"
    model_types = ("lladamoe",)
    class_names = ("LLaDAMoEModelLM",)
    ffn_targets = _EXPERT_PATTERNS
    attention_targets = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    )
    token_mixing_targets = _EXPERT_PATTERNS
    default_sampler = "llada"

    def ffn_target_patterns(self, model: nn.Module) -> tuple[str, ...]:
        """Expert linears, plus the shared expert's when the blocks carry one (the core raises on
        patterns that match nothing, so they are only listed when present)."""
        has_shared = getattr(self.blocks(model)[0], "shared_expert", None) is not None
        return self.ffn_targets + (_SHARED_EXPERT_PATTERNS if has_shared else ())

    def reports_routed_tokens(self, model: nn.Module) -> bool:
        """The native sparse block declares its routed tokens; the release's remote code does not."""
        return isinstance(self.blocks(model)[0].mlp, LLaDAMoESparseMoeBlock)

    def mask_token_id(self, model: nn.Module) -> int | None:
        """``config.mask_token_id``; for the released vocabulary without one, the released mask id."""
        declared = super().mask_token_id(model)
        if declared is None and getattr(model.config, "vocab_size", None) == _RELEASED_VOCAB_SIZE:
            return _RELEASED_MASK_TOKEN_ID
        return declared
