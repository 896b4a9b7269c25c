"""Checkpoints of a MemoryWrapper: model (safetensors), tokenizer, MemDLMConfig (YAML) and the training
state needed to resume ``fit`` exactly (optimizer, scheduler, random generators, step, history).

Writes are atomic: everything goes into a temporary sibling directory that replaces the target only
once complete, so an interruption mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_directory_write", "resolve_checkpoint", "model_class_path", "import_model_class",
           "load_weights", "write_meta", "read_meta", "TRAINING_STATE", "META", "CONFIG", "MODEL_DIR",
           "TOKENIZER_DIR"]

MODEL_DIR, TOKENIZER_DIR = "model", "tokenizer"
CONFIG, META, TRAINING_STATE = "memdlm.yaml", "bilevel_dlm.json", "training_state.pt"


def atomic_directory_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then move the finished directory to ``target`` (replacing it).

    The old checkpoint is renamed aside before the new one moves in and deleted after, so at every
    moment either the old or the new checkpoint is complete on disk (see :func:`resolve_checkpoint`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory to read, falling back to the previous one if a save was cut off
    between moving the old checkpoint aside and moving the new one in."""
    path = Path(path)
    if (path / META).exists():
        return path
    old = path.with_name(f".{path.name}.old")
    if (old / META).exists():
        return old
    raise FileNotFoundError(f"no bilevel_dlm checkpoint at {path} (missing {META}); save one with save_pretrained")


def model_class_path(model: torch.nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def import_model_class(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / META).write_text(json.dumps(meta, indent=2))


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / META).read_text())


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a ``save_pretrained`` folder's weights into an existing model in place.

    Keys absent from the files must be tied weights (transformers saves a tied tensor once).
    """
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
