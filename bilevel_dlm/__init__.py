"""bilevel_dlm: bilevel training with fast-weight parametric memory for masked diffusion LMs.

MemDLM ("Memory-Enhanced DLM Training", 2026) is the reference configuration: ``MemDLMConfig()``.

The public names below are imported on first use, so that light entry points (the command line's
``--help``) start without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backbone": "backbone", "detect_backbone": "backbone", "get_backbone": "backbone",
    "register_backbone": "backbone", "registered_backbones": "backbone",
    "AdaptConfig": "config", "InnerConfig": "config", "MemDLMConfig": "config", "MemoryConfig": "config",
    "OuterConfig": "config", "OuterLoRAConfig": "config", "TrajectoryConfig": "config",
    "FastWeights": "contracts", "InnerMethod": "contracts", "OuterObjective": "contracts",
    "KVCache": "kv_cache", "ModelView": "forward",
    "InnerLoop": "inner", "InnerResult": "inner",
    "MemoryParams": "memory", "MetaInit": "meta_init",
    "Anchor": "noise", "CosineSchedule": "noise", "LinearSchedule": "noise", "NoiseSchedule": "noise",
    "sample_anchor": "noise",
    "MetaSGD": "optim", "adam": "optim", "per_tensor_clip": "optim", "sgd": "optim",
    "CARTObjective": "outer", "OuterLoop": "outer",
    "AnchorConsistent": "trajectory", "AnchorOnly": "trajectory", "PreAnchorOnly": "trajectory",
    "Progressive": "trajectory", "Stage": "trajectory", "TrajectorySimulator": "trajectory",
    "History": "history", "TrainingDiverged": "training",
    "MemoryWrapper": "wrapper",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bilevel_dlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
