"""Outer LoRA through PEFT: put trainable LoRA layers on a backbone, and see through the PEFT wrapper.

PEFT injects its LoRA layers into the base model in place, so the base model (``get_base_model()``)
runs the adapters. The bilevel core therefore works on the base model: module paths and the adapter's
attribute paths are the backbone's own, the LoRA weights are its only trainable parameters (theta), and
the fast weights hook the base linear under each LoRA layer (``backbone.resolve_targets`` maps a LoRA
layer to its ``base_layer``), so memory and outer LoRA add up instead of wrapping each other.
"""

from __future__ import annotations

import sys

from torch import nn

from .config import OuterLoRAConfig

__all__ = ["apply_outer_lora", "base_model_of", "has_adapter_layers", "is_peft_model", "with_requested_outer_lora"]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper. A model can only be one once PEFT was imported, so PEFT (and
    the bitsandbytes it imports, with its start-up warnings) is not imported here."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def has_adapter_layers(model: nn.Module) -> bool:
    """Whether PEFT adapter layers (LoRA's ``base_layer`` / ``lora_A`` / ``lora_B``) are injected in ``model``,
    inside a PeftModel or not (the backbone a wrapper trains under an outer LoRA has them)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def base_model_of(model: nn.Module) -> nn.Module:
    """The backbone under a PEFT wrapper (with the LoRA layers injected), else the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def apply_outer_lora(model: nn.Module, config: OuterLoRAConfig) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA (rank, alpha, dropout, target modules from ``config``); only the LoRA
    weights stay trainable. ``"all-linear"`` targets every linear but the LM head."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("outer LoRA needs PEFT: pip install 'bilevel_dlm[peft]'") from error
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    return get_peft_model(model, lora)


def with_requested_outer_lora(model: nn.Module, config: OuterLoRAConfig) -> nn.Module:
    """``model`` wrapped in the configured outer LoRA when ``config.apply`` asks for it and it has none yet."""
    return apply_outer_lora(model, config) if config.apply and not is_peft_model(model) else model
