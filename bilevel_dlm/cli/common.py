"""What the commands share: reading data, loading models and checkpoints, the device and the config."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import META, load_tokenizer
from ..config import MemDLMConfig
from ..integrations import load_pretrained
from ..finetune_data import (DataError, EncodingOptions, LengthReport, detect_format, encode_dataset,
                             encode_records, eos_pad_collate, load_records, to_messages)
from ..tasks import make_dataset
from ..tasks.tokenizer import IGNORE_INDEX
from ..wrapper import MemoryWrapper
from . import CLIError

__all__ = ["Data", "Rows", "Source", "reported", "existing", "load_data", "data_record",
           "check_vocabulary", "load_model_folder", "loading_options", "wrap", "load_checkpoint", "resolve_device", "effective_config",
           "progress_bars"]


@contextmanager
def reported(context: str) -> Iterator[None]:
    """Turn the library's validation errors (clear messages by design) into a CLIError prefixed by ``context``."""
    try:
        yield
    except (ValueError, KeyError, yaml.YAMLError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise CLIError(f"{context}: {message}") from error


def existing(path: str, flag: str) -> Path:
    resolved = Path(path)
    if not resolved.exists():
        raise CLIError(f"{flag} {path}: no such file or directory")
    return resolved


# ----- data ------------------------------------------------------------------------------------------
@dataclass
class Data:
    """Encoded rows (``input_ids``, ``labels``, ``attention_mask``), for the text records their encoded row
    and reference answer (for exact-match accuracy), and the collate function training batches them with
    (None: ``pad_collate``)."""

    rows: list[dict[str, torch.Tensor]]
    answered: list[tuple[dict[str, torch.Tensor], str]]
    collate: Callable[[Any], dict[str, torch.Tensor]] | None = None


class Rows(Dataset):
    """The rows as a map-style Dataset, so ``fit`` shuffles them (reproducibly, from the config seed)."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def synthetic_pairs(
    tasks: Sequence[str], per_task: int, context_lengths: Sequence[int], seed: int
) -> list[tuple[str, str]]:
    """``per_task`` examples of each task, spread as evenly as possible over ``context_lengths``."""
    pairs = []
    for task in tasks:
        for index, length in enumerate(context_lengths):
            count = per_task // len(context_lengths) + (index < per_task % len(context_lengths))
            with reported(f"--synthetic {task} at context length {length}"):
                pairs += [(e.prompt, e.answer) for e in make_dataset(task, count, length, seed)]
    return pairs


def load_data(args: argparse.Namespace, tokenizer: Any, tokenizer_source: str, *, batch_padding: bool = False) -> Data:
    """The rows of ``--data`` (:mod:`bilevel_dlm.finetune_data`: its formats, chat template and length policy,
    counts printed; ``--eval-fraction`` holds out a part, ``args.records_part`` picks it) or ``--synthetic``.
    Chat rows get supervised EOS padding, as in LLaDA's supervised fine-tuning: with ``batch_padding`` (the
    training records of ``--data``) up to the longest row of each batch (``Data.collate``), otherwise each row
    up to ``--max-length`` (default: the longest row); token records and packed text are used as they are."""
    if args.synthetic:
        records: Any = [{"prompt": prompt, "answer": answer}
                        for prompt, answer in synthetic_pairs(args.tasks, args.examples_per_task,
                                                              args.context_lengths, args.data_seed)]
        options = EncodingOptions(max_length=args.max_length, truncation="error", chat_template=False)
        source = "--synthetic"
    else:
        records, source = _read_records(args), args.data
        options = EncodingOptions(format=args.format, max_length=args.max_length, truncation=args.truncation,
                                  chat_template=args.chat_template, supervise=args.supervise,
                                  document_mask=args.document_mask)
    formats = [args.format or _format(_clean(record), source, i) for i, record in enumerate(records)]
    if tokenizer is None and any(fmt != "tokens" for fmt in formats):
        raise CLIError(f"text records need a tokenizer and {tokenizer_source} has none; "
                       'use token records ({"input_ids": [...], "labels": [...]}) instead')
    report = LengthReport()
    with reported(f"encoding {source}"):
        if args.synthetic:
            encoded = list(encode_records(records, tokenizer, options, source=source, report=report))
        else:
            encoded, report = encode_dataset(records, tokenizer, options, source=source, num_proc=args.num_proc)
    if not args.synthetic:
        print(f"--data {args.data}: {report.line()}", file=sys.stderr)
    args.length_report = report
    is_chat = ["record_index" in row and formats[row["record_index"]] not in ("tokens", "text") for row in encoded]
    chats = [row for row, chat in zip(encoded, is_chat) if chat]
    batch_padding = batch_padding and not args.synthetic and bool(chats)
    padded = iter(_rows(eos_pad_collate(chats, tokenizer.eos_token_id, args.max_length))
                  if chats and not batch_padding else [_tensors(row) for row in chats])
    rows, answered = [], []
    for row, chat in zip(encoded, is_chat):
        tensors = next(padded) if chat else _tensors(row)
        rows.append(tensors)
        answer = _answer(_clean(records[row["record_index"]]), formats[row["record_index"]], source) if chat else None
        if answer is not None:
            answered.append((tensors, answer))
    if not any(_supervised(row).any() for row in rows):
        raise CLIError("no record has a supervised token (every label is -100): nothing to train on or score")
    collate = partial(eos_pad_collate, eos_token_id=tokenizer.eos_token_id) if batch_padding else None
    return Data(rows, answered, collate)


def _clean(record: Any) -> Any:
    """A record without the None fields datasets adds where a file's records differ in their fields."""
    return {k: v for k, v in record.items() if v is not None} if isinstance(record, dict) else record


