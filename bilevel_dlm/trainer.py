"""MemDLM in the transformers Trainer, and thereby under accelerate and torchrun.

    args = MemDLMTrainingArguments(output_dir="run", memdlm=MemDLMConfig(), max_steps=1000)
    MemDLMTrainer(model, args, train_dataset=train, eval_dataset=held_out).train()

The Trainer keeps what it owns (data loading, theta's optimizer and schedule, clipping, gradient
accumulation, logging, checkpoints); the loss is the bilevel step of a :class:`MemoryWrapper` built on
the unwrapped model (the base model under a PEFT wrapper). Fast weights are plain tensors bound by
hooks, so the optimizer, gradient clipping, the logged grad norm and DDP's buckets never see them.

Under DistributedDataParallel the whole bilevel computation runs as the DDP module's forward
(:func:`ddp_forward`), so DDP's reducer all-reduces theta's outer gradient as after ``ddp(inputs)``.
The inner loop asks autograd for gradients w.r.t. the fast weights only, which never reach a
parameter's gradient accumulator, so nothing of it is synchronised: every rank adapts its own memory
on its own micro-batch, with the inner loss normalised over that micro-batch.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .backbone import Backbone
from .config import MemDLMConfig
from .data import KEY_FIELDS, EpochOrder, IndexedExamples, PreparedBatch, pad_collate
from .peft_utils import base_model_of, with_requested_outer_lora
from .run_definition import run_definition
from .history import History
from .training import SKIPS_WITHOUT_AN_EPOCH, check_resume, check_weight_norm, skip_nonfinite
from .trajectory import TrajectorySimulator
from .eval_loss import EVAL_SEED, loss_from_terms
from .wrapper import MemoryWrapper

__all__ = ["MemDLMTrainingArguments", "MemDLMTrainer", "NonFiniteGuard", "ddp_forward", "eval_shard"]

# OuterConfig.lr_schedule -> the Trainer's lr_scheduler_type with the same warmup + decay.
_LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def _as_memdlm_config(value: Any) -> MemDLMConfig:
    if value is None:
        return MemDLMConfig()
    if isinstance(value, MemDLMConfig):
        return value
    if isinstance(value, Mapping):
        return MemDLMConfig.model_validate(dict(value))
    if isinstance(value, (str, Path)):
        return MemDLMConfig.from_yaml(value)
    raise TypeError(f"memdlm must be a MemDLMConfig, a dict or a YAML/JSON file path, got {type(value).__name__}")


@dataclass
class MemDLMTrainingArguments(TrainingArguments):
    """TrainingArguments plus the bilevel recipe ``memdlm`` (a MemDLMConfig, a dict or a YAML path).

    The Trainer's own arguments govern theta's optimizer, learning-rate schedule and clipping;
    ``memdlm.outer`` supplies the loss (noise schedule, weighting, normalisation).
    :meth:`from_memdlm` copies ``memdlm.outer``'s optimizer settings over, as ``MemoryWrapper.fit`` uses them.
    """

    # A MemDLMConfig after __post_init__. The str member lets HfArgumentParser read ``--memdlm recipe.yaml``.
    memdlm: MemDLMConfig | str | None = field(
        default_factory=MemDLMConfig,
        metadata={"help": "The bilevel recipe: a MemDLMConfig, a dict, or a path to its YAML/JSON file."},
    )
    eval_prompt_memory: bool = field(
        default=True,
        metadata={"help": "Also report the eval loss with memory adapted on each sample's prompt."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "MemDLM reads input_ids, labels and attention_mask itself; keep every column by default."},
    )
    allow_changes: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint whose run had another recipe, data, batch size, world size, "
                          "accumulation or max_steps (refused otherwise; the differences are logged)."},
    )

    def __post_init__(self) -> None:
        self.memdlm = _as_memdlm_config(self.memdlm)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """The Trainer's serialisation (JSON, loggers) with the recipe as a plain dict."""
        values = super().to_dict()
        values["memdlm"] = self.memdlm.model_dump(mode="json")
        return values

    @classmethod
    def from_memdlm(cls, memdlm: MemDLMConfig | Mapping | str | Path, *, max_steps: int, **kwargs: Any
                    ) -> "MemDLMTrainingArguments":
        """Arguments that train theta as ``MemoryWrapper.fit`` does: AdamW with ``memdlm.outer``'s learning
        rate, betas, weight decay, schedule, ``int(warmup_ratio * max_steps)`` warmup steps and gradient
        clipping (the Trainer exempts biases and norm weights from weight decay). ``kwargs`` add to or
        override these."""
        memdlm = _as_memdlm_config(memdlm)
        outer = memdlm.outer
        values: dict[str, Any] = dict(
            memdlm=memdlm,
            max_steps=max_steps,
            optim="adamw_torch",
            learning_rate=outer.lr,
            adam_beta1=outer.betas[0],
            adam_beta2=outer.betas[1],
            weight_decay=outer.weight_decay,
            lr_scheduler_type=_LR_SCHEDULES[outer.lr_schedule],
            warmup_steps=int(outer.warmup_ratio * max_steps),
            max_grad_norm=outer.max_grad_norm or 0.0,
        )
        return cls(**{**values, **kwargs})


