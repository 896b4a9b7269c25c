"""bilevel_dlm: bilevel training with fast-weight parametric memory for masked diffusion LMs."""

from .backbone import Backbone, detect_backbone, get_backbone, register_backbone

__all__ = ["Backbone", "detect_backbone", "get_backbone", "register_backbone"]
