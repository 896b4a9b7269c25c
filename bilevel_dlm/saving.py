"""Saving and loading a :class:`~bilevel_dlm.wrapper.MemoryWrapper`: its model, tokenizer, config and
training state in one folder, written atomically and read without running code from it (the file formats and
checks are :mod:`bilevel_dlm.checkpoint` and :mod:`bilevel_dlm.state_files`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CONFIG, HISTORY, MODEL_DIR, TOKENIZER_DIR, CheckpointError, atomic_directory_write,
                         check_weights_fit, load_tokenizer, load_weights, model_class_path, read_meta,
                         resolve_checkpoint, resolve_model_class, write_meta)
from .config import MemDLMConfig
from .engine import Engine
from .history import History
from .state_files import read_state, write_state

__all__ = ["save_pretrained", "load_pretrained", "load_training_state", "restore_training"]


def save_pretrained(wrapper: Engine, directory: str | Path, *, training_state: dict[str, Any] | None = None) -> Path:
    """Write model (safetensors), tokenizer, config (YAML), optimizer / scheduler / RNG state and
    ``trained_on``, atomically (a cut-off save leaves the previous checkpoint intact)."""
    wrapper.check_savable()

    def write(tmp: Path) -> None:
        wrapper.model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
        if wrapper.tokenizer is not None and hasattr(wrapper.tokenizer, "save_pretrained"):
            wrapper.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        wrapper.config.to_yaml(tmp / CONFIG)
        state: dict[str, Any] = {
            "generator": wrapper.generator.get_state(),
            "generator_device": wrapper.device.type,
            "meta_parameters": [p.detach().cpu() for p in wrapper.inner.meta_parameters()],
            "skipped_batches": wrapper.skipped_batches,
            "trained_on": wrapper.trained_on,
            **(training_state or {}),
        }
        if wrapper.optimizer is not None:
            state["optimizer"] = wrapper.optimizer.state_dict()
            state["scheduler"] = wrapper.scheduler.state_dict()
        write_state(state, tmp)
        if "history" in state:  # a fit checkpoint: its History as JSON too, for people and plots
            (tmp / HISTORY).write_text(json.dumps(state["history"], indent=1))
        write_meta(tmp, {"model_class": model_class_path(wrapper.model), "backbone": wrapper.backbone.name,
                         "mask_token_id": wrapper.mask_token_id})

    return atomic_directory_write(directory, write)


def load_pretrained(cls: type, directory: str | Path, *, device: str | torch.device | None = None,
                    allow_pickle: bool = False, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """Rebuild a wrapper saved with :func:`save_pretrained` (model class, backbone, config, tokenizer, RNG and
    meta-parameters; the optimizer is restored by ``fit(resume_from=...)``) as ``cls(model, config, ...)``.

    ``device`` places the model; the anchor generator's state is restored when it was saved from a device of
    the same type, and re-seeded from the config (with a warning) otherwise. Loading runs no code from the
    checkpoint: ``allow_pickle`` opts in to the pickled training state of an earlier release,
    ``trust_remote_code`` to a model class the library does not know (:mod:`bilevel_dlm.checkpoint`);
    ``kwargs`` go to ``cls`` (an inner method, a simulator, ...)."""
    path = resolve_checkpoint(directory)
    meta = read_meta(path)
    model_class = resolve_model_class(meta["model_class"], path / MODEL_DIR, trust_remote_code=trust_remote_code)
    check_weights_fit(model_class, path / MODEL_DIR)
    state = read_state(path, allow_pickle=allow_pickle)
    model, loading = model_class.from_pretrained(path / MODEL_DIR, output_loading_info=True)
    if loading["missing_keys"] or loading["unexpected_keys"]:
        raise CheckpointError(
            f"checkpoint {path}: its weights do not match {model_class.__name__} (missing "
            f"{sorted(loading['missing_keys'])[:3]}, unexpected {sorted(loading['unexpected_keys'])[:3]}), so some "
            "weights would stay random; the weights were saved from a modified model (merge adapters before saving) "
            "or the folder was edited")
    if device is not None:
        model.to(device)
    tokenizer = None
    if (path / TOKENIZER_DIR).exists():
        tokenizer = load_tokenizer(path / TOKENIZER_DIR, trust_remote_code=trust_remote_code)
    wrapper = cls(model, MemDLMConfig.from_yaml(path / CONFIG), backbone=meta["backbone"],
                  tokenizer=tokenizer, mask_token_id=meta["mask_token_id"], **kwargs)
    load_training_state(wrapper, state)
    wrapper.trained_on = state.get("trained_on")  # not restored on resume: the caller describes its data
    return wrapper


def load_training_state(wrapper: Engine, state: dict[str, Any]) -> None:
    """Restore the RNG, skip counter, inner meta-parameters and (when built) optimizer and schedule."""
    if state.get("generator_device", "cpu") == wrapper.device.type:
        wrapper.generator.set_state(state["generator"])
    else:
        warnings.warn(f"the checkpoint's random state was saved on {state.get('generator_device')}; "
                      f"re-seeding the {wrapper.device.type} generator from config.seed", stacklevel=3)
    wrapper.skipped_batches = state["skipped_batches"]
    ours, saved = wrapper.inner.meta_parameters(), state["meta_parameters"]
    if [tuple(p.shape) for p in ours] != [tuple(p.shape) for p in saved]:
        raise ValueError(
            f"the checkpoint holds {len(saved)} inner meta-parameters of shapes {[tuple(p.shape) for p in saved]}, "
            f"this wrapper's inner method has {len(ours)} of shapes {[tuple(p.shape) for p in ours]}: build the "
            "wrapper with the inner method and config the checkpoint was trained with")
    with torch.no_grad():
        for param, value in zip(ours, saved):
            param.copy_(value)
    if wrapper.optimizer is not None and "optimizer" in state:
        groups = len(state["optimizer"]["param_groups"])
        if groups != len(wrapper.optimizer.param_groups):
            raise ValueError(
                f"the checkpoint's optimizer has {groups} parameter group(s), this wrapper's "
                f"{len(wrapper.optimizer.param_groups)} (theta, then the inner meta-parameters): it was written "
                "for another inner method or by a bilevel_dlm release that kept meta-parameters in theta's "
                "group; resume with the same config, or load the weights with from_pretrained and train anew")
        wrapper.optimizer.load_state_dict(state["optimizer"])
        wrapper.scheduler.load_state_dict(state["scheduler"])


def restore_training(wrapper: Engine, directory: str | Path, *, allow_pickle: bool = False
                     ) -> tuple[History, int, int, dict[str, Any] | None]:
    """Load weights and training state from a ``fit`` checkpoint into ``wrapper`` (``allow_pickle``: see
    :func:`load_pretrained`): its history, step, consumed micro-batches and run definition (None if not recorded)."""
    path = resolve_checkpoint(directory)
    state = read_state(path, allow_pickle=allow_pickle)
    wrapper.weight_norm = None
    if "step" not in state:
        raise ValueError(f"{path} was not written by fit(save_every=...): it holds no training progress to resume")
    load_weights(wrapper.model, path / MODEL_DIR)
    load_training_state(wrapper, state)
    return History(**state["history"]), state["step"], state["consumed_batches"], state.get("run")
