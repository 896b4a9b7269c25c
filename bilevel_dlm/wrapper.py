"""MemoryWrapper: the façade that turns a masked diffusion LM into a bilevel (MemDLM) trainer.

    wrapper = MemoryWrapper(model, tokenizer=tok)       # backbone detected, MemDLM preset
    history = wrapper.fit(train_data, max_steps=1000)   # bilevel training
    memory = wrapper.adapt(prompt_ids)                  # inference-time parametric memory

The class holds the model and the parts of the method and builds one training step from them; each job
lives in its own module and is a method here by assignment, defined and documented once: ``fit`` and
``step`` (:mod:`bilevel_dlm.training`), ``save_pretrained`` / ``from_pretrained`` / ``restore_training``
(:mod:`bilevel_dlm.saving`), ``adapt`` (:mod:`bilevel_dlm.adaptation`), ``generate``
(:mod:`bilevel_dlm.generation`), ``eval_loss`` (:mod:`bilevel_dlm.eval_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adaptation import adapt
from .backbone import Backbone, detect_backbone, get_backbone
from .compiled import refuse_compiled_wrapper, refuse_unrolled_if_compiled
from .config import MemDLMConfig
from .contracts import FastWeights, InnerMethod, InnerResult, OuterObjective
from .data import PreparedBatch, prepare_batch
from .eval_loss import EVAL_SEED, eval_loss, eval_loss_terms, loss_from_terms
from .forward import ModelView
from .generation import generate
from .history import History
from .inner import InnerLoop
from .memory import MemoryParams
from .noise import Anchor
from .outer import build_outer_optimizer, make_objective
from .peft_utils import base_model_of, has_adapter_layers, is_peft_model, with_requested_outer_lora
from .prefix import PrefixReplay
from .rng import KeyedRandom, RandomSource
from .saving import load_pretrained, restore_training, save_pretrained
from .training import fit, train_step
from .trajectory import TrajectorySimulator, make_simulator

__all__ = ["MemoryWrapper", "History", "EVAL_SEED", "loss_from_terms"]


class MemoryWrapper:
    """Bilevel training and inference-time memory for one masked diffusion LM.

    Args:
        model: the (unwrapped) backbone model, or a PEFT model (outer LoRA); its trainable parameters
            are theta. With ``config.outer.lora.apply`` a plain model gets the configured outer LoRA.
        config: the recipe (default: the MemDLM preset).
        backbone: adapter name or instance (default: detected from the model).
        tokenizer: used for its mask / pad token ids when the model declares none.
        mask_token_id: explicit mask token id (overrides model and tokenizer).
        simulator: a custom trajectory simulator (default: from ``config.trajectory``).
        inner_optimizer: a torchopt GradientTransformation or MetaSGD (default: from ``config.inner``).
        inner: another inner method (an :class:`~bilevel_dlm.contracts.InnerMethod`, or a callable building
            one from this wrapper's ``(view, memory)``); default: MemDLM's :class:`InnerLoop` from the config.
        outer: another outer objective (an :class:`~bilevel_dlm.contracts.OuterObjective`, or a callable
            building one from the view); default: ``config.outer.objective``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MemDLMConfig | None = None,
        *,
        backbone: str | Backbone | None = None,
        tokenizer: Any = None,
        mask_token_id: int | None = None,
        simulator: TrajectorySimulator | None = None,
        inner_optimizer: Any = None,
        inner: InnerMethod | Callable[[ModelView, MemoryParams], InnerMethod] | None = None,
        outer: OuterObjective | Callable[[ModelView], OuterObjective] | None = None,
    ) -> None:
        self.config = config or MemDLMConfig()
        refuse_compiled_wrapper(model)  # before anything reads its layout
        model = with_requested_outer_lora(model, self.config.outer.lora)
        # Under PEFT the bilevel core runs on the base model, whose linears carry the injected LoRA layers.
        self.peft_model = model if is_peft_model(model) else None
        self.model = model = base_model_of(model)
        self.tokenizer = tokenizer
        if isinstance(backbone, str):
            backbone = get_backbone(backbone)
        self.backbone = backbone or detect_backbone(model)
        self.view = ModelView(self.backbone, model, self._resolve_mask_id(mask_token_id))
        self.vocab_size, self.max_length = self.backbone.vocab_size(model), self.backbone.max_length(model)
        if inner is not None and (simulator is not None or inner_optimizer is not None):
            raise ValueError("simulator= and inner_optimizer= configure the default inner loop (InnerLoop); with "
                             "inner=..., give them to your inner method instead")
        if inner is not None and not isinstance(inner, InnerMethod) and not callable(inner):
            raise TypeError(f"inner must be an InnerMethod or build one from (view, memory), got {type(inner).__name__}")
        if not isinstance(inner, InnerMethod):  # the default loop and factories get config.memory's fast weights
            self.memory = MemoryParams(model, self.config.memory, backbone=self.backbone)
            inner = self._default_inner(simulator, inner_optimizer) if inner is None else inner(self.view, self.memory)
        if not isinstance(inner, InnerMethod):
            raise TypeError(f"inner must be an InnerMethod or build one from (view, memory), got {type(inner).__name__}")
        self.inner, self.memory = inner, inner.memory
        refuse_unrolled_if_compiled(model, self.inner.unrolled)
        if outer is None:
            outer = make_objective(self.view, self.config.outer)
        elif not isinstance(outer, OuterObjective):
            outer = outer(self.view) if callable(outer) else outer
        if not isinstance(outer, OuterObjective):
            raise TypeError(f"outer must be an OuterObjective or build one from (view), got {type(outer).__name__}")
        self.outer = outer
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(self.config.seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.skipped_batches = 0
        # What the model was trained on, as its trainer describes it (the CLI records its data options);
        # saved with every checkpoint, so evaluation can default to the same data.
        self.trained_on: dict[str, Any] | None = None
        # Optimizer updates applied, the current run of skipped non-finite steps, and the last finite
        # step's (update, metrics): the non-finite guard of bilevel_dlm.training reads them.
        self.updates = 0
        self.nonfinite_run = 0
        self.last_finite: tuple[int, dict[str, float]] | None = None
        self.weight_norm: float | None = None  # of theta before the last step: how much each update moved it
        self.prompt_memory: FastWeights | None = None
        # Reuse the anchor stage's pass through the blocks below the first fast weight in the outer
        # pass (bilevel_dlm.prefix); off only to measure what it saves.
        self.share_prefix = True

    # ----- set-up ------------------------------------------------------------------------------
    def _default_inner(self, simulator: TrajectorySimulator | None, inner_optimizer: Any) -> InnerLoop:
        """MemDLM's inner loop from the config (the simulator and optimizer objects replace theirs)."""
        if inner_optimizer is not None and self.config.adapt.lr is not None:
            raise ValueError("adapt.lr rebuilds the inner optimizer from the config at that rate, so it cannot "
                             "apply to an inner_optimizer object; leave adapt.lr unset or pass no inner_optimizer")
        trajectory = self.config.trajectory
        simulator = simulator or make_simulator(trajectory.kind, trajectory.s_pre, trajectory.stage1_targets,
                                                trajectory.progressive_start, trajectory.progressive_end)
        return InnerLoop(self.view, self.memory, simulator, inner_optimizer, self.config.inner, seed=self.config.seed)

    def _resolve_mask_id(self, explicit: int | None) -> int:
        for candidate in (explicit, self.backbone.mask_token_id(self.model),
                          getattr(self.tokenizer, "mask_token_id", None)):
            if candidate is not None:
                return int(candidate)
        raise ValueError(
            f"no mask token id: {type(self.model).__name__}.config has no mask_token_id and no tokenizer "
            "with a mask token was given. Pass mask_token_id=<id> (e.g. 126336 for LLaDA-8B)."
        )

    @property
    def mask_token_id(self) -> int:
        return self.view.mask_token_id

    def trainable_parameters(self) -> list[nn.Parameter]:
        """theta (the model's trainable parameters) plus the inner method's meta-parameters."""
        return [p for p in self.model.parameters() if p.requires_grad] + self.inner.meta_parameters()

    def configure_optimizers(self, max_steps: int | None) -> None:
        """Build AdamW and the learning-rate schedule for ``max_steps`` outer steps (``None``: constant
        learning rate, what :meth:`step` uses when called before any ``fit``)."""
        theta = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_outer_optimizer(theta, self.config.outer, max_steps,
                                                               self.inner.meta_parameters())

    def prepare(self, batch: Mapping[str, Any], where: str = "batch") -> PreparedBatch:
        """Validate a batch against this model (vocabulary, maximum length) and derive its maskable positions."""
        return prepare_batch(batch, self.device, self.backbone.protected_prefix, vocab_size=self.vocab_size,
                             max_length=self.max_length, mask_token_id=self.mask_token_id, where=where)

    # ----- training ----------------------------------------------------------------------------
    @contextmanager
    def bilevel_context(self) -> Iterator[None]:
        """Keep the memory bound (and, in unrolled mode, attention on the math SDPA kernel, which has a
        second derivative) across a :meth:`compute_loss` and its backward: gradient checkpointing
        recomputes forwards during backward, and they must run exactly as the first time."""
        kernel = sdpa_kernel(SDPBackend.MATH) if self.inner.unrolled else nullcontext()
        memory = self.memory.bind() if self.inner.adapts else nullcontext()
        with memory, kernel:
            yield

    def compute_loss(self, batch: PreparedBatch) -> tuple[torch.Tensor, InnerResult, Anchor]:
        """The bilevel forward: anchor, inner adaptation, outer loss with the adapted memory bound.

        The returned loss carries theta's graph. Call it and run the backward inside
        :meth:`bilevel_context` (as :meth:`step` does); a loop of your own must then also call
        ``inner.after_backward()`` and, after the optimizer step, ``inner.after_step(stepped)``, or a
        meta-learned initialisation is never updated.
        """
        x0, maskable, attention = batch.x0, batch.maskable, batch.model_attention_mask
        source = self.random_source(batch)
        anchor = self.outer.sample_anchor(x0, maskable, source)
        first = self.memory.first_block
        shared = first > 0 and self.share_prefix and self.inner.shares_anchor_prefix
        prefix = PrefixReplay(self.backbone.blocks(self.model), first) if shared else None
        inner = self.inner.run(x0, maskable, anchor, attention, generator=source, prefix=prefix)
        replay = prefix.replay() if prefix is not None and prefix.recorded else nullcontext()
        with self.bilevel_context(), replay:
            loss = self.outer.loss(x0, maskable, anchor, attention)
        return loss, inner, anchor

    def random_source(self, batch: PreparedBatch) -> RandomSource:
        """The draws of a training step: keyed by each row's (epoch, example index) with ``config.seed`` when
        the batch carries them (always in ``fit`` and MemDLMTrainer), so they do not depend on the batch,
        the process or a resume; otherwise the next numbers of ``self.generator``."""
        if batch.random_keys is None:
            return self.generator
        return KeyedRandom(self.config.seed, batch.random_keys, batch.attention_mask)

    step = train_step  # bilevel_dlm.training
    fit = fit

    # ----- checkpoints (bilevel_dlm.saving) -------------------------------------------------------
    save_pretrained = save_pretrained
    from_pretrained = classmethod(load_pretrained)
    restore_training = restore_training

    def check_savable(self) -> None:
        """Refuse early what :meth:`save_pretrained` cannot write: a PEFT model, or a backbone with adapter layers
        injected (its weight names would not fit the plain model class, and loading would leave weights random)."""
        if self.peft_model is not None or has_adapter_layers(self.model):
            raise NotImplementedError(
                "save_pretrained does not support a model with PEFT (outer LoRA) layers yet: merge them first "
                "(wrapper.peft_model.merge_and_unload() gives the plain model), save the adapter with "
                "wrapper.peft_model.save_pretrained(dir), or train with MemDLMTrainer, whose checkpoints do"
            )

    def pad_token_id(self) -> int:
        """The id that pads batches: the tokenizer's, else the model config's, else 0."""
        for source in (self.tokenizer, getattr(self.model, "config", None)):
            value = getattr(source, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0

    # ----- inference-time memory, generation, evaluation ----------------------------------------
    adapt = adapt  # bilevel_dlm.adaptation
    generate = generate  # bilevel_dlm.generation
    eval_loss = eval_loss  # bilevel_dlm.eval_loss
    eval_loss_terms = eval_loss_terms
