"""Validated configuration. ``MemDLMConfig()`` is the MemDLM paper preset (shared/MEMDLM.md section 6).

Every model is frozen, rejects unknown keys and is strict: values keep their types (``rank="16"`` is an
error, not 16), rates are finite, schedules ordered. A typo in a YAML file therefore fails loudly instead
of silently falling back to a default; YAML's own types (ints, floats, lists for tuples) are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Tuples may be given as lists (YAML has no tuple type); everything else is strict.
Names = Annotated[tuple[str, ...], Field(strict=False)]

__all__ = [
    "MemoryConfig",
    "InnerConfig",
    "TrajectoryConfig",
    "OuterConfig",
    "OuterLoRAConfig",
    "AdaptConfig",
    "MemDLMConfig",
]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)


class MemoryConfig(_Strict):
    """Where the fast weights live and what they look like."""

    kind: Literal["lora", "full"] = Field("lora", description="LoRA pair (B @ A) or a full delta W")
    rank: int = Field(32, gt=0)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the fast-weight input")
    layer_fraction: float = Field(0.1, gt=0.0, le=1.0, description="last fraction of blocks that get fast weights")
    targets: Literal["ffn", "ffn+attention"] | Names = Field(
        "ffn", description="'ffn', 'ffn+attention', or block-relative module patterns"
    )
    per_sample: bool = Field(
        False, description="training memory: one set of fast weights per sample instead of one per batch (reference)"
    )
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="fast-weight dtype whatever the base dtype; float64 for numerical checks"
    )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.kind == "lora" else 1.0


class InnerConfig(_Strict):
    """The inner loop: K steps on the simulated trajectory, updating the fast weights only."""

    steps: int = Field(2, ge=0, description="K: number of inner stages / updates (0 = plain MDLM, no memory)")
    mode: Literal["first_order", "unrolled"] = "first_order"
    optimizer: Literal["sgd", "adam", "metasgd"] = "sgd"
    lr: float = Field(0.1, ge=0.0)
    clip: float | None = Field(1.0, gt=0.0, description="per-tensor gradient clipping threshold; None = off")
    loss: Literal["ce", "kl", "reverse_kl", "hidden_mse", "hidden_cosine"] = "ce"
    weighting: Literal["inverse_t", "uniform"] = "inverse_t"
    backend: Literal["torchopt", "higher"] = "torchopt"
    meta_init: Literal["none", "fomaml", "reptile", "maml"] = Field(
        "none", description="start from a fresh draw (none) or a meta-learned phi_0 (bilevel_dlm.meta_init)")
    reptile_rate: float = Field(0.1, gt=0.0, le=1.0, description="Reptile's step toward the adapted fast weights")

    @model_validator(mode="after")
    def _check(self) -> "InnerConfig":
        if self.optimizer == "metasgd" and self.mode != "unrolled":
            raise ValueError(
                "optimizer='metasgd' learns its rates through the inner updates, which needs mode='unrolled' "
                "(first-order treats the adapted fast weights as constants, so the rates would never train)"
            )
        if self.backend == "higher" and self.optimizer == "metasgd":
            raise ValueError("backend='higher' supports optimizer 'sgd' or 'adam'; use backend='torchopt' for metasgd")
        if self.meta_init == "maml" and self.mode != "unrolled":
            raise ValueError("meta_init='maml' differentiates through the inner updates: it needs mode='unrolled' "
                             "(use 'fomaml' or 'reptile' for first-order training)")
        if self.meta_init in ("fomaml", "reptile") and self.mode != "first_order":
            raise ValueError(f"meta_init={self.meta_init!r} is a first-order rule; use mode='first_order' "
                             "(or meta_init='maml' with mode='unrolled')")
        if self.meta_init != "none" and self.steps == 0:
            raise ValueError("meta_init needs inner steps > 0: with steps=0 there is no adaptation to start from phi_0")
        if self.meta_init != "none" and self.backend != "torchopt":
            raise ValueError("a meta-learned initialisation needs backend='torchopt'")
        return self


class TrajectoryConfig(_Strict):
    """How the inner stages are built from the outer anchor."""

    kind: Literal["anchor_consistent", "pre_only", "anchor_only", "progressive"] = "anchor_consistent"
    s_pre: float = Field(1.5, ge=1.0, description="pre-anchor mask ratio = min(1, s_pre * anchor ratio)")
    stage1_targets: Literal["broad", "newly_revealed"] = "broad"
    progressive_start: float = Field(0.8, gt=0.0, le=1.0)
    progressive_end: float = Field(0.2, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "TrajectoryConfig":
        if self.progressive_start < self.progressive_end:
            raise ValueError(
                f"progressive_start={self.progressive_start} < progressive_end={self.progressive_end}: the "
                "progressive trajectory reveals tokens, so its mask ratio goes down from start to end (e.g. 0.8 -> 0.2)"
            )
        return self


class OuterLoRAConfig(_Strict):
    """The paper's outer LoRA (applied through PEFT when ``apply`` is true, or bring a PeftModel)."""

    apply: bool = False
    rank: int = Field(32, gt=0)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | Names = "all-linear"