def _read_records(args: argparse.Namespace) -> Any:
    """The records of ``--data`` (a local file or folder, else a hub dataset name) as a ``datasets.Dataset``;
    with ``--eval-fraction`` its training or held-out part (``args.records_part``, drawn with ``--data-seed``)."""
    path = Path(args.data)
    looks_local = path.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv") or args.data.startswith((".", "/", "~"))
    if not path.exists() and looks_local:
        raise CLIError(f"--data {args.data}: no such file or directory")
    try:
        with reported(f"--data {args.data}"):
            records = load_records(args.data, split=args.split)
    except CLIError:
        raise
    except Exception as error:  # datasets' own errors: offline, unknown name, unreadable file
        raise CLIError(f"--data {args.data}: could not be loaded ({type(error).__name__}: {error})") from error
    if not len(records):
        raise CLIError(f"--data {args.data} holds no records")
    fraction = getattr(args, "eval_fraction", None)
    if fraction:
        if len(records) < 2:
            raise CLIError(f"--eval-fraction {fraction}: --data {args.data} has one record, nothing to hold out")
        with reported(f"--eval-fraction {fraction}"):
            parts = records.train_test_split(test_size=fraction, seed=args.data_seed or 0)
        records = parts["test" if getattr(args, "records_part", "train") == "eval" else "train"]
    return records


def _format(record: Any, source: str, index: int) -> str:
    try:
        return detect_format(record, f"{source} row {index}")
    except DataError as error:
        raise CLIError(str(error)) from None


def _answer(record: dict[str, Any], fmt: str, source: str) -> str | None:
    """The reference answer of a one-turn record (exact-match accuracy): its chat's last turn, as encoded."""
    if fmt not in ("alpaca", "prompt_completion"):
        return None
    return to_messages(record, fmt, source)[-1]["content"]


def _tensors(row: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(row[name]) for name in ("input_ids", "labels", "attention_mask", "document_ids")
            if name in row}


def _rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The rows of a padded batch, each a dict of 1-D tensors."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def data_record(args: argparse.Namespace) -> dict[str, Any]:
    """What ``train`` records of its data in the checkpoint (``MemoryWrapper.trained_on``): the synthetic
    suite's options, which ``eval --synthetic`` defaults to, or the JSONL file."""
    if args.synthetic:
        return {"source": "synthetic", "tasks": list(args.tasks), "context_lengths": list(args.context_lengths),
                "examples_per_task": args.examples_per_task, "data_seed": args.data_seed,
                "max_length": args.max_length}
    report = getattr(args, "length_report", None)
    return {"source": "records", "path": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
            "split": args.split, "format": args.format, "truncation": args.truncation,
            "chat_template": args.chat_template, "supervise": args.supervise, "max_length": args.max_length,
            "document_mask": args.document_mask, "eval_split": getattr(args, "eval_split", None),
            "eval_fraction": getattr(args, "eval_fraction", None), "data_seed": args.data_seed,
            "length_report": None if report is None else asdict(report)}


