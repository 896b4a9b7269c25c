"""The training state of a checkpoint as two files that loading cannot turn into code: every tensor (random
generator states, meta-parameters, optimizer moments) in ``training_state.safetensors``, everything else
(step, history, counters, optimizer hyperparameters, scheduler state) in ``training_state.json``, where a
tensor is a reference ``{"__tensor__": key}`` into the safetensors file.

The JSON keeps what plain JSON cannot say: a tuple is ``{"__tuple__": [...]}`` (AdamW's betas), a dict with
keys that are not strings (an optimizer's per-parameter state) or that start with ``__`` is
``{"__dict__": [[key, value], ...]}``. Floats are written with Python's shortest round-trip repr, so they
load bit for bit.

Checkpoints of earlier releases hold one pickle, ``training_state.pt``. It is read only when the caller
opts in (``allow_pickle=True``, ``--allow-pickle``), and even then with torch's restricted unpickler
(``weights_only=True``), which builds tensors and plain containers and refuses any other object; or it
is converted once by ``bilevel-dlm convert-checkpoint``.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["STATE_TENSORS", "STATE_JSON", "LEGACY_STATE", "write_state", "read_state", "has_state"]

STATE_TENSORS, STATE_JSON, LEGACY_STATE = "training_state.safetensors", "training_state.json", "training_state.pt"


def write_state(state: dict[str, Any], directory: Path) -> None:
    """Write ``state`` (nested dicts, lists, tuples, strings, numbers, booleans, None and tensors) as the
    two files; anything else raises a TypeError naming it, before a file is written."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(structure, indent=1))


def has_state(directory: Path) -> bool:
    """Whether ``directory`` holds a training state in either format."""
    return (directory / STATE_JSON).exists() or (directory / LEGACY_STATE).exists()


def read_state(directory: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The training state of a checkpoint folder; a pickled one of an earlier release only with
    ``allow_pickle`` (read by torch's restricted unpickler), else a :class:`CheckpointError` with the fixes."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError

    if (directory / STATE_JSON).exists():
        tensors = load_file(str(directory / STATE_TENSORS))
        return _decode(json.loads((directory / STATE_JSON).read_text()), tensors)
    if not (directory / LEGACY_STATE).exists():
        raise CheckpointError(f"checkpoint {directory}: {STATE_JSON} is missing (not a bilevel_dlm checkpoint)")
    if not allow_pickle:
        raise CheckpointError(
            f"checkpoint {directory} was written by an earlier bilevel_dlm: its training state is a pickle "
            f"({LEGACY_STATE}), and a pickle from an untrusted source can run code when loaded. If you trust its "
            "author, load it with allow_pickle=True (--allow-pickle on the command line), or convert it once with "
            f"`bilevel-dlm convert-checkpoint {directory}`")
    warnings.warn(f"reading the pickled training state {directory / LEGACY_STATE} of an earlier bilevel_dlm "
                  "(allow_pickle=True) with torch's restricted unpickler; convert it with `bilevel-dlm "
                  "convert-checkpoint` to stop reading pickles", stacklevel=2)
    try:
        return torch.load(directory / LEGACY_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {directory}: {LEGACY_STATE} holds objects other than tensors and plain containers, which "
            f"the restricted unpickler refuses to build; it was not written by bilevel_dlm ({error})") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, where) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {"__dict__": [[_encode(key, tensors, where), _encode(item, tensors, f"{where}.{key}")]
                             for key, item in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the training state holds {where} = a {type(value).__name__}, which a checkpoint cannot store "
                    "without pickling; keep to tensors, numbers, strings, booleans, None, lists, tuples and dicts")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if set(value) == {"__dict__"}:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value["__dict__"]}
    return {key: _decode(item, tensors) for key, item in value.items()}