@contextmanager
def ddp_forward(module: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run the enclosed computation as ``module``'s forward when ``module`` is a DistributedDataParallel.

    Yields ``finish``: pass the loss through it and backpropagate what it returns. DDP's reducer ignores
    the parameters' gradient hooks unless a forward through the DDP module prepared it, so a loss
    computed on the unwrapped module (as the bilevel step must be: fast-weight hooks, a forward stopped
    at the LM head's input, prefix replay) would silently not be all-reduced. DDP's own pre- and
    post-forward therefore run around the block, exactly as inside ``ddp(...)`` (unused-parameter
    search on the loss, static graph, ``no_sync``). For any other module ``finish`` is the identity.
    """
    if not isinstance(module, DistributedDataParallel):
        yield lambda loss: loss
        return
    module._pre_forward()
    yield module._post_forward


def _supported_wrapper(model: nn.Module, unwrapped: nn.Module) -> bool:
    """The unwrapped module itself (one device, or FSDP2), DDP, or a DeepSpeed engine below ZeRO-3.

    The bilevel step runs on the unwrapped module; DDP's reducer is prepared by :func:`ddp_forward`, and
    ZeRO-1/2 partition gradients in backward hooks on the parameters, which the outer backward fires as
    usual (the inner loop asks autograd for the fast weights' gradients only)."""
    if model is unwrapped or isinstance(model, DistributedDataParallel):
        return True
    if type(model).__name__ == "DeepSpeedEngine":
        return getattr(model, "module", None) is unwrapped and model.zero_optimization_stage() < 3
    return False


class _EveryNth(IterableDataset):
    """The items ``start``, ``start + step``, ... of an iterable, read in its own order."""

    def __init__(self, data: Iterable[Any], start: int, step: int) -> None:
        self.data, self.start, self.step = data, start, step

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.start, None, self.step)


def eval_shard(dataset: Any, rank: int, world_size: int) -> Dataset:
    """Rank ``rank``'s examples of ``dataset``: indices ``rank, rank + world_size, ...``, each example on
    exactly one rank and none repeated (the Trainer's eval loader repeats the first examples to give
    every rank equally many batches, which would count them twice in a summed loss).

    A dataset with ``__len__`` (a map-style Dataset, a list) is indexed; any other iterable is read
    whole on every rank, each keeping its every ``world_size``-th item, so it must yield the same
    examples in the same order on every rank (as accelerate's own sharding of iterables assumes)."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return _EveryNth(dataset, rank, world_size)
    return Subset(dataset, range(rank, len(dataset), world_size))


class StreamIndexed(IterableDataset):
    """An iterable dataset's examples with their position in the epoch's stream as ``example_index`` (and the
    ``epoch`` the Trainer sets), so their draws are keyed as a map-style dataset's are."""

    def __init__(self, data: Iterable[Mapping[str, Any]]) -> None:
        self.data, self.epoch = data, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, example in enumerate(self.data):
            yield {**example, "example_index": index, "epoch": self.epoch}


class NonFiniteGuard(TrainerCallback):
    """Skips an optimizer step whose (all-reduced) gradient is not finite, as ``MemoryWrapper.step`` does:
    every gradient is dropped, so AdamW leaves the weights as they are; ``memdlm.max_nonfinite_steps`` such
    steps in a row raise :class:`~bilevel_dlm.training.TrainingDiverged`, and so does an update that changed
    the norm of the trained weights by more than ``memdlm.max_weight_norm_change``. Every rank sees the
    same reduced gradient and the same weights, so all ranks decide alike."""

    def __init__(self, wrapper: MemoryWrapper) -> None:
        self.wrapper = wrapper
        self.skipped_steps: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.wrapper.config.max_weight_norm_change is not None:  # the previous update's size
            self.wrapper.updates = state.global_step
            weights = [p.detach() for p in model.parameters() if p.requires_grad]
            check_weight_norm(self.wrapper, float(torch.nn.utils.get_total_norm(weights)))
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        values = {"grad_norm": float(norm)}
        if math.isfinite(values["grad_norm"]):
            self.wrapper.nonfinite_run, self.wrapper.last_finite = 0, (state.global_step, values)
            return control
        for p in model.parameters():
            p.grad = None
        self.skipped_steps.append(state.global_step + 1)
        skip_nonfinite(self.wrapper, values)
        return control


RUN_FILE = "bilevel_dlm_run.json"


class RunDefinitionRecorder(TrainerCallback):
    """Writes the run's definition into every checkpoint the Trainer saves, for :meth:`MemDLMTrainer.train`'s
    resume check."""

    def __init__(self, trainer: "MemDLMTrainer") -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            (folder / RUN_FILE).write_text(json.dumps(self.trainer.run_definition(), indent=1))
        return control


class MemDLMTrainer(Trainer):
    """The transformers Trainer with MemDLM's bilevel objective as its loss.

    Args:
        model: the backbone, or a PEFT model whose LoRA weights are theta (``args.memdlm.outer.lora.apply``
            wraps a plain model in one).
        args: :class:`MemDLMTrainingArguments`.
        backbone: adapter name or instance, as for :class:`MemoryWrapper` (default: detected).
        mask_token_id: explicit mask token id, as for :class:`MemoryWrapper`.
        simulator: a custom trajectory simulator, as for :class:`MemoryWrapper`.
        inner_optimizer: a custom inner optimizer, as for :class:`MemoryWrapper`.
        data_collator: default right-pads examples (``bilevel_dlm.data.pad_collate``).
        **kwargs: the Trainer's (train_dataset, eval_dataset, processing_class, callbacks, ...).

    Normalisation is global over an optimizer step: a micro-batch's outer loss is weighted by
    ``n_mb * world_size / N``, N the normaliser (``OuterLoop.denominator``: maskable tokens, sequences or
    samples) summed over the step's micro-batches and ranks, so accumulating 2 micro-batches of 4 gives
    the gradient of one batch of 8 with the same anchors and memories, and DDP's average of the ranks'
    gradients is that of the global batch. ``average_tokens_across_devices=False`` normalises per rank
    (over its micro-batches) and lets DDP average the ranks. A micro-batch without maskable tokens
    contributes a zero gradient and is counted in the logged ``skipped_batches``.
    """

    loss_is_scaled_for_ga = True  # compute_loss already divides by the step's normaliser

    def __init__(
        self,
        model: nn.Module,
        args: MemDLMTrainingArguments,
        *,
        backbone: str | Backbone | None = None,
        mask_token_id: int | None = None,
        simulator: TrajectorySimulator | None = None,
        inner_optimizer: Any = None,
        data_collator: Callable | None = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MemDLMTrainingArguments):
            raise TypeError("MemDLMTrainer needs args=MemDLMTrainingArguments(...) (TrainingArguments plus memdlm=)")
        if model is None:
            raise ValueError("MemDLMTrainer needs a model (model_init is not supported)")
        model = with_requested_outer_lora(model, args.memdlm.outer.lora)
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # the outer loss normalises itself: no label counting per step
        self.memdlm = MemoryWrapper(base_model_of(self.model), args.memdlm, backbone=backbone,
                                    tokenizer=processing_class, mask_token_id=mask_token_id, simulator=simulator,
                                    inner_optimizer=inner_optimizer)
        if self.memdlm.inner.meta_parameters():
            raise NotImplementedError(
                "the inner method has meta-parameters (MetaSGD rates, a meta-learned initialisation) outside the model, which the Trainer's "
                "optimizer and DDP would not see; train them with MemoryWrapper.fit, or use optimizer 'sgd'/'adam' and meta_init 'none'"
            )
        # Training batches carry their examples' keys, so every draw is keyed by example; this per-rank stream
        # only serves batches that lost them (a collator of your own that drops example_index).
        self.memdlm.generator.manual_seed(args.memdlm.seed + args.process_index)
        if data_collator is None:
            self.data_collator = partial(pad_collate, pad_token_id=self.memdlm.pad_token_id())
        k = args.memdlm.inner.steps
        self._metric_names = ["outer_loss", *(f"inner_loss_{i}" for i in range(k)),
                              *(f"inner_grad_norm_{i}" for i in range(k))]
        # Sums since the last log: the metrics above, then the micro-batch count and the skipped count.
        self._metric_sums = torch.zeros(len(self._metric_names) + 2, device=args.device)
        self._skipped_run = 0
        self._warned_unkeyed = False
        self.add_callback(NonFiniteGuard(self.memdlm))
        self.add_callback(RunDefinitionRecorder(self))

    def run_definition(self) -> dict[str, Any]:
        """What defines this run (:mod:`bilevel_dlm.run_definition`): saved with every checkpoint."""
        return run_definition(self.args.memdlm, self.train_dataset if self.train_dataset is not None else [],
                              batch_size=self.args.per_device_train_batch_size, max_steps=self.args.max_steps,
                              world_size=self.args.world_size, accumulation=self.args.gradient_accumulation_steps)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """The Trainer's ``train``; a resume is first compared with the checkpoint's recorded run and refused
        when it differs, unless ``args.allow_changes`` (then the differences are logged)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint:
            recorded = Path(checkpoint) / RUN_FILE
            saved = json.loads(recorded.read_text()) if recorded.exists() else None
            step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
            record: History = History()
            check_resume(checkpoint, step, saved, self.run_definition(), record, self.args.allow_changes)
            if record.changes:
                self.log({"resumed_with_changes": len(record.changes[0]["changes"])})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ----- training ------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's loader over one global order (:class:`~bilevel_dlm.data.EpochOrder`, seeded by
        ``args.data_seed`` or ``args.seed``), each example with its ``example_index`` and ``epoch``: accelerate
        deals its batches to the ranks in turn and the Trainer groups them into accumulation steps, so the
        same global batch, keyed draws included, is trained on any number of processes."""
        if self.train_dataset is None:
            raise ValueError("MemDLMTrainer: training needs a train_dataset")
        if isinstance(self.train_dataset, IterableDataset) or not hasattr(self.train_dataset, "__len__"):
            if self.args.dataloader_num_workers:
                raise NotImplementedError(
                    f"dataloader_num_workers={self.args.dataloader_num_workers} with an iterable train dataset: its "
                    "examples are numbered (example_index, which keys their random draws) as they are read, which "
                    "several worker processes would each do on their own; use dataloader_num_workers=0, or a "
                    "map-style dataset")
            return self._get_dataloader(dataset=StreamIndexed(self.train_dataset), description="Training",
                                        batch_size=self._train_batch_size, is_training=True)
        strategy = self.args.train_sampling_strategy
        if strategy not in ("random", "sequential"):
            raise NotImplementedError(f"train_sampling_strategy={strategy!r}: MemDLMTrainer trains in one global "
                                      "order keyed by (seed, epoch); use 'random' or 'sequential'")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        order = EpochOrder(len(self.train_dataset), seed, shuffle=strategy == "random")
        return self._get_dataloader(dataset=IndexedExamples(self.train_dataset, order), description="Training",
                                    batch_size=self._train_batch_size, sampler_fn=lambda _: order, is_training=True)

    def _set_signature_columns_if_needed(self) -> None:
        """``remove_unused_columns`` keeps the fields that key an example's draws."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [name for name in KEY_FIELDS if name not in self._signature_columns]

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step with the fast weights bound until its backward has run: gradient
        checkpointing recomputes forwards during the backward, and they must see the same memory."""
        with self.memdlm.bilevel_context():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.memdlm.memory.clear()
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MemDLM's loss on a micro-batch: anchor, inner adaptation of this rank's memory, outer MDLM loss
        with the adapted memory bound; run as the DDP forward under DDP and weighted by this rank's share."""
        if not _supported_wrapper(model, self.model):
            raise NotImplementedError(
                f"MemDLMTrainer runs on one device, under DistributedDataParallel, FSDP2 (fully_shard, which "
                f"shards in place) or DeepSpeed ZeRO-1/2; the model is wrapped in {type(model).__name__}, which it "
                "does not support (FSDP1 and ZeRO-3 gather parameters in forward hooks that the bilevel step, run "
                "on the unwrapped module, would bypass)"
            )
        batch = self.memdlm.prepare(inputs)
        if batch.random_keys is None and not self._warned_unkeyed:
            self._warned_unkeyed = True
            warnings.warn("a training batch came without 'example_index' (a collator that drops it?): its draws come "
                          "from this rank's own stream, so the run depends on the number of processes and restarts "
                          "its draws on resume; keep example_index and epoch in the batches", stacklevel=2)
        share = self._share_of_step(batch)
        with ddp_forward(model) as finish:
            if not batch.has_maskable:
                self._count_skipped_batch()
                self._metric_sums[-1] += 1
                zero = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
                loss = finish(zero)
                return (loss, {}) if return_outputs else loss
            self._skipped_run = 0
            outer, inner, _ = self.memdlm.compute_loss(batch)
            loss = finish(outer * share.to(outer.dtype))
        self._metric_sums[:-1] += torch.cat([outer.detach()[None], inner.losses, inner.grad_norms,
                                             torch.ones(1, device=outer.device)])
        outputs = {"inner_losses": inner.losses, "inner_grad_norms": inner.grad_norms}
        return (loss, outputs) if return_outputs else loss

    def _count_skipped_batch(self) -> None:
        """A whole epoch of micro-batches without a maskable token raises instead of training nothing."""
        self._skipped_run += 1
        try:
            per_epoch = math.ceil(len(self.train_dataset) / (self._train_batch_size * self.args.world_size))
        except TypeError:  # an iterable dataset without a length
            per_epoch = SKIPS_WITHOUT_AN_EPOCH
        if self._skipped_run >= per_epoch:
            raise ValueError(
                f"{self._skipped_run} micro-batches in a row (a full pass over the training data) had no maskable "
                "token: every label is -100 or every position is padding. Labels mark the response; -100 only the prompt."
            )

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """The Trainer's micro-batches of one optimizer step, plus their normaliser summed over the step's
        micro-batches (and, with ``average_tokens_across_devices``, over the ranks: one all-reduce)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        outer = self.memdlm.outer
        local = sum((outer.denominator(self.memdlm.prepare(b).maskable).double() for b in batch_samples),
                    torch.zeros((), device=device, dtype=torch.float64))
        global_ = self.accelerator.num_processes > 1 and self.args.average_tokens_across_devices
        self._step_normaliser = self.accelerator.reduce(local, reduction="sum") if global_ else local
        return batch_samples, num_items_in_batch

    def _share_of_step(self, batch: PreparedBatch) -> torch.Tensor:
        """This micro-batch's share ``n_mb * world / N_step`` (world = 1 without token averaging), so that
        the summed micro-batch gradients, averaged by DDP over the ranks, are the gradient of the loss
        normalised over every micro-batch of the step on every rank."""
        world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        local = self.memdlm.outer.denominator(batch.maskable).double()
        return local * world / self._step_normaliser.clamp_min(1.0)

    # ----- logging and evaluation ----------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also get the outer loss and each inner stage's loss and fast-weight gradient
        norm, averaged over the micro-batches since the last log and over the ranks."""
        if "loss" in logs:
            logs = {**logs, **self._pop_bilevel_metrics()}
        super().log(logs, start_time)

    def _pop_bilevel_metrics(self) -> dict[str, float]:
        *sums, count, skipped = self.accelerator.reduce(self._metric_sums, reduction="sum").tolist()
        self._metric_sums.zero_()
        metrics = {name: value / count for name, value in zip(self._metric_names, sums)} if count else {}
        if skipped:
            metrics["skipped_batches"] = skipped
        return metrics

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """MDLM loss on the eval data with memory off (``<prefix>_loss``) and, with
        ``args.eval_prompt_memory``, adapted on each prompt (``<prefix>_loss_prompt_memory``), as
        ``MemoryWrapper.eval_loss`` measures them: each rank sums the loss terms of its own examples
        (:func:`eval_shard`), the sums are all-reduced, so the value is the loss of the whole eval set
        whatever the number of ranks, the data size and the eval batch size."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(eval_dataset, str):  # the name of one of the eval sets, as the Trainer takes it
            dataset = self.eval_dataset[eval_dataset]
        if dataset is None:
            raise ValueError("evaluate needs eval data: pass eval_dataset= to MemDLMTrainer or to evaluate()")
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        modes = {"loss": "off", "loss_prompt_memory": "prompt"} if self.args.eval_prompt_memory else {"loss": "off"}
        terms = torch.zeros(len(modes), 3, device=self.memdlm.device, dtype=torch.float64)
        for batch in self._eval_shard_loader(dataset):
            terms += torch.stack([self.memdlm.eval_loss_terms([batch], memory=mode, seed=EVAL_SEED)
                                  for mode in modes.values()])
        totals = self.accelerator.reduce(terms, reduction="sum")
        metrics = {f"{metric_key_prefix}_{name}": loss_from_terms(row, EVAL_SEED) for name, row in zip(modes, totals)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_shard_loader(self, dataset: Any) -> DataLoader:
        """This rank's examples (:func:`eval_shard`) in batches of ``args.eval_batch_size``, collated as
        the Trainer collates them; not passed through accelerate, which would shard and pad them again."""
        shard = eval_shard(dataset, self.args.process_index, self.args.world_size)
        workers = 0 if isinstance(shard, IterableDataset) else self.args.dataloader_num_workers  # no worker copies
        collate = self._get_collator_with_removed_columns(self.data_collator, "evaluation")
        return DataLoader(shard, batch_size=self.args.eval_batch_size, num_workers=workers,
                          pin_memory=self.args.dataloader_pin_memory, collate_fn=collate)
