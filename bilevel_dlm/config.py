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
    rank: int = Field(32, gt=0, description="rank r of the LoRA pair (kind='lora')")
    alpha: float = Field(64.0, gt=0, description="LoRA scale numerator: the delta is (alpha / rank) B @ A")
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
    mode: Literal["first_order", "unrolled"] = Field(
        "first_order", description="first_order: the adapted fast weights are constants of the outer step; unrolled: "
        "the outer gradient flows through the K updates (second order)")
    optimizer: Literal["sgd", "adam", "metasgd"] = Field(
        "sgd", description="inner optimizer of the fast weights; metasgd learns one rate per tensor (unrolled)")
    lr: float = Field(0.1, ge=0.0, description="inner learning rate")
    clip: float | None = Field(1.0, gt=0.0, description="per-tensor gradient clipping threshold; None = off")
    loss: Literal["ce", "kl", "reverse_kl", "hidden_mse", "hidden_cosine"] = Field(
        "ce", description="inner loss per stage: CE on the masked tokens, or a distance to the next, less masked "
        "stage as teacher (logits or hidden states)")
    weighting: Literal["inverse_t", "uniform"] = Field(
        "inverse_t", description="weight of a stage's token losses: 1 / (its masked fraction) or 1")
    backend: Literal["torchopt", "higher"] = Field(
        "torchopt", description="library of the differentiable inner update (higher: pip install -e '.[higher]')")
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

    kind: Literal["anchor_consistent", "pre_only", "anchor_only", "progressive"] = Field(
        "anchor_consistent", description="the trajectory simulator: pre-anchor then the anchor (MemDLM), one of "
        "them only (ablations), or masks of their own unrelated to the anchor (progressive)")
    s_pre: float = Field(1.5, ge=1.0, description="pre-anchor mask ratio = min(1, s_pre * anchor ratio)")
    stage1_targets: Literal["broad", "newly_revealed"] = Field(
        "broad", description="stage 1 supervises every pre-anchor masked position (reference) or only those the "
        "anchor reveals (the paper's Eq. 7)")
    progressive_start: float = Field(0.8, gt=0.0, le=1.0, description="mask ratio of the first progressive stage")
    progressive_end: float = Field(0.2, gt=0.0, le=1.0, description="mask ratio of the last progressive stage")

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

    apply: bool = Field(False, description="wrap a plain model in this LoRA (PEFT); only its weights are trained")
    rank: int = Field(32, gt=0, description="LoRA rank")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha (scale alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: str | Names = Field("all-linear", description="PEFT target_modules: a name, a pattern or a list")


class OuterConfig(_Strict):
    """The MDLM objective at the anchor and the optimizer of the base weights theta."""

    objective: Literal["mdlm", "cart"] = Field("mdlm", description="the outer loss (bilevel_dlm.outer.OBJECTIVES)")
    cart_p: float = Field(0.3, gt=0.0, le=1.0, description="CART's geometric parameter (objective='cart')")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="noise schedule: mask probability t (linear) or cos(pi/2 (1 - t)) (cosine)")
    t_eps: float = Field(1e-3, gt=0.0, lt=1.0, description="anchor times are drawn from U(t_eps, 1)")
    weighting: Literal["elbo", "uniform"] = Field("elbo", description="'elbo': w(t) = -alpha'(t) / (1 - alpha(t))")
    normalization: Literal["token", "sequence", "batch"] = Field(
        "token", description="the loss is divided by the step's maskable tokens, its sequences or its samples")
    lr: float = Field(2e-5, ge=0.0, description="AdamW learning rate of theta")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay of theta")
    meta_lr: float | None = Field(None, gt=0.0, description="AdamW rate of the inner method's meta-parameters "
                                  "(MetaSGD rates, FOMAML / MAML phi_0; no weight decay); None = lr")
    betas: Annotated[tuple[float, float], Field(strict=False)] = Field((0.9, 0.999), description="AdamW betas")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup (transformers' get_*_schedule_with_warmup)")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="linear warmup over this fraction of max_steps")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip theta's gradient norm; None = off")
    lora: OuterLoRAConfig = Field(OuterLoRAConfig(), description="the outer LoRA (see OuterLoRAConfig)")

    @model_validator(mode="after")
    def _check(self) -> "OuterConfig":
        if self.objective == "cart" and self.weighting != "elbo":
            raise ValueError("objective='cart' weights each token by its clean context instead of by t, so "
                             "weighting='uniform' would be ignored; leave weighting='elbo' with CART")
        return self


class AdaptConfig(_Strict):
    """Inference-time memory: the inner loop on the prompt alone, per sample."""

    anchor_ratio: float = Field(0.2, gt=0.0, le=1.0, description="fraction of the prompt's tokens the anchor masks")
    steps: int = Field(2, ge=1, description="inner stages on the prompt")
    weighting: Literal["inverse_t", "uniform"] = Field("uniform", description="stage weighting while adapting")
    lr: float | None = Field(None, gt=0.0, description="inner learning rate while adapting; None = inner.lr (reference)")


class MemDLMConfig(_Strict):
    """The whole bilevel recipe. Defaults reproduce MemDLM's reference hyperparameters."""

    memory: MemoryConfig = Field(MemoryConfig(), description="the fast weights (MemoryConfig)")
    inner: InnerConfig = Field(InnerConfig(), description="the inner loop (InnerConfig)")
    trajectory: TrajectoryConfig = Field(TrajectoryConfig(), description="the simulated trajectory (TrajectoryConfig)")
    outer: OuterConfig = Field(OuterConfig(), description="the outer objective and theta's optimizer (OuterConfig)")
    adapt: AdaptConfig = Field(AdaptConfig(), description="inference-time memory (AdaptConfig)")
    seed: int = Field(0, description="keys every training draw (with each example's epoch and index), the data "
                      "order of fit, and adaptation's draws")
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