def _supervised(row: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = row.get("labels", row["input_ids"])
    attention = row.get("attention_mask", torch.ones_like(labels))
    return (labels != IGNORE_INDEX) & attention.bool()


def check_vocabulary(rows: list[dict[str, torch.Tensor]], model: nn.Module) -> None:
    vocab_size = model.config.vocab_size
    largest = max(int(row["input_ids"].max()) for row in rows)
    smallest = min(int(row["input_ids"].min()) for row in rows)
    if smallest < 0 or largest >= vocab_size:
        raise CLIError(f"the data holds token ids in [{smallest}, {largest}] but the model's vocabulary has "
                       f"ids 0..{vocab_size - 1}; encode the data with the model's tokenizer")


# ----- models ----------------------------------------------------------------------------------------
@dataclass
class Source:
    """A model to train: its tokenizer, and the wrapper it was saved from (for a MemoryWrapper checkpoint)."""

    model: nn.Module
    tokenizer: Any
    saved: MemoryWrapper | None = None


def loading_options(args: argparse.Namespace) -> dict[str, bool]:
    """The opt-ins of ``MemoryWrapper.from_pretrained`` given on the command line."""
    return {"allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code}


def load_model_folder(path: Path, options: dict[str, bool]) -> Source:
    """A MemoryWrapper checkpoint (``bilevel_dlm.json``) or a ``save_pretrained`` folder of a built-in backbone."""
    if (path / META).exists():
        with reported(f"checkpoint {path}"):
            saved = MemoryWrapper.from_pretrained(path, **options)
        return Source(saved.model, saved.tokenizer, saved)
    if not (path / "config.json").exists():
        raise CLIError(f"{path} is neither a bilevel_dlm checkpoint ({META}) nor a save_pretrained model "
                       "folder (config.json)")
    with reported("--model"):
        model = load_pretrained(path)
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        with reported("--model tokenizer"):
            tokenizer = load_tokenizer(path, trust_remote_code=options["trust_remote_code"])
    return Source(model, tokenizer)


def wrap(model: nn.Module, config: MemDLMConfig, device: torch.device, *, tokenizer: Any = None,
         backbone: str | None = None, saved: MemoryWrapper | None = None) -> MemoryWrapper:
    """A wrapper around ``model`` moved to ``device``. From a saved wrapper it keeps the backbone and
    mask id, and the inner method's meta-parameters (MetaSGD rates, phi_0) when their shapes still match;
    otherwise it warns that they are not used."""
    model.to(device)
    with reported("setting up the wrapper"):
        wrapper = MemoryWrapper(model, config, tokenizer=tokenizer,
                                backbone=backbone or (saved.backbone.name if saved else None),
                                mask_token_id=saved.mask_token_id if saved else None)
    if saved is not None:
        old, new = saved.inner.meta_parameters(), wrapper.inner.meta_parameters()
        if [p.shape for p in old] == [p.shape for p in new]:
            with torch.no_grad():
                for target, value in zip(new, old):
                    target.copy_(value)
        elif old:
            warnings.warn(f"the checkpoint's {len(old)} inner meta-parameters (MetaSGD rates, a meta-learned phi_0) "
                          "do not fit this config's inner method and are not used: the inner method starts anew",
                          stacklevel=2)
    return wrapper


def load_checkpoint(path: str, device: torch.device, options: dict[str, bool]) -> MemoryWrapper:
    """``MemoryWrapper.from_pretrained`` on ``device`` (a checkpoint, or the newest valid one of a folder)."""
    folder = existing(path, "--checkpoint")
    with reported(f"--checkpoint {folder}"):
        try:
            return MemoryWrapper.from_pretrained(folder, device=device, **options)
        except FileNotFoundError as error:
            raise ValueError(f"not a bilevel_dlm checkpoint ({error}); write one with train --output") from error


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:  # compare equal to the device parameters report
        return torch.device("cuda", torch.cuda.current_device())
    return device


def effective_config(args: argparse.Namespace, saved: MemoryWrapper | None) -> MemDLMConfig:
    """``--config`` YAML, else the saved wrapper's config, else the MemDLM preset; then --lr / --seed."""
    if args.config is not None:
        path = existing(args.config, "--config")
        with reported(f"--config {path}"):
            config = MemDLMConfig.from_yaml(path)
    else:
        config = saved.config if saved is not None else MemDLMConfig()
    values = config.model_dump()
    if args.lr is not None:
        values["outer"]["lr"] = args.lr
    if args.seed is not None:
        values["seed"] = args.seed
    with reported("config overrides"):
        return MemDLMConfig.model_validate(values)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' save / load bars too when the training bar is off."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    if not enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


