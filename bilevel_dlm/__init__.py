"""bilevel_dlm: bilevel training with fast-weight parametric memory for masked diffusion LMs.

MemDLM ("Memory-Enhanced DLM Training", 2026) is the reference configuration: ``MemDLMConfig()``.
"""

from .backbone import Backbone, detect_backbone, get_backbone, register_backbone, registered_backbones
from .config import AdaptConfig, InnerConfig, MemDLMConfig, MemoryConfig, OuterConfig, OuterLoRAConfig, TrajectoryConfig
from .forward import ModelView
from .inner import InnerLoop, InnerResult
from .memory import MemoryParams
from .noise import Anchor, CosineSchedule, LinearSchedule, NoiseSchedule, sample_anchor
from .optim import MetaSGD, adam, per_tensor_clip, sgd
from .outer import OuterLoop
from .trajectory import AnchorConsistent, AnchorOnly, PreAnchorOnly, Progressive, Stage, TrajectorySimulator
from .wrapper import History, MemoryWrapper

__all__ = [
    "AdaptConfig", "Anchor", "AnchorConsistent", "AnchorOnly", "Backbone", "CosineSchedule", "History",
    "InnerConfig", "InnerLoop", "InnerResult", "LinearSchedule", "MemDLMConfig", "MemoryConfig",
    "MemoryParams", "MemoryWrapper", "MetaSGD", "ModelView", "NoiseSchedule", "OuterConfig",
    "OuterLoRAConfig", "OuterLoop", "PreAnchorOnly", "Progressive", "Stage", "TrajectoryConfig",
    "TrajectorySimulator", "adam", "detect_backbone", "get_backbone", "per_tensor_clip",
    "register_backbone", "registered_backbones", "sample_anchor", "sgd",
]
