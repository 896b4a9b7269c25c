"""Backbone adapters: everything the core needs to know about one family of masked diffusion LMs.

The core never names a backbone. It asks an adapter where the transformer blocks are, which linears
inside a block are FFN / attention targets for fast weights, which token is the mask, how to call the
model's forward, and how to turn the final hidden states into logits aligned with the input (position
i predicts token i). One small subclass per family, registered with :func:`register_backbone` and
detected from ``config.model_type`` or the model's class name (see README, "Adding a backbone").
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Backbone", "register_backbone", "detect_backbone", "get_backbone", "registered_backbones"]

_REGISTRY: dict[str, type["Backbone"]] = {}


class Backbone:
    """Adapter base class. Subclasses set the class attributes and override what differs.

    Target patterns are module paths relative to one block; ``*`` matches one path component
    (``"mlp.experts.*.gate_proj"``).
    """

    name: ClassVar[str] = ""
    # Module path of the transformer blocks (an nn.ModuleList), e.g. "model.layers"; or override blocks().
    blocks_path: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    class_names: ClassVar[tuple[str, ...]] = ()
    ffn_targets: ClassVar[tuple[str, ...]] = ()
    attention_targets: ClassVar[tuple[str, ...]] = ()
    # Targets whose module sees the tokens of several samples mixed together (MoE experts): per-sample
    # fast weights cannot be applied there.
    token_mixing_targets: ClassVar[tuple[str, ...]] = ()
    # Leading positions that are never masked nor supervised (Dream's BOS).
    protected_prefix: ClassVar[int] = 0
    # How many columns before position i the raw hidden state that align_hidden puts at i sits (Dream's
    # shifted logits: 1). A windowed forward (bilevel_dlm.kv_cache) must compute those columns too.
    hidden_lookback: ClassVar[int] = 0
    # Some models only run their routed experts with autograd in train() mode (LLaDA2); adapt() then
    # runs in train mode and refuses models with active dropout (it would make the memory random).
    adapt_in_train_mode: ClassVar[bool] = False
    default_sampler: ClassVar[str] = "llada"
    # Whose evaluation rule scores log-likelihoods in lm-eval (bilevel_dlm.lm_eval.protocols): "llada"
    # (LLaDA's eval, also dllm's MDLM harness) or "dream" (dllm's Dream harness).
    likelihood_protocol: ClassVar[str] = "llada"

    # ----- structure -------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of transformer blocks, in execution order (``blocks_path`` by default).

        A model without that module raises a ValueError that names the expected path and the modules
        the model has.
        """
        if not self.blocks_path:
            raise NotImplementedError(f"{type(self).__name__} must set blocks_path or implement blocks(model)")
        try:
            blocks = model.get_submodule(self.blocks_path)
        except AttributeError:
            children = [name for name, _ in model.named_children()]
            raise ValueError(
                f"the {self.name!r} adapter expects the transformer blocks at {self.blocks_path!r}, but "
                f"{type(model).__name__} has no such module (its top-level modules: {children}). Pass the adapter "
                "of this model's family as backbone=, or leave backbone out to detect it."
            ) from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(model).__name__}.{self.blocks_path} is a {type(blocks).__name__}, not the "
                             f"nn.ModuleList of blocks the {self.name!r} adapter expects")
        return blocks

    def vocab_size(self, model: nn.Module) -> int | None:
        """Number of token ids the model embeds (ids must be below it), or None when unknown."""
        try:
            embedding = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embedding = None
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
        value = getattr(getattr(model, "config", None), "vocab_size", None)
        return None if value is None else int(value)

    def max_length(self, model: nn.Module) -> int | None:
        """Longest sequence the model takes (from its config), or None when it declares none."""
        config = getattr(model, "config", None)
        for field in ("max_sequence_length", "max_position_embeddings", "model_length", "n_positions"):
            value = getattr(config, field, None)
            if isinstance(value, int):
                return value
        return None

    def mask_token_id(self, model: nn.Module) -> int | None:
        """The mask token id, or None when the model does not declare one."""
        value = getattr(getattr(model, "config", None), "mask_token_id", None)
        return None if value is None else int(value)

    def output_head(self, model: nn.Module) -> nn.Module:
        """The module mapping final hidden states to vocabulary logits (its input is captured)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise TypeError(
                f"{type(self).__name__}: {type(model).__name__} has no output embedding module; "
                "override Backbone.output_head(model) to return the LM head."
            )
        return head

    def ffn_target_patterns(self, model: nn.Module) -> tuple[str, ...]:
        """FFN linears of a block; override when they depend on the config (e.g. a shared expert)."""
        return self.ffn_targets

    def attention_target_patterns(self, model: nn.Module) -> tuple[str, ...]:
        """Attention projections of a block."""
        return self.attention_targets

    def ignores_time(self, model: nn.Module) -> bool:
        """True when the forward does not depend on ``mask_ratio`` (so a sampler may reuse predictions
        while the canvas is unchanged)."""
        return True

    def reports_routed_tokens(self, model: nn.Module) -> bool:
        """True when the model declares the routed tokens of every call of a token-mixing target
        (:func:`bilevel_dlm.routing.routed_tokens`), so that per-sample memory can sit on them."""
        return False

    # ----- forward -----------------------------------------------------------------------------
    def call(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask_ratio: torch.Tensor | None = None,
        **forward_kwargs: Any,
    ) -> Any:
        """Run the model's forward on a [B, L] batch (2D attention mask, 1 = keep).

        ``mask_ratio`` [B] is the fraction of masked positions per sample, for time-conditioned models;
        ``forward_kwargs`` (e.g. ``kv_cache``) go to the model's forward as they are.
        """
        return model(input_ids=input_ids, **self.attention_kwargs(model, attention_mask), **forward_kwargs)

    def attention_kwargs(self, model: nn.Module, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        """``{"attention_mask": mask}`` for a forward that takes one. A model whose forward has no
        ``attention_mask`` parameter (the MDLM release) gets none: an all-ones mask is dropped, a padded
        batch raises, since that model cannot hide padding from attention."""
        if attention_mask is None:
            return {}
        if _accepts(model, "attention_mask"):
            return {"attention_mask": attention_mask}
        if bool(attention_mask.bool().all()):
            return {}
        raise ValueError(
            f"{type(model).__name__}.forward takes no attention_mask, so it cannot hide padding, and this batch "
            "is padded. Use batches of equal length (no padding), or load the checkpoint with the library's "
            "native model class, whose forward masks padded keys."
        )

    def align_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Reorder final hidden states [B, L, d] so that position i predicts token i."""
        return hidden

    def finalize_logits(self, logits: torch.Tensor, input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """Post-process head logits [..., V] given the input tokens at the same positions [...]."""
        return logits


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str] | None:
    """Parameter names of ``model_type.forward``; None when unknown or when it takes ``**kwargs``."""
    try:
        signature = inspect.signature(model_type.forward)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return frozenset(signature.parameters)


