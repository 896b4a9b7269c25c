"""What the commands share: reading data, loading models and checkpoints, the device and the config."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import META, load_tokenizer
from ..config import MemDLMConfig
from ..integrations import load_pretrained
from ..tasks import encode_example, make_dataset
from ..tasks.tokenizer import IGNORE_INDEX
from ..wrapper import MemoryWrapper
from . import CLIError

__all__ = ["Data", "Rows", "Source", "reported", "existing", "read_jsonl", "load_data", "data_record",
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
    """Encoded rows (``input_ids``, ``labels``, ``attention_mask``) and, for the text records, their
    encoded row and reference answer (for exact-match accuracy)."""

    rows: list[dict[str, torch.Tensor]]
    answered: list[tuple[dict[str, torch.Tensor], str]]


class Rows(Dataset):
    """The rows as a map-style Dataset, so ``fit`` shuffles them (reproducibly, from the config seed)."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _int_list(value: Any, where: str, key: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        raise CLIError(f"{where}: {key!r} must be a non-empty list of integers")
    return value


def _token_row(record: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A {"input_ids", "labels"?, "attention_mask"?} record as tensors (labels -100 = prompt)."""
    row = {"input_ids": torch.tensor(_int_list(record["input_ids"], where, "input_ids"))}
    for key in ("labels", "attention_mask"):
        if key in record:
            values = _int_list(record[key], where, key)
            if len(values) != len(row["input_ids"]):
                raise CLIError(f"{where}: {key!r} has {len(values)} entries, 'input_ids' {len(row['input_ids'])}")
            row[key] = torch.tensor(values)
    return row


def read_jsonl(path: Path) -> tuple[list[dict[str, torch.Tensor]], list[tuple[str, str]]]:
    """Token records and (prompt, answer) records of a JSONL file, each line one or the other."""
    token_rows, pairs = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CLIError(f"{where}: invalid JSON ({error.msg})") from error
        if isinstance(record, dict) and "input_ids" in record:
            token_rows.append(_token_row(record, where))
        elif isinstance(record, dict) and all(isinstance(record.get(key), str) for key in ("prompt", "answer")):
            pairs.append((record["prompt"], record["answer"]))
        else:
            raise CLIError(f'{where}: expected {{"input_ids": [...], "labels": [...]}} '
                           'or {"prompt": str, "answer": str}')
    if not token_rows and not pairs:
        raise CLIError(f"{path} holds no records")
    return token_rows, pairs


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


def _needed_length(tokenizer: Any, prompt: str, answer: str) -> int:
    """Tokens of ``<bos> prompt answer <eos>``, the shortest row ``encode_example`` accepts."""
    return 2 + sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (prompt, answer))


def load_data(args: argparse.Namespace, tokenizer: Any, tokenizer_source: str) -> Data:
    """The rows of ``--data`` or ``--synthetic``; text is encoded to ``--max-length`` (default: the
    longest example), answer followed by EOS padding, as in LLaDA's supervised fine-tuning."""
    if args.synthetic:
        token_rows = []
        pairs = synthetic_pairs(args.tasks, args.examples_per_task, args.context_lengths, args.data_seed)
    else:
        token_rows, pairs = read_jsonl(existing(args.data, "--data"))
    if pairs and tokenizer is None:
        raise CLIError(f"prompt/answer records need a tokenizer and {tokenizer_source} has none; "
                       'use token records ({"input_ids": [...], "labels": [...]}) instead')
    max_length = args.max_length or max((_needed_length(tokenizer, *pair) for pair in pairs), default=0)
    with reported("encoding the prompt/answer records"):
        encoded = [encode_example(tokenizer, prompt, answer, max_length) for prompt, answer in pairs]
    rows = token_rows + encoded
    if not any(_supervised(row).any() for row in rows):
        raise CLIError("no record has a supervised token (every label is -100): nothing to train on or score")
    return Data(rows, [(row, answer) for row, (_, answer) in zip(encoded, pairs)])


def data_record(args: argparse.Namespace) -> dict[str, Any]:
    """What ``train`` records of its data in the checkpoint (``MemoryWrapper.trained_on``): the synthetic
    suite's options, which ``eval --synthetic`` defaults to, or the JSONL file."""
    if args.synthetic:
        return {"source": "synthetic", "tasks": list(args.tasks), "context_lengths": list(args.context_lengths),
                "examples_per_task": args.examples_per_task, "data_seed": args.data_seed,
                "max_length": args.max_length}
    return {"source": "jsonl", "path": str(Path(args.data).resolve())}


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


