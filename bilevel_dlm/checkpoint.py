"""Checkpoints of a MemoryWrapper: model (safetensors), tokenizer, MemDLMConfig (YAML) and the training
state needed to resume ``fit`` exactly (optimizer, scheduler, random generators, step, history; tensors in
safetensors and the rest in JSON, :mod:`bilevel_dlm.state_files`). Loading runs no code the checkpoint
carries: no pickle, and the model class it names must be one the library knows (:func:`resolve_model_class`).

Writes are atomic: everything goes into a temporary sibling directory that replaces the target only
once complete, so an interruption mid-save leaves the previous checkpoint intact. The last file written
is ``manifest.json``: the size and sha256 of every other file. Loading checks it first, so a truncated or
edited file is reported by name, with the newest valid checkpoint beside it as the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

__all__ = ["atomic_directory_write", "resolve_checkpoint", "verify_checkpoint", "newest_valid_checkpoint",
           "CheckpointError", "CheckpointSaveError", "model_class_path", "resolve_model_class", "check_weights_fit",
           "load_tokenizer",
           "load_weights", "write_meta", "read_meta",
           "META", "CONFIG", "MODEL_DIR", "TOKENIZER_DIR", "MANIFEST", "HISTORY"]

MODEL_DIR, TOKENIZER_DIR = "model", "tokenizer"
CONFIG, META = "memdlm.yaml", "bilevel_dlm.json"
MANIFEST, HISTORY = "manifest.json", "history.json"
_STEP = re.compile(r"checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: names the file, the problem and the fix."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...); the target keeps its previous contents."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_directory_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, add the manifest, then move the finished directory to ``target``.

    The old checkpoint is renamed aside before the new one moves in and deleted after, so at every
    moment either the old or the new checkpoint is complete on disk (see :func:`resolve_checkpoint`).
    The directory gets the permissions of the user's umask (a temporary directory starts as 0700).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as error:
        raise CheckpointSaveError(f"writing {target} failed ({error.strerror or error})") from error
    try:
        write(tmp)
        _write_manifest(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "its previous contents are intact" if target.exists() else "nothing was written"
        raise CheckpointSaveError(f"writing {target} failed ({getattr(error, 'strerror', None) or error}); "
                                  f"{kept}") from error
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(directory: Path) -> None:
    """``manifest.json``: relative path -> size and sha256 of every file, written atomically."""
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(directory)}
    partial = directory / f".{MANIFEST}.partial"
    partial.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(partial, directory / MANIFEST)


def _problem(directory: Path) -> tuple[str, str] | None:
    """(file, problem) of the first thing wrong with a checkpoint directory, or None when it is intact."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return MANIFEST, "is missing (the save did not finish, or the folder is not a bilevel_dlm checkpoint)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return MANIFEST, "is not a valid manifest (truncated or edited)"
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            return name, "is missing"
        if path.stat().st_size != entry["size"]:
            return name, f"has {path.stat().st_size} bytes where the manifest says {entry['size']} (truncated or replaced)"
        if _sha256(path) != entry["sha256"]:
            return name, "does not match its sha256 in the manifest (corrupted or edited)"
    return None


def _step_of(checkpoint: Path) -> int:
    return int(_STEP.match(checkpoint.name).group(1))