def _accepts(model: nn.Module, argument: str) -> bool:
    """True when ``model.forward`` has a parameter ``argument`` (or takes ``**kwargs``)."""
    parameters = _forward_parameters(type(model))
    return parameters is None or argument in parameters


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make an adapter available by name and for auto-detection."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set the class attribute `name` to register it")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_integrations() -> None:
    importlib.import_module("bilevel_dlm.integrations")


def registered_backbones() -> dict[str, type[Backbone]]:
    """Name -> adapter class of every registered backbone (built-in ones included)."""
    _load_builtin_integrations()
    return dict(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    """Instantiate a registered adapter by name."""
    registry = registered_backbones()
    if name not in registry:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(registry)}")
    return registry[name]()


def detect_backbone(model: nn.Module) -> Backbone:
    """Find the adapter for a model from its class name, then from ``config.model_type``.

    The class name comes first because some releases reuse another family's ``model_type`` (the
    LLaDA-MoE release's config says "llada").
    """
    registry = registered_backbones()
    class_name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for matches in (lambda cls: class_name in cls.class_names, lambda cls: model_type in cls.model_types):
        for cls in registry.values():
            if matches(cls):
                return cls()
    raise ValueError(
        f"no backbone adapter matches class {class_name!r} / model_type={model_type!r}. "
        f"Registered: {sorted(registry)}. Pass backbone=<name or Backbone instance>, or register an "
        "adapter with @register_backbone (README: 'Adding a backbone')."
    )


def resolve_targets(
    backbone: Backbone,
    model: nn.Module,
    patterns: tuple[str, ...],
    block_indices: list[int],
    *,
    strict: bool = True,
) -> dict[str, nn.Module]:
    """Full module path -> module for every block-relative pattern in the given blocks.

    With ``strict`` a pattern that matches nothing in any of the blocks raises, listing the available
    linears. (A pattern may match in some blocks only: the dense first layers of an MoE model have no
    experts, the MoE layers no dense MLP.)
    """
    blocks = backbone.blocks(model)
    block_paths = {id(m): n for n, m in model.named_modules()}
    found: dict[str, nn.Module] = {}
    matched: set[str] = set()
    for index in block_indices:
        block = blocks[index]
        prefix = block_paths[id(block)]
        linears = _linear_modules(block)
        for pattern in patterns:
            hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")]
            matched.update([pattern] if hits else [])
            for name in hits:
                found[f"{prefix}.{name}"] = linears[name]
    missing = [p for p in patterns if p not in matched]
    if missing and strict and block_indices:
        first = block_indices[0]
        available = sorted(_linear_modules(blocks[first]))
        raise ValueError(
            f"target module {missing[0]!r} not found in blocks {block_indices[0]}..{block_indices[-1]} "
            f"({block_paths[id(blocks[first])]} ...); available linear modules of block {first}: {available}. "
            "Fix MemoryConfig.targets or the adapter's target names."
        )
    return found


def _linear_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Block-relative name -> leaf linear. Quantised linears count (they expose in/out features); a
    PEFT LoRA layer is reported under its own name but resolves to the base linear underneath it, so
    fast weights sit under an outer LoRA."""
    found = {}
    for name, module in block.named_modules():
        is_leaf_linear = isinstance(module, nn.Linear) or (
            hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children())
        )
        if is_leaf_linear:
            found[name.removesuffix(".base_layer")] = module
    return found
