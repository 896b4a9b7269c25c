"""bilevel-dlm train: bilevel training from a shell, with checks that keep a trained model from being lost.

Before any training step the output folders are created and written to, so a bad --output fails at
once. A failed save, a diverged run or Ctrl-C end with one line that says where the last complete
checkpoint is and, for Ctrl-C, the exact command that resumes from it (exit 2, 2 and 130).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import META, CheckpointError, newest_valid_checkpoint, resolve_checkpoint
from ..integrations import tiny_model
from ..tasks import build_tokenizer
from ..training import History, TrainingDiverged, TrainingInterrupted, deferred_interrupt
from ..wrapper import MemoryWrapper
from . import CLIError
from .lock import output_lock
from .common import (Data, Rows, Source, check_vocabulary, data_record, effective_config, existing, load_data,
                     load_model_folder, loading_options, progress_bars, reported, resolve_device, wrap)

__all__ = ["run"]


def _check_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` and write a probe file into it, so an unusable destination fails before training."""
    probe = folder / f".bilevel_dlm-write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise CLIError(f"{flag} {folder}: cannot write there ({error.strerror or error}); choose a writable folder") from error


def _check_output(output: Path) -> None:
    if output.exists() and not (output / META).exists() and (not output.is_dir() or any(output.iterdir())):
        raise CLIError(f"--output {output} exists and is not a bilevel_dlm checkpoint; saving replaces the whole "
                       "folder, so give a new or empty one")
    _check_writable(output, "--output")


def _resume_point(resume: str | None) -> Path | None:
    """The verified checkpoint to resume from: the one given, or the newest valid one in a folder of them."""
    if resume is None:
        return None
    with reported(f"--resume {resume}"):
        try:
            return resolve_checkpoint(existing(resume, "--resume"))
        except FileNotFoundError as error:
            raise ValueError(str(error)) from error


def _training_source(args: argparse.Namespace, resume: Path | None) -> tuple[Source | None, Any, str]:
    """(the loaded model or None for a tiny one, the tokenizer, where the tokenizer comes from)."""
    if args.model is not None:
        source = load_model_folder(existing(args.model, "--model"), loading_options(args))
        return source, source.tokenizer, f"--model {args.model}"
    if resume is not None and args.tiny is None:
        source = load_model_folder(resume, loading_options(args))
        return source, source.tokenizer, f"--resume {args.resume}"
    return None, build_tokenizer(), "the built-in tokenizer"


def _evaluation_data(args: argparse.Namespace, tokenizer: Any, source: str) -> Data | None:
    """--eval-data records, --eval-split / --eval-fraction of --data, or held-out synthetic examples (another
    data seed) with --synthetic."""
    if args.eval_data is not None:
        return load_data(argparse.Namespace(**{**vars(args), "data": args.eval_data, "synthetic": False,
                                               "eval_fraction": None}), tokenizer, source)
    if (args.eval_split or args.eval_fraction) and args.synthetic:
        raise CLIError("--eval-split / --eval-fraction take records of --data; --synthetic holds out examples itself")
    if args.eval_split:
        return load_data(argparse.Namespace(**{**vars(args), "split": args.eval_split, "eval_fraction": None}),
                         tokenizer, source)
    if args.eval_fraction:
        return load_data(argparse.Namespace(**{**vars(args), "records_part": "eval"}), tokenizer, source)
    if args.eval_every and args.synthetic:
        return load_data(argparse.Namespace(**{**vars(args), "data_seed": args.data_seed + 1}), tokenizer, source)
    if args.eval_every:
        raise CLIError("--eval-every needs --eval-data PATH, --eval-split NAME or --eval-fraction F (or --synthetic, "
                       "which holds out examples itself)")
    return None


def _where_to_resume(checkpoints: Path | None) -> str:
    newest = newest_valid_checkpoint(checkpoints) if checkpoints is not None else None
    if newest is None:
        return "no periodic checkpoint was written (add --save-every N to make a run resumable)"
    return f"the last complete checkpoint is {newest}"


def _resume_command(argv: list[str], checkpoint: Path) -> str:
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    return shlex.join(["bilevel-dlm", *kept, "--resume", str(checkpoint)])


def _interrupted(args: argparse.Namespace, interrupted: TrainingInterrupted) -> int:
    """Ctrl-C during training: one line naming the checkpoint of the state at the interrupt (or why there is
    none, and the last periodic one) and the command that resumes from it; exit status 130."""
    if interrupted.checkpoint is not None:
        message = (f"interrupted after step {interrupted.step}, saved {interrupted.checkpoint}; resume with: "
                   f"{_resume_command(args.argv, interrupted.checkpoint)}")
    else:
        checkpoints = Path(f"{args.output}-checkpoints") if args.output else None
        newest = newest_valid_checkpoint(checkpoints) if checkpoints is not None and checkpoints.exists() else None
        message = f"interrupted after step {interrupted.step}, not saved ({interrupted.reason or 'no --output'})"
        if newest is not None:
            message += f"; the last complete checkpoint is {newest}; resume with: {_resume_command(args.argv, newest)}"
    print(f"bilevel-dlm train: {message}", file=sys.stderr)
    return 130