def _checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def newest_valid_checkpoint(folder: str | Path, *, exclude: Path | None = None) -> Path | None:
    """The ``checkpoint-<step>`` directory of ``folder`` with the highest step that passes verification."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for _, path in _checkpoint_steps(folder):
        if path != exclude and _problem(path) is None:
            return path
    return None


def verify_checkpoint(directory: Path) -> None:
    """Raise :class:`CheckpointError` naming the broken file and the newest valid alternative, if any."""
    problem = _problem(directory)
    if problem is None:
        return
    name, what = problem
    alternative = newest_valid_checkpoint(directory.parent, exclude=directory)
    fix = (f"resume from {alternative} instead" if alternative is not None
           else "no other valid checkpoint was found beside it; save a new one")
    raise CheckpointError(f"checkpoint {directory}: {name} {what}. Fix: {fix}.")


def resolve_checkpoint(path: str | Path) -> Path:
    """The verified checkpoint directory to read.

    ``path`` is a checkpoint, or a folder of ``checkpoint-<step>`` directories (then the newest valid
    one). It falls back to the previous checkpoint if a save was cut off between moving the old one
    aside and moving the new one in.
    """
    path = Path(path)
    if not (path / META).exists() and path.is_dir() and _checkpoint_steps(path):
        newest = newest_valid_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path}: none of its checkpoint-<step> folders is valid "
                                  f"({', '.join(p.name for _, p in _checkpoint_steps(path)[:3])}, ...)")
        skipped = [p for _, p in _checkpoint_steps(path) if _step_of(p) > _step_of(newest)]
        if skipped:
            name, what = _problem(skipped[0]) or ("?", "is damaged")
            warnings.warn(f"{skipped[0]} is damaged ({name} {what}); using {newest}, the newest valid checkpoint "
                          f"of {path}", stacklevel=2)
        path = newest
    if not (path / META).exists():
        old = path.with_name(f".{path.name}.old")
        if not (old / META).exists():
            found = "it does not exist" if not path.exists() else (
                "it is empty" if path.is_dir() and not any(path.iterdir()) else f"it holds no {META}")
            raise FileNotFoundError(f"no bilevel_dlm checkpoint at {path} ({found}): expected a checkpoint folder "
                                    f"(with {META}, written by save_pretrained or train --output) or a folder of "
                                    "checkpoint-<step> folders (train --save-every)")
        path = old
    verify_checkpoint(path)
    return path


def model_class_path(model: torch.nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_model_class(path: str, model_dir: Path, *, trust_remote_code: bool = False) -> type:
    """The class named ``path`` ("module:Name") in a checkpoint, if the library knows it: a built-in
    family's native class, or a transformers class while the model folder's ``config.json`` names a
    ``model_type`` transformers knows. Anything else would mean importing a module the checkpoint chose, which
    only ``trust_remote_code=True`` allows (as transformers' ``from_pretrained`` does)."""
    from .integrations import native_model_class

    known = native_model_class(path) or _transformers_class(path, model_dir)
    if known is not None:
        return known
    if not trust_remote_code:
        raise CheckpointError(
            f"checkpoint {model_dir.parent} names the model class {path!r}, which is neither a built-in family's "
            "class nor a transformers class: loading it would import and run that module. If you trust the "
            "checkpoint's author, pass trust_remote_code=True (--trust-remote-code on the command line)")
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def check_weights_fit(model_class: type, model_dir: Path) -> None:
    """Refuse, before anything large is allocated, weights that do not fit ``model_class`` built from the
    folder's ``config.json``: the class is built on the meta device (no memory) and its parameter shapes
    compared with the safetensors headers. (A checkpoint whose recorded class was edited to another family's
    would otherwise be built at that family's default size: gigabytes.)"""
    from safetensors import safe_open

    config = model_class.config_class.from_pretrained(model_dir)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = model_class(config)
    expected = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
    parameter_shapes = [tuple(p.shape) for p in skeleton.parameters()]  # tied weights once
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {model_dir.parent}: {model_dir} holds no safetensors weights (bilevel_dlm "
                              "writes only safetensors); the folder was edited or is not a bilevel_dlm checkpoint")
    stored: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    common = stored.keys() & expected.keys()
    wrong = [f"{name} {stored[name]} (expected {expected[name]})" for name in sorted(common)
             if stored[name] != expected[name]]
    # Sizes, not names: a release may store fused or per-expert tensors under other names, and a tied weight once.
    stored_size, expected_size = sum(map(math.prod, stored.values())), sum(map(math.prod, parameter_shapes))
    if wrong or not expected_size / 2 <= stored_size <= 2 * expected_size:
        found = "; ".join(wrong[:3]) if wrong else (f"{stored_size:,} stored numbers where the config gives "
                                                     f"{expected_size:,}")
        raise CheckpointError(
            f"checkpoint {model_dir.parent}: its weights do not fit {model_class.__name__} built from "
            f"{model_dir / 'config.json'} ({found}); the model class in {META} or the config was edited, or the "
            "weights belong to another model")


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` that runs no code the folder carries (an ``auto_map`` naming its
    own tokenizer class) unless ``trust_remote_code``: refused in one line, never an interactive prompt."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise CheckpointError(f"the tokenizer in {folder} names code of its own (auto_map), which loading would run; "
                              "if you trust its author, pass trust_remote_code=True (--trust-remote-code)") from None


def _transformers_class(path: str, model_dir: Path) -> type | None:
    """``path``'s class if it is one transformers exports and the folder's model_type is one it knows."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    module, _, name = path.partition(":")
    if not module.startswith("transformers.") or not (model_dir / "config.json").exists():
        return None
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    found = getattr(transformers, name, None) if model_type in CONFIG_MAPPING_NAMES else None
    return found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else None


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
