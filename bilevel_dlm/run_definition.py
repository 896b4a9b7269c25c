"""What defines a training run, recorded in its checkpoints so that a resume can tell whether it continues
the same run: the config, the data (a fingerprint of the examples' contents), the batch size, the number of
steps (the learning-rate schedule depends on it), the world size and the accumulation steps.

A resume with anything different would silently become another run; :func:`run_changes` lists what
differs, and ``fit`` refuses it unless the caller allows the changes (then they are recorded in the history).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["run_definition", "data_fingerprint", "run_changes"]


# Config fields that do not change the trajectory of training: inference-time adaptation (also used by
# prompt-memory evaluation) and the guards that only stop a run.
NOT_DEFINING = ("adapt", "max_nonfinite_steps", "max_weight_norm_change")
FINGERPRINTED = ("input_ids", "labels", "attention_mask")


def run_definition(config: Any, train_data: Iterable[Mapping[str, Any]], *, batch_size: int, max_steps: int,
                   world_size: int = 1, accumulation: int = 1) -> dict[str, Any]:
    """The run's defining settings as plain JSON values (the config without :data:`NOT_DEFINING`)."""
    return {"config": config.model_dump(mode="json", exclude=set(NOT_DEFINING)), "data": data_fingerprint(train_data),
            "batch_size": batch_size, "max_steps": max_steps, "world_size": world_size, "accumulation": accumulation}


def data_fingerprint(data: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"examples": n, "sha256": ...}`` over every example's token ids, labels and attention mask in order, for
    data with a length and indexing (a list, a map-style Dataset); only the type's name for a stream (a
    DataLoader, an iterable), which cannot be read twice: a changed stream goes unnoticed."""
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return {"stream": type(data).__name__}
    digest = hashlib.sha256()
    for index in range(len(data)):
        example = data[index]
        for key in FINGERPRINTED:
            value = example.get(key) if isinstance(example, Mapping) else None
            if value is None:
                continue
            digest.update(key.encode())
            tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            digest.update(str(tuple(tensor.shape)).encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"examples": len(data), "sha256": digest.hexdigest()}


def run_changes(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"name: saved -> current"`` for every setting that differs (nested config fields by dotted name)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            changes += run_changes(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {_short(before)} -> {_short(after)}")
    return changes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]
