"""The training loop of :class:`~bilevel_dlm.wrapper.MemoryWrapper`: one outer step, and ``fit``.

A step is the bilevel forward, the outer backward, clipping of theta's gradient and the optimizer
update, with a single host sync for its metrics. A step whose loss or gradients are not finite never
reaches the weights: it is skipped, counted and warned about, and ``max_nonfinite_steps`` of them in a
row stop training with an error that names the step and the last finite metrics (the weights are then
those of the last finite step). ``fit`` cycles the data and stops with an error, instead of looping
forever, when a whole pass over the data brings no batch with a maskable token. Ctrl-C lands between steps
(``deferred_interrupt``); with an ``output_dir`` the state after the last complete step is then saved as a
checkpoint before ``TrainingInterrupted`` is raised.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointSaveError
from .contracts import InnerMethod, InnerResult
from .data import PreparedBatch, iterate_batches
from .engine import Engine
from .history import History
from .run_definition import run_changes, run_definition


__all__ = ["History", "TrainingDiverged", "TrainingInterrupted", "ForcedInterrupt", "train_step",
           "fit", "skip_nonfinite", "check_weight_norm", "check_resume", "deferred_interrupt"]

# Without epochs (an endless iterable) a run of skipped batches this long counts as "no usable data".
SKIPS_WITHOUT_AN_EPOCH = 10_000


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the model keeps the weights of the last finite step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: the state after the last complete step was saved to ``checkpoint`` (None: it
    could not be, and ``reason`` says why)."""

    def __init__(self, step: int, checkpoint: Path | None, reason: str = "") -> None:
        super().__init__(f"interrupted after step {step}; " + (f"saved {checkpoint}" if checkpoint else reason))
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


class ForcedInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while one was held: raised at once, wherever the code was (nothing is saved)."""


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, so that it lands between steps, never halfway through an
    update and its bookkeeping; a second Ctrl-C raises :class:`ForcedInterrupt` at once (a hung step stays
    interruptible). A no-op outside the main thread (where signals are not delivered)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(number: int, _frame: Any) -> None:
        received.append(number)
        if len(received) > 1:  # a second Ctrl-C: the user wants out now, whatever the state
            raise ForcedInterrupt("interrupted twice: the step in progress was abandoned")

    previous = signal.signal(signal.SIGINT, hold)
    restore = previous if previous is not None else signal.default_int_handler
    try:
        yield
    except BaseException:  # the block's own error goes on (a held Ctrl-C does not replace it)
        signal.signal(signal.SIGINT, restore)
        raise
    signal.signal(signal.SIGINT, restore)
    if len(received) == 1:
        raise KeyboardInterrupt


def variant_name(wrapper: Engine) -> str:
    return wrapper.inner.name if wrapper.inner.adapts else "MDLM"


def train_step(wrapper: Engine, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One outer step on a batch, or on a list of micro-batches whose gradients accumulate (each adapts its own
    memory; the loss is normalised over all of them, as one batch would be); returns its metrics (one host
    sync). See the module docstring."""
    if wrapper.optimizer is None:
        wrapper.configure_optimizers(max_steps=None)
    micro_batches = [batch] if isinstance(batch, Mapping) else list(batch)
    if not micro_batches:
        raise ValueError("train_step needs a batch, or a non-empty list of micro-batches")
    where = "batch" if len(micro_batches) == 1 else "micro-batch {}"
    prepared = [wrapper.prepare(b, where.format(i)) for i, b in enumerate(micro_batches)]
    usable = [p for p in prepared if p.has_maskable]
    wrapper.skipped_batches += len(prepared) - len(usable)
    if not usable:
        return {"skipped": 1.0, "skipped_batches": float(wrapper.skipped_batches)}
    wrapper.model.train()
    outer, inner_losses, inner_norms = [], [], []
    for micro_batch, part in zip(usable, _shares(wrapper, usable)):
        with wrapper.bilevel_context():
            loss, inner, _ = wrapper.compute_loss(micro_batch)
            share = loss if part is None else loss * part.to(loss.dtype)  # its part of the step's loss
            share.backward()
        wrapper.inner.after_backward()
        wrapper.memory.clear()
        outer.append(share.detach())
        inner_losses.append(inner.losses)
        inner_norms.append(inner.grad_norms)
    loss = torch.stack(outer).sum()
    inner = InnerResult(torch.stack(inner_losses).mean(0), torch.stack(inner_norms).mean(0))
    theta = [p for p in wrapper.trainable_parameters() if p.grad is not None]
    max_norm = wrapper.config.outer.max_grad_norm
    grad_norm = (torch.nn.utils.clip_grad_norm_(theta, max_norm) if max_norm is not None
                 else torch.nn.utils.get_total_norm([p.grad for p in theta]))
    norms = [grad_norm.detach()[None].float()]
    checks_weights = wrapper.config.max_weight_norm_change is not None
    if checks_weights:  # the norm of theta, read in the same sync (check_weight_norm)
        norms.append(torch.nn.utils.get_total_norm([p.detach() for p in wrapper.trainable_parameters()])[None].float())
    values = torch.cat([loss.detach()[None].float(), inner.losses.float(), inner.grad_norms.float(), *norms]).tolist()
    k = inner.losses.shape[0]
    metrics = {"outer_loss": values[0], "grad_norm": values[1 + 2 * k]}
    metrics.update({f"inner_loss_{i}": values[1 + i] for i in range(k)})
    metrics.update({f"inner_grad_norm_{i}": values[1 + k + i] for i in range(k)})
    finite = all(math.isfinite(v) for v in values)
    stepped = False
    try:
        if finite:
            if checks_weights:
                check_weight_norm(wrapper, values[-1])
            wrapper.optimizer.step()
            wrapper.scheduler.step()
            wrapper.nonfinite_run, wrapper.last_finite = 0, (wrapper.updates + 1, metrics)
            wrapper.updates += 1
            stepped = True
        else:
            skip_nonfinite(wrapper, metrics)
            metrics["nonfinite"] = 1.0
    finally:  # also when a guard raises: no non-finite gradient or Reptile target outlives the step
        wrapper.inner.after_step(stepped=stepped)
        wrapper.optimizer.zero_grad(set_to_none=True)
    return metrics


