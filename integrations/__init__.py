"""Built-in backbone integrations (importable as ``bilevel_dlm.integrations``).

Each subpackage holds a native, checkpoint-compatible transformers implementation of one family and
its :class:`~bilevel_dlm.backbone.Backbone` adapter; importing it registers the adapter.
"""

from . import dream, llada, llada_moe, mdlm

__all__ = ["dream", "llada", "llada_moe", "mdlm"]
