"""LLaDA-MoE-7B-A1B: native transformers-5 model (loads the released checkpoint as is) and its adapter."""

from .adapter import LLaDAMoEBackbone
from .configuration import LLaDAMoEConfig, tiny_config
from .modeling import LLaDAMoEModel, LLaDAMoEModelLM, LLaDAMoEPreTrainedModel, LLaDAMoESparseMoeBlock

__all__ = [
    "LLaDAMoEBackbone",
    "LLaDAMoEConfig",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
    "LLaDAMoESparseMoeBlock",
    "tiny_config",
]