def _shares(wrapper: Engine, batches: list[PreparedBatch]) -> list[torch.Tensor | None]:
    """Each micro-batch's share of the step's normaliser, in float64 (None for a lone batch: its loss is the
    step's, and nothing is counted)."""
    if len(batches) == 1:
        return [None]
    denominators = [wrapper.outer.denominator(b.maskable).double() for b in batches]
    total = torch.stack(denominators).sum()
    return [denominator / total for denominator in denominators]


def check_weight_norm(wrapper: Engine, norm: float) -> None:
    """Stop (:class:`TrainingDiverged`) when the last update changed the norm of theta by more than
    ``config.max_weight_norm_change`` (not None) times the larger of its previous norm and 1: the update is
    measured by the norm before this step against the norm before the previous one, so checking costs no
    copy of the weights."""
    previous, wrapper.weight_norm = wrapper.weight_norm, norm
    limit = wrapper.config.max_weight_norm_change
    # Relative to at least 1: weights that start at zero (zero-initialised adapters) grow by large fractions
    # of a tiny norm while training normally. Non-finite weights are the non-finite guard's.
    if previous is None or not math.isfinite(norm * previous) \
            or abs(norm - previous) <= limit * max(previous, 1.0):
        return
    raise TrainingDiverged(
        f"training diverged: update {wrapper.updates} changed the norm of the trained weights from {previous:.4g} to "
        f"{norm:.4g} ({abs(norm - previous) / previous:.3g} of it, more than max_weight_norm_change={limit}); the "
        "weights are those after that update. Lower outer.lr (or raise max_weight_norm_change, or set it to None)")