def _save(wrapper: MemoryWrapper, output: Path, history: History, checkpoints: Path | None) -> Path:
    try:
        return wrapper.save_pretrained(output, training_state={"history": asdict(history)})
    except Exception as error:  # any failure of the final save: the message says what is left on disk
        raise CLIError(f"saving the trained model to {output} failed ({error}); {_where_to_resume(checkpoints)}") from error


def run(args: argparse.Namespace) -> int:
    if args.save_every and not args.output:
        raise CLIError("--save-every needs --output DIR (checkpoints go to DIR-checkpoints/checkpoint-<step>)")
    output = Path(args.output) if args.output else None
    if output is None:
        return _train(args, None, None)
    _check_output(output)
    checkpoints = Path(f"{output}-checkpoints")  # periodic checkpoints, and the state saved at Ctrl-C
    if args.save_every:
        _check_writable(checkpoints, "--save-every: checkpoint folder")
    with output_lock(output):
        return _train(args, output, checkpoints)


def _train(args: argparse.Namespace, output: Path | None, checkpoints: Path | None) -> int:
    resume = _resume_point(args.resume)
    device = resolve_device(args.device)
    with progress_bars(not args.no_progress):
        source, tokenizer, tokenizer_source = _training_source(args, resume)
        config = effective_config(args, source.saved if source else None)
        if getattr(args, "document_mask", False) and config.outer.objective == "cart":
            raise CLIError("--document-mask keeps packed documents apart, which CART's context weights would cross; "
                           "use outer.objective: mdlm with it")
        data = load_data(args, tokenizer, tokenizer_source, batch_padding=True)
        evaluation = _evaluation_data(args, tokenizer, tokenizer_source)
        if source is None:
            torch.manual_seed(config.seed)
            longest = max(len(row["input_ids"]) for row in data.rows + (evaluation.rows if evaluation else []))
            source = Source(tiny_model(args.tiny or "llada", tokenizer, max_length=longest), tokenizer)
        check_vocabulary(data.rows + (evaluation.rows if evaluation else []), source.model)
        wrapper = wrap(source.model, config, device, tokenizer=tokenizer, backbone=args.backbone, saved=source.saved)
        wrapper.trained_on = data_record(args)  # saved with every checkpoint: eval --synthetic defaults to it

        started = time.perf_counter()
        try:
            with reported("training"):
                history = wrapper.fit(Rows(data.rows), eval_data=evaluation.rows if evaluation else None,
                                      eval_every=args.eval_every, max_steps=args.steps, batch_size=args.batch_size,
                                      gradient_accumulation_steps=args.accumulation, collate_fn=data.collate,
                                      save_every=args.save_every,
                                      output_dir=checkpoints, resume_from=resume,
                                      allow_pickle=args.allow_pickle, allow_changes=args.allow_changes,
                                      progress=not args.no_progress)
        except TrainingInterrupted as interrupted:
            return _interrupted(args, interrupted)
        except (TrainingDiverged, CheckpointError, OSError) as error:
            raise CLIError(f"training stopped: {error}; {_where_to_resume(checkpoints)}") from error
        seconds = time.perf_counter() - started
        saved_to = None
        if output is not None:
            try:
                with deferred_interrupt():  # a Ctrl-C now waits for the final save to complete
                    saved_to = _save(wrapper, output, history, checkpoints)
            except KeyboardInterrupt:
                saved_to = output
    try:
        _report(args, wrapper, history, data, device, seconds)
    except KeyboardInterrupt:  # the run is complete and saved: Ctrl-C only cut the report short
        pass
    if saved_to is not None:
        print(f"saved to {saved_to}")
    return 0


def _report(args: argparse.Namespace, wrapper: MemoryWrapper, history: History, data: Data, device: torch.device,
            seconds: float) -> None:
    """What the run trained and measured, on standard output."""
    parameters = sum(p.numel() for p in wrapper.model.parameters())
    print(f"model: {type(wrapper.model).__name__} (backbone {wrapper.backbone.name}, "
          f"{parameters:,} parameters) on {device}")
    print(f"trained to step {args.steps} on {len(data.rows)} rows in {seconds:.1f} s "
          f"({history.skipped_batches} batches skipped, {len(history.nonfinite_steps)} non-finite steps skipped)")
    if history.outer_loss:
        print(f"outer loss: first {history.outer_loss[0]:.4f}, final {history.outer_loss[-1]:.4f}")
    if history.inner_losses and history.inner_losses[-1]:
        print("inner losses at the final step: " + ", ".join(f"{v:.4f}" for v in history.inner_losses[-1]))
    for step, off, prompt in zip(history.eval_steps, history.eval_loss, history.eval_loss_prompt_memory):
        print(f"step {step}: eval loss {off:.4f} (memory off), {prompt:.4f} (prompt memory)")
