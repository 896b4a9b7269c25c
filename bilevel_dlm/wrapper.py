"""MemoryWrapper: the façade that turns a masked diffusion LM into a bilevel (MemDLM) trainer.

    wrapper = MemoryWrapper(model, tokenizer=tok)       # backbone detected, MemDLM preset
    history = wrapper.fit(train_data, max_steps=1000)   # bilevel training
    memory = wrapper.adapt(prompt_ids)                  # inference-time parametric memory
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .backbone import Backbone, detect_backbone, get_backbone
from .checkpoint import (CONFIG, HISTORY, MODEL_DIR, TOKENIZER_DIR, atomic_directory_write, check_weights_fit,
                         load_tokenizer, load_weights, model_class_path, read_meta, resolve_checkpoint,
                         resolve_model_class, write_meta)
from .config import MemDLMConfig
from .contracts import FastWeights, InnerMethod, OuterObjective
from .data import PreparedBatch, iterate_batches, leading_real_tokens, prepare_batch
from .forward import ModelView
from .inner import InnerLoop, InnerResult
from .memory import MemoryParams
from .noise import Anchor
from .outer import build_outer_optimizer, make_objective
from .peft_utils import base_model_of, is_peft_model, with_requested_outer_lora
from .prefix import PrefixReplay, random_state, same_random_state
from .rng import KeyedRandom, RandomSource, RowSharedRandom, leading_padding
from .sampling import Sampler, SampleOutput, default_sampler
from .state_files import read_state, write_state
from .training import History, fit, train_step
from .trajectory import TrajectorySimulator, make_simulator, masked_fraction, random_subset

__all__ = ["MemoryWrapper", "History", "EVAL_SEED", "loss_from_terms"]

EVAL_SEED = 1234  # the default seed of evaluation anchors


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

    def step(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """One outer step on a batch (or a list of micro-batches, accumulated); returns its metrics (a single host sync). A step with non-finite
        values is skipped (metrics then hold ``nonfinite``); ``config.max_nonfinite_steps`` in a row raise
        :class:`~bilevel_dlm.training.TrainingDiverged`."""
        return train_step(self, batch)

    def fit(
        self,
        train_data: Iterable[Mapping[str, Any]],
        *,
        eval_data: Iterable[Mapping[str, Any]] | None = None,
        max_steps: int,
        batch_size: int = 8,
        gradient_accumulation_steps: int = 1,
        eval_every: int | None = None,
        eval_prompt_memory: bool = True,
        save_every: int | None = None,
        output_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        allow_pickle: bool = False,
        allow_changes: bool = False,
        progress: bool = True,
    ) -> History:
        """Bilevel training for ``max_steps`` outer steps (the data is cycled).

        ``train_data``: a list or torch Dataset of examples (one global order per epoch from
        ``config.seed``), a DataLoader, or any iterable of example or batch dicts (used in its order). Each
        optimizer step takes ``gradient_accumulation_steps`` micro-batches of ``batch_size``; every random
        draw is keyed by the example (seed, epoch, index), so accumulating 2 micro-batches of 4 draws what
        MemDLMTrainer draws on 2 processes with 4 each. With ``eval_data``, the eval loss (memory off, and
        adapted on the prompt when ``eval_prompt_memory``) is measured every ``eval_every`` steps and at the
        end. With ``save_every``, a checkpoint is written to ``output_dir/checkpoint-<step>``;
        ``resume_from`` such a checkpoint continues with exactly the draws and weights of an uninterrupted
        run (``allow_pickle``: a checkpoint of an earlier release, see :meth:`from_pretrained`); a resume
        with other settings (config, data, batch size, accumulation, max_steps) is refused unless
        ``allow_changes`` (then recorded in ``History.changes``). Batches without a maskable token are
        skipped, and a whole pass of them raises; non-finite steps are skipped (``History.nonfinite_steps``).
        """
        return fit(self, train_data, eval_data=eval_data, max_steps=max_steps, batch_size=batch_size,
                   gradient_accumulation_steps=gradient_accumulation_steps, eval_every=eval_every,
                   eval_prompt_memory=eval_prompt_memory, save_every=save_every, output_dir=output_dir,
                   resume_from=resume_from, allow_pickle=allow_pickle, allow_changes=allow_changes,
                   progress=progress)

    # ----- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, training_state: dict[str, Any] | None = None) -> Path:
        """Write model (safetensors), tokenizer, config (YAML), optimizer / scheduler / RNG state and
        ``trained_on``, atomically (a cut-off save leaves the previous checkpoint intact)."""
        self.check_savable()

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            self.config.to_yaml(tmp / CONFIG)
            state: dict[str, Any] = {
                "generator": self.generator.get_state(),
                "generator_device": self.device.type,
                "meta_parameters": [p.detach().cpu() for p in self.inner.meta_parameters()],
                "skipped_batches": self.skipped_batches,
                "trained_on": self.trained_on,
                **(training_state or {}),
            }
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
                state["scheduler"] = self.scheduler.state_dict()
            write_state(state, tmp)
            if "history" in state:  # a fit checkpoint: its History as JSON too, for people and plots
                (tmp / HISTORY).write_text(json.dumps(state["history"], indent=1))
            write_meta(tmp, {"model_class": model_class_path(self.model), "backbone": self.backbone.name,
                             "mask_token_id": self.mask_token_id})

        return atomic_directory_write(directory, write)

    def check_savable(self) -> None:
        if self.peft_model is not None:
            raise NotImplementedError(
                "save_pretrained does not support a PEFT (outer LoRA) model yet: save the adapter with "
                "wrapper.peft_model.save_pretrained(dir), or train with MemDLMTrainer, whose checkpoints do"
            )

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None,
                        allow_pickle: bool = False, trust_remote_code: bool = False, **kwargs: Any) -> "MemoryWrapper":
        """Rebuild a wrapper saved with :meth:`save_pretrained` (model class, backbone, config,
        tokenizer, RNG and meta-parameters; the optimizer is restored by ``fit(resume_from=...)``).

        ``device`` places the model; the anchor generator's state is restored when it was saved from a
        device of the same type, and re-seeded from the config (with a warning) otherwise. Loading runs no
        code from the checkpoint: ``allow_pickle`` opts in to the pickled training state of an earlier
        release, ``trust_remote_code`` to a model class the library does not know (:mod:`.checkpoint`)."""
        path = resolve_checkpoint(directory)
        meta = read_meta(path)
        model_class = resolve_model_class(meta["model_class"], path / MODEL_DIR, trust_remote_code=trust_remote_code)
        check_weights_fit(model_class, path / MODEL_DIR)
        state = read_state(path, allow_pickle=allow_pickle)
        model = model_class.from_pretrained(path / MODEL_DIR)
        if device is not None:
            model.to(device)
        tokenizer = None
        if (path / TOKENIZER_DIR).exists():
            tokenizer = load_tokenizer(path / TOKENIZER_DIR, trust_remote_code=trust_remote_code)
        wrapper = cls(model, MemDLMConfig.from_yaml(path / CONFIG), backbone=meta["backbone"],
                      tokenizer=tokenizer, mask_token_id=meta["mask_token_id"], **kwargs)
        wrapper._load_state(state)
        wrapper.trained_on = state.get("trained_on")  # not restored on resume: the caller describes its data
        return wrapper

    def _load_state(self, state: dict[str, Any]) -> None:
        if state.get("generator_device", "cpu") == self.device.type:
            self.generator.set_state(state["generator"])
        else:
            warnings.warn(f"the checkpoint's random state was saved on {state.get('generator_device')}; "
                          f"re-seeding the {self.device.type} generator from config.seed", stacklevel=3)
        self.skipped_batches = state["skipped_batches"]
        ours, saved = self.inner.meta_parameters(), state["meta_parameters"]
        if [tuple(p.shape) for p in ours] != [tuple(p.shape) for p in saved]:
            raise ValueError(
                f"the checkpoint holds {len(saved)} inner meta-parameters of shapes {[tuple(p.shape) for p in saved]}, "
                f"this wrapper's inner method has {len(ours)} of shapes {[tuple(p.shape) for p in ours]}: build the "
                "wrapper with the inner method and config the checkpoint was trained with")
        with torch.no_grad():
            for param, value in zip(ours, saved):
                param.copy_(value)
        if self.optimizer is not None and "optimizer" in state:
            groups = len(state["optimizer"]["param_groups"])
            if groups != len(self.optimizer.param_groups):
                raise ValueError(
                    f"the checkpoint's optimizer has {groups} parameter group(s), this wrapper's "
                    f"{len(self.optimizer.param_groups)} (theta, then the inner meta-parameters): it was written "
                    "for another inner method or by a bilevel_dlm release that kept meta-parameters in theta's "
                    "group; resume with the same config, or load the weights with from_pretrained and train anew")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def restore_training(self, directory: str | Path, *, allow_pickle: bool = False
                         ) -> tuple[History, int, int, dict[str, Any] | None]:
        """Load weights and training state from a ``fit`` checkpoint into this wrapper (``allow_pickle``: see
        :meth:`from_pretrained`): its history, step, consumed batches and run definition (None if not recorded)."""
        path = resolve_checkpoint(directory)
        state = read_state(path, allow_pickle=allow_pickle)
        self.weight_norm = None
        if "step" not in state:
            raise ValueError(f"{path} was not written by fit(save_every=...): it holds no training progress to resume")
        load_weights(self.model, path / MODEL_DIR)
        self._load_state(state)
        return History(**state["history"]), state["step"], state["consumed_batches"], state.get("run")

    def pad_token_id(self) -> int:
        for source in (self.tokenizer, getattr(self.model, "config", None)):
            value = getattr(source, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0

    # ----- inference-time memory ----------------------------------------------------------------
    def adapt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        seed: int | None = None,
    ) -> FastWeights:
        """Per-sample memory adapted on each prompt alone (MEMDLM.md section 5); base weights untouched.

        Every attended prompt token is maskable; the anchor masks ``adapt.anchor_ratio`` of them, and
        the inner method's ``for_prompts(memory, config.adapt)`` adapts on it (MemDLM's: the training
        trajectory and inner optimizer, ``adapt.steps`` stages with uniform weights, from phi_0 if learned).
        Random draws are shared by the rows, independent of the batch and aligned on each row's first
        real token, so row b of a batch (left- or right-padded) is adapted exactly as it would be alone.
        Returns the memory (also kept as ``self.prompt_memory``); bind it with ``memory.bind()``.
        """
        batch = self.prepare({"input_ids": input_ids, "attention_mask": attention_mask}, where="adapt")
        return self._adapt(batch.x0, batch.maskable, batch.model_attention_mask, seed)

    def _adapt(self, x0: torch.Tensor, maskable: torch.Tensor, attention_mask: torch.Tensor | None,
               seed: int | None = None) -> FastWeights:
        settings = self.config.adapt
        offsets = None if attention_mask is None else leading_padding(attention_mask)
        source = RowSharedRandom(self.config.seed if seed is None else seed, offsets)
        # One prompt needs no batch dimension (and MoE experts, which mix the tokens of a batch, accept it).
        per_sample = x0.shape[0] > 1
        memory = self.memory.spawn(per_sample)
        loop = self.inner.for_prompts(memory, settings)
        counts = torch.floor(maskable.sum(1) * settings.anchor_ratio).long().clamp_min(1)
        masked = random_subset(maskable, counts, source)
        anchor = Anchor(t=masked_fraction(masked, maskable), masked=masked,
                        input_ids=torch.where(masked, self.mask_token_id, x0))
        was_training = self.model.training
        self.model.train(self.backbone.adapt_in_train_mode)
        before = random_state(self.device)  # adaptation itself draws from its own generators only
        try:
            with torch.enable_grad():
                loop.run(x0, maskable, anchor, attention_mask, generator=source, weighting=settings.weighting)
        finally:
            self.model.train(was_training)
        if not same_random_state(before, random_state(self.device)):
            raise ValueError(
                f"{type(self.backbone).__name__} adapts in train() mode and the model drew random numbers while "
                "adapting (dropout is active), which would make the memory random: set the model's dropout "
                "probabilities (config attention/embedding/residual dropout) to 0 for inference-time memory"
            )
        self.prompt_memory = memory
        return memory

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        adapt: bool | str = True,
        sampler: Sampler | None = None,
        seed: int | None = None,
        return_history: bool = False,
        **sampler_settings: Any,
    ) -> torch.Tensor | SampleOutput:
        """Generate after each prompt of ``input_ids`` [B, P] (left-padded when lengths differ).

        ``adapt``: ``True`` / ``"prompt"`` gives each prompt its own memory (:meth:`adapt`), bound while
        sampling; ``"blocks"`` also re-adapts it after every committed block on the prompt plus the tokens
        committed so far (memory while decoding; block samplers only); ``False`` is exactly the plain
        sampler. The sampler is the backbone's default built from ``sampler_settings`` unless one is given.
        Returns the sequences [B, P + max_new_tokens], or the full :class:`SampleOutput` with ``return_history``.
        """
        if sampler is not None and sampler_settings:
            raise ValueError(f"pass either sampler= or sampler settings, not both (got {sorted(sampler_settings)})")
        if adapt not in (True, False, "prompt", "blocks"):
            raise ValueError(f"adapt must be True, False, 'prompt' or 'blocks', got {adapt!r}")
        sampler = sampler or default_sampler(self.backbone, **sampler_settings)
        self.prepare({"input_ids": input_ids, "attention_mask": attention_mask}, where="generate")  # validation
        margin = sampler.canvas_margin  # a block sampler may complete its last block
        needed = input_ids.shape[-1] + max_new_tokens + margin
        if self.max_length is not None and needed > self.max_length:
            room = self.max_length - margin
            fix = (f"shorten the prompt (e.g. keep its last {room - max_new_tokens} tokens) or generate at most "
                   f"{room - input_ids.shape[-1]} tokens" if max_new_tokens < room
                   else f"generate at most {room - input_ids.shape[-1]} tokens after this prompt")
            completed = f" (+ {margin} to complete a block)" if margin else ""
            raise ValueError(
                f"a prompt of {input_ids.shape[-1]} tokens (padding included) + max_new_tokens={max_new_tokens}"
                f"{completed} needs {needed} positions, more than the model's maximum length {self.max_length}: {fix}")
        seed = self.config.seed if seed is None else seed
        input_ids = input_ids.to(self.device)
        attention_mask = None if attention_mask is None else attention_mask.to(self.device)
        was_training = self.model.training
        memory = self.adapt(input_ids, attention_mask, seed=seed) if adapt else None

        def refresh(canvas: torch.Tensor, end: int) -> None:
            """Re-adapt on the prompt and the committed tokens (masks and padding hidden)."""
            committed = canvas[:, :end] != self.mask_token_id
            if attention_mask is not None:
                committed[:, : attention_mask.shape[1]] &= attention_mask.bool()
            with memory.suspended():
                memory.set(self.adapt(canvas[:, :end], committed.long(), seed=seed).values)
            self.prompt_memory = memory

        self.model.eval()
        try:
            with memory.bind() if memory is not None else nullcontext():
                output = sampler.sample(self.view, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                        generator=torch.Generator(self.device).manual_seed(seed),
                                        return_history=return_history,
                                        on_block_end=refresh if adapt == "blocks" else None)
        finally:
            self.model.train(was_training)
        return output if return_history else output.sequences

    @torch.no_grad()
    def eval_loss(
        self,
        data: Iterable[Mapping[str, Any]],
        memory: str = "off",
        *,
        batch_size: int = 8,
        seed: int = EVAL_SEED,
    ) -> float:
        """MDLM loss on ``data`` with memory ``off`` or adapted on each sample's ``prompt``.

        The loss is the configured normalisation over the whole data set (``token``: weighted CE summed
        over every example, divided by the number of maskable tokens), not a mean of batch means. Each
        example's anchor is drawn from its own tokens and ``seed`` (identical in both modes), so the
        value does not depend on the batch size, the order or the padding. Memory is never adapted on
        the tokens it scores: with ``prompt`` it adapts on the prompt positions alone (responses hidden
        from attention), then scores the response.
        """
        return loss_from_terms(self.eval_loss_terms(data, memory, batch_size=batch_size, seed=seed), seed)

    @torch.no_grad()
    def eval_loss_terms(
        self,
        data: Iterable[Mapping[str, Any]],
        memory: str = "off",
        *,
        batch_size: int = 8,
        seed: int = EVAL_SEED,
    ) -> torch.Tensor:
        """(numerator, denominator, masked tokens) [3] of :meth:`eval_loss`, summed over the data: add the
        terms of several shards (processes) and give them to :func:`loss_from_terms` for their union's loss."""
        if memory not in ("off", "prompt"):
            raise ValueError(f"memory must be 'off' or 'prompt', got {memory!r}")
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        try:
            for raw in iterate_batches(data, batch_size, pad_token_id=self.pad_token_id(), shuffle=False, repeat=False):
                batch = self.prepare(raw)
                if not batch.has_maskable:
                    continue
                anchor = self.outer.keyed_anchor(batch.x0, batch.maskable, batch.attention_mask, seed)
                bound = nullcontext()
                if memory == "prompt":
                    protected = leading_real_tokens(batch.attention_mask, self.backbone.protected_prefix)
                    adapted = self._adapt(batch.x0, batch.prompt & ~protected, batch.prompt.long(), seed)
                    bound = adapted.bind()
                with bound:
                    terms = self.outer.loss_terms(batch.x0, batch.maskable, anchor, batch.model_attention_mask)
                totals += torch.stack([*terms, anchor.masked.sum()]).double()
        finally:
            self.model.train(was_training)
        return totals


def loss_from_terms(terms: torch.Tensor, seed: int) -> float:
    """The evaluation loss of summed :meth:`MemoryWrapper.eval_loss_terms`; refused when the data has no
    maskable token, or when no anchor masked a token (a loss of 0 would measure nothing: each example's
    anchor masks a fraction t ~ U(0, 1) of its tokens, so a few short examples can mask none)."""
    numerator, denominator, masked = terms.tolist()
    if denominator == 0:
        raise ValueError("eval data has no maskable (response) token")
    if masked == 0:
        raise ValueError(f"no evaluation anchor (seed {seed}) masked a token of this data, so there is no loss to "
                         "report; evaluate more (or longer) examples, or another seed")
    return numerator / denominator