def skip_nonfinite(wrapper: Engine, metrics: dict[str, float]) -> None:
    """Count a skipped non-finite step: warn, or raise once ``max_nonfinite_steps`` came in a row."""
    wrapper.nonfinite_run += 1
    shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
    limit = wrapper.config.max_nonfinite_steps
    if wrapper.nonfinite_run >= limit:
        update, last = wrapper.last_finite if wrapper.last_finite else (0, None)
        before = (f"the weights are those after update {update} (metrics: "
                  + ", ".join(f"{n} {v:.4g}" for n, v in last.items()) + ")") if last else "no step was finite"
        raise TrainingDiverged(
            f"training diverged: {wrapper.nonfinite_run} steps in a row had non-finite values (the last: {shown}); "
            f"{before}. Lower outer.lr or inner.lr, check the data and the model's weights for NaN, or raise "
            "max_nonfinite_steps."
        )
    warnings.warn(f"skipped a step with non-finite values ({shown}); {wrapper.nonfinite_run} of {limit} in a row "
                  "stop training", RuntimeWarning, stacklevel=3)


def fit(
    wrapper: Engine,
    train_data: Iterable[Mapping[str, Any]],
    *,
    eval_data: Iterable[Mapping[str, Any]] | None = None,
    max_steps: int,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    collate_fn: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]] | None = None,
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
    MemDLMTrainer draws on 2 processes with 4 each. ``collate_fn`` batches the examples (default:
    ``bilevel_dlm.data.pad_collate``; ``bilevel_dlm.finetune_data.eos_pad_collate`` pads with supervised EOS,
    as LLaDA's SFT does). With ``eval_data``, the eval loss (memory off, and
    adapted on the prompt when ``eval_prompt_memory``) is measured every ``eval_every`` steps and at the
    end. With ``save_every``, a checkpoint is written to ``output_dir/checkpoint-<step>``;
    ``resume_from`` such a checkpoint continues with exactly the draws and weights of an uninterrupted
    run (``allow_pickle``: a checkpoint of an earlier release, see ``MemoryWrapper.from_pretrained``); a resume
    with other settings (config, data, batch size, accumulation, max_steps) is refused unless
    ``allow_changes`` (then recorded in ``History.changes``). Batches without a maskable token are
    skipped, and a whole pass of them raises; non-finite steps are skipped (``History.nonfinite_steps``).
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if eval_data is not None and eval_prompt_memory and type(wrapper.inner).for_prompts is InnerMethod.for_prompts:
        raise NotImplementedError(
            f"{type(wrapper.inner).__name__} does not define for_prompts, which prompt-memory evaluation needs: "
            "implement it, or call fit(..., eval_prompt_memory=False)")
    if save_every and output_dir is None:
        raise ValueError("save_every needs output_dir=<folder for the checkpoints>")
    if save_every:
        wrapper.check_savable()
    wrapper.configure_optimizers(max_steps)
    wrapper.weight_norm = None  # the divergence check compares updates of this run only
    accumulation = gradient_accumulation_steps
    definition = run_definition(wrapper.config, train_data, batch_size=batch_size, max_steps=max_steps,
                                accumulation=accumulation)
    history, step, consumed = History(variant=variant_name(wrapper)), 0, 0
    if resume_from is not None:
        history, step, consumed, saved_run = wrapper.restore_training(resume_from, allow_pickle=allow_pickle)
        check_resume(resume_from, step, saved_run, definition, history, allow_changes)
    batches = iterate_batches(train_data, batch_size, pad_token_id=wrapper.pad_token_id(), seed=wrapper.config.seed,
                              collate_fn=collate_fn)
    for _ in range(consumed):
        next(batches)
    if save_every and max_steps // save_every * save_every <= step:
        warnings.warn(f"save_every={save_every} but the run trains steps {step + 1}..{max_steps}: no periodic "
                      "checkpoint will be written", stacklevel=3)
    bar = tqdm(total=max_steps, initial=step, disable=not progress, desc=history.variant, dynamic_ncols=True)
    skipped_run = 0

    def save(directory: Path) -> Path:
        state = {"step": step, "consumed_batches": consumed, "history": asdict(history), "run": definition}
        return wrapper.save_pretrained(directory, training_state=state)

    try:
        while step < max_steps:
            micro_batches = [next(batches) for _ in range(accumulation)]
            with deferred_interrupt():  # a step and its bookkeeping happen whole, or not at all
                started = time.perf_counter()
                metrics = wrapper.step(micro_batches)  # ends with a host sync, so the time is the device's too
                seconds = time.perf_counter() - started
                consumed += accumulation
                if "skipped" in metrics:
                    history.skipped_batches += 1
                    skipped_run += 1
                elif "nonfinite" in metrics:
                    skipped_run = 0
                    history.nonfinite_steps.append(step + 1)
                else:
                    skipped_run = 0
                    step += 1
                    record(history, step, metrics, seconds)
            if skipped_run * accumulation >= (batches.epoch_batches or SKIPS_WITHOUT_AN_EPOCH):
                raise ValueError(
                    f"{skipped_run} batches in a row (a full pass over the training data) had no maskable token: "
                    "every label is -100 or every position is padding. Labels mark the response; -100 only the "
                    "prompt."
                )
            if skipped_run or "nonfinite" in metrics:
                continue
            bar.update(1)
            bar.set_postfix(outer=f"{metrics['outer_loss']:.3f}")
            if eval_data is not None and (step == max_steps or (eval_every and step % eval_every == 0)):
                losses = [wrapper.eval_loss(eval_data, memory=mode, batch_size=batch_size)
                          for mode in (("off", "prompt") if eval_prompt_memory else ("off",))]
                with deferred_interrupt():  # the three lists stay aligned (an interrupted eval adds nothing)
                    history.eval_steps.append(step)
                    history.eval_loss.append(losses[0])
                    history.eval_loss_prompt_memory.extend(losses[1:])
            if save_every and step % save_every == 0:
                save(Path(output_dir) / f"checkpoint-{step}")
    except ForcedInterrupt as forced:
        bar.close()
        raise TrainingInterrupted(step, None, f"{forced}, nothing saved") from None
    except KeyboardInterrupt:
        bar.close()
        if output_dir is None:
            raise TrainingInterrupted(step, None, "no output_dir to save a checkpoint to") from None
        try:
            with deferred_interrupt():
                checkpoint = save(Path(output_dir) / f"checkpoint-{step}")
        except (CheckpointSaveError, NotImplementedError) as error:
            raise TrainingInterrupted(step, None, f"saving the state failed: {error}") from None
        except KeyboardInterrupt:  # a Ctrl-C held during the save: the checkpoint is complete all the same
            checkpoint = Path(output_dir) / f"checkpoint-{step}"
        raise TrainingInterrupted(step, checkpoint) from None
    bar.close()
    return history