class OuterConfig(_Strict):
    """The MDLM objective at the anchor and the optimizer of the base weights theta."""

    objective: Literal["mdlm", "cart"] = Field("mdlm", description="the outer loss (bilevel_dlm.outer.OBJECTIVES)")
    cart_p: float = Field(0.3, gt=0.0, le=1.0, description="CART's geometric parameter (objective='cart')")
    schedule: Literal["linear", "cosine"] = "linear"
    t_eps: float = Field(1e-3, gt=0.0, lt=1.0)
    weighting: Literal["elbo", "uniform"] = Field("elbo", description="'elbo': w(t) = -alpha'(t) / (1 - alpha(t))")
    normalization: Literal["token", "sequence", "batch"] = "token"
    lr: float = Field(2e-5, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    meta_lr: float | None = Field(None, gt=0.0, description="AdamW rate of the inner method's meta-parameters "
                                  "(MetaSGD rates, FOMAML / MAML phi_0; no weight decay); None = lr")
    betas: Annotated[tuple[float, float], Field(strict=False)] = (0.9, 0.999)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    lora: OuterLoRAConfig = OuterLoRAConfig()

    @model_validator(mode="after")
    def _check(self) -> "OuterConfig":
        if self.objective == "cart" and self.weighting != "elbo":
            raise ValueError("objective='cart' weights each token by its clean context instead of by t, so "
                             "weighting='uniform' would be ignored; leave weighting='elbo' with CART")
        return self


class AdaptConfig(_Strict):
    """Inference-time memory: the inner loop on the prompt alone, per sample."""

    anchor_ratio: float = Field(0.2, gt=0.0, le=1.0)
    steps: int = Field(2, ge=1)
    weighting: Literal["inverse_t", "uniform"] = "uniform"
    lr: float | None = Field(None, gt=0.0, description="inner learning rate while adapting; None = inner.lr (reference)")


class MemDLMConfig(_Strict):
    """The whole bilevel recipe. Defaults reproduce MemDLM's reference hyperparameters."""

    memory: MemoryConfig = MemoryConfig()
    inner: InnerConfig = InnerConfig()
    trajectory: TrajectoryConfig = TrajectoryConfig()
    outer: OuterConfig = OuterConfig()
    adapt: AdaptConfig = AdaptConfig()
    seed: int = 0
    max_nonfinite_steps: int = Field(
        3, gt=0, description="training stops with an error after this many non-finite steps in a row (each is skipped)"
    )
    max_weight_norm_change: float | None = Field(
        1.0, gt=0.0, description="training stops with an error when one update changes the norm of the trained weights "
        "by more than this fraction (an outer learning rate far too high: the losses can stay finite while the "
        "weights explode); None: not checked")

    @model_validator(mode="after")
    def _check(self) -> "MemDLMConfig":
        if self.adapt.lr is not None and self.inner.optimizer == "metasgd":
            raise ValueError("adapt.lr cannot override the learned MetaSGD rates; leave adapt.lr unset (None)")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MemDLMConfig":
        """Load from a YAML (or JSON) file; a syntax error, an empty file, unknown keys and invalid
        values raise, naming the file (write ``{}`` for the preset)."""
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from error
        if data is None:
            raise ValueError(f"{path} is empty: a config file must hold a mapping (write {{}} for the MemDLM preset)")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.model_validate(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialise (tuples as lists); writes to ``path`` when given and returns the text."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text
