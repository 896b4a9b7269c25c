"""LLaDA2.0 / LLaDA2.1: native transformers-5 model (loads the released checkpoint as is) and its adapter."""

from .adapter import LLaDA2Backbone
from .configuration import LLaDA2MoeConfig, tiny_config
from .modeling import (LLaDA2MoeGate, LLaDA2MoeModel, LLaDA2MoeModelLM, LLaDA2MoePreTrainedModel,
                       LLaDA2MoeSparseMoeBlock, additive_attention_mask)

__all__ = [
    "LLaDA2Backbone",
    "LLaDA2MoeConfig",
    "LLaDA2MoeGate",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "LLaDA2MoePreTrainedModel",
    "LLaDA2MoeSparseMoeBlock",
    "additive_attention_mask",
    "tiny_config",
]