def record(history: History, step: int, metrics: dict[str, float], seconds: float) -> None:
    """Append a finished optimizer step's metrics to ``history``."""
    k = sum(name.startswith("inner_loss_") for name in metrics)
    history.steps.append(step)
    history.step_seconds.append(seconds)
    history.outer_loss.append(metrics["outer_loss"])
    history.inner_losses.append([metrics[f"inner_loss_{i}"] for i in range(k)])
    history.inner_grad_norms.append([metrics[f"inner_grad_norm_{i}"] for i in range(k)])


def check_resume(checkpoint: str | Path, step: int, saved: dict[str, Any] | None, current: dict[str, Any],
                 history: History, allow_changes: bool) -> None:
    """Refuse a resume that would not continue the checkpoint's run (past its steps, or other settings);
    with ``allow_changes`` the differences are warned about and recorded in ``history.changes``."""
    if step > current["max_steps"]:
        raise ValueError(f"{checkpoint} is at step {step}, past max_steps={current['max_steps']}: there is nothing "
                         f"to train; resume with max_steps >= {step}")
    if saved is None:
        warnings.warn(f"{checkpoint} records no run definition (written by an earlier bilevel_dlm), so this resume "
                      "cannot be checked against it", stacklevel=3)
        return
    changes = run_changes(saved, current)
    if not changes:
        return
    if not allow_changes:
        raise ValueError(f"resuming {checkpoint} would change the run: {'; '.join(changes)}. Resume with the same "
                         "settings, or allow_changes=True (--allow-changes) to continue with these (recorded in the "
                         "history)")
    warnings.warn(f"resuming {checkpoint} with changes: {'; '.join(changes)}", stacklevel=3)
    history.changes.append({"step": step, "changes": changes})
