"""Dream-v0 (Qwen2.5 layout, bidirectional): native transformers model, config and backbone adapter.

Importing registers the adapter and, unless another ``"Dream"`` class is already registered, the config
and model with transformers' ``AutoConfig`` / ``AutoModel``.
"""

from transformers import AutoConfig, AutoModel

from .adapter import DreamBackbone
from .configuration import DreamConfig, tiny_config
from .modeling import DreamBaseModel, DreamModel, padding_attention_mask, padding_position_ids

__all__ = [
    "DreamBackbone",
    "DreamBaseModel",
    "DreamConfig",
    "DreamModel",
    "padding_attention_mask",
    "padding_position_ids",
    "tiny_config",
]


def _register_auto_classes() -> None:
    """Register with the Auto classes; leave an existing registration (e.g. a re-import) in place."""
    try:
        AutoConfig.register(DreamConfig.model_type, DreamConfig)
        AutoModel.register(DreamConfig, DreamModel)
    except ValueError:
        pass


_register_auto_classes()
