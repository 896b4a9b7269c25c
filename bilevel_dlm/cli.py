"""The ``bilevel-dlm`` command line: bilevel training, evaluation and generation from a shell.

    bilevel-dlm train --synthetic --steps 200 --lr 1e-3 --output runs/tiny
    bilevel-dlm eval --checkpoint runs/tiny --synthetic --accuracy
    bilevel-dlm generate --checkpoint runs/tiny --prompt "mary went to the kitchen. question: where is mary? answer:"

Every command is also callable in-process as ``main([...])``, which returns the exit status: 0 on
success, 2 for bad arguments, missing files or unusable data (a one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from .checkpoint import META
from .config import MemDLMConfig
from .integrations import TINY_FAMILIES, tiny_model
from .sampling import default_sampler
from .tasks import TASKS, build_tokenizer, encode_example, exact_match, make_dataset
from .tasks.tokenizer import IGNORE_INDEX
from .wrapper import MemoryWrapper

__all__ = ["main", "build_parser", "CLIError"]



class CLIError(Exception):
    """A user-facing problem (bad input, missing file); ``main`` prints it on one line and returns 2."""


@contextmanager
def _reported(context: str) -> Iterator[None]:
    """Turn the library's validation errors (clear messages by design) into a CLIError prefixed by ``context``."""
    try:
        yield
    except (ValueError, KeyError, yaml.YAMLError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise CLIError(f"{context}: {message}") from error


def _existing(path: str, flag: str) -> Path:
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


class _Rows(Dataset):
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
            with _reported(f"--synthetic {task} at context length {length}"):
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
        token_rows, pairs = read_jsonl(_existing(args.data, "--data"))
    if pairs and tokenizer is None:
        raise CLIError(f"prompt/answer records need a tokenizer and {tokenizer_source} has none; "
                       'use token records ({"input_ids": [...], "labels": [...]}) instead')
    max_length = args.max_length or max((_needed_length(tokenizer, *pair) for pair in pairs), default=0)
    with _reported("encoding the prompt/answer records"):
        encoded = [encode_example(tokenizer, prompt, answer, max_length) for prompt, answer in pairs]
    rows = token_rows + encoded
    if not any(_supervised(row).any() for row in rows):
        raise CLIError("no record has a supervised token (every label is -100): nothing to train on or score")
    return Data(rows, [(row, answer) for row, (_, answer) in zip(encoded, pairs)])


def _supervised(row: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = row.get("labels", row["input_ids"])
    attention = row.get("attention_mask", torch.ones_like(labels))
    return (labels != IGNORE_INDEX) & attention.bool()


def _check_vocabulary(rows: list[dict[str, torch.Tensor]], model: nn.Module) -> None:
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


def _builtin_model_class(architectures: Sequence[str]) -> type[nn.Module] | None:
    from . import integrations

    for name in architectures:
        for family in integrations.__all__:
            found = getattr(getattr(integrations, family), name, None)
            if isinstance(found, type) and issubclass(found, nn.Module):
                return found
    return None


def load_model_folder(path: Path) -> Source:
    """A MemoryWrapper checkpoint (``bilevel_dlm.json``) or a ``save_pretrained`` folder of a built-in backbone."""
    if (path / META).exists():
        with _reported(f"checkpoint {path}"):
            saved = MemoryWrapper.from_pretrained(path)
        return Source(saved.model, saved.tokenizer, saved)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CLIError(f"{path} is neither a bilevel_dlm checkpoint ({META}) nor a save_pretrained model "
                       "folder (config.json)")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    model_class = _builtin_model_class(architectures)
    if model_class is None:
        raise CLIError(f"{config_file}: architectures {architectures} name no built-in model class "
                       f"(supported families: {', '.join(TINY_FAMILIES)})")
    model = model_class.from_pretrained(path)
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return Source(model, tokenizer)


def wrap(model: nn.Module, config: MemDLMConfig, device: torch.device, *, tokenizer: Any = None,
         backbone: str | None = None, saved: MemoryWrapper | None = None) -> MemoryWrapper:
    """A wrapper around ``model`` moved to ``device``. From a saved wrapper it keeps the backbone and
    mask id, and the inner optimizer's meta-parameters when their shapes still match."""
    model.to(device)
    with _reported("setting up the wrapper"):
        wrapper = MemoryWrapper(model, config, tokenizer=tokenizer,
                                backbone=backbone or (saved.backbone.name if saved else None),
                                mask_token_id=saved.mask_token_id if saved else None)
    if saved is not None:
        old, new = saved.inner.meta_parameters(), wrapper.inner.meta_parameters()
        if [p.shape for p in old] == [p.shape for p in new]:
            with torch.no_grad():
                for target, value in zip(new, old):
                    target.copy_(value)
    return wrapper


def load_checkpoint(path: str, device: torch.device) -> MemoryWrapper:
    """``MemoryWrapper.from_pretrained`` on ``device``."""
    folder = _existing(path, "--checkpoint")
    if not (folder / META).exists():
        raise CLIError(f"--checkpoint {path}: not a bilevel_dlm checkpoint (no {META}); write one with train --output")
    with _reported(f"checkpoint {folder}"):
        return MemoryWrapper.from_pretrained(folder, device=device)


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
        path = _existing(args.config, "--config")
        with _reported(f"--config {path}"):
            config = MemDLMConfig.from_yaml(path)
    else:
        config = saved.config if saved is not None else MemDLMConfig()
    values = config.model_dump()
    if args.lr is not None:
        values["outer"]["lr"] = args.lr
    if args.seed is not None:
        values["seed"] = args.seed
    with _reported("config overrides"):
        return MemDLMConfig.model_validate(values)


# ----- generation ------------------------------------------------------------------------------------
def _sampler_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a YAML scalar (``steps=16``, ``temperature=0.5``, ``block_length=8``)."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE is not a YAML scalar") from error


def generation_settings(args: argparse.Namespace, wrapper: MemoryWrapper) -> dict[str, Any]:
    """Keyword arguments of ``MemoryWrapper.generate``; the sampler is built here so bad settings fail early."""
    with _reported("--sampler"):
        sampler = default_sampler(wrapper.backbone, **dict(args.sampler or []))
    return {"adapt": not args.no_adapt, "seed": args.seed, "sampler": sampler}


def decode(tokenizer: Any, ids: torch.Tensor) -> str:
    """Text of generated ids up to the first EOS (the response is answer + EOS padding)."""
    tokens = ids.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def accuracy(wrapper: MemoryWrapper, answered: list[tuple[dict[str, torch.Tensor], str]], *, batch_size: int,
             max_new_tokens: int | None, settings: dict[str, Any]) -> int:
    """Number of exact-match answers, generating from each row's prompt (its -100-labelled prefix).

    Prompts of equal length are batched, so no padding enters a generation. Without ``max_new_tokens``
    the model fills the row's response length, as in training. ``settings`` go to ``generate``.
    """
    by_length: dict[int, list[int]] = {}
    for index, (row, _) in enumerate(answered):
        by_length.setdefault(int((row["labels"] == IGNORE_INDEX).sum()), []).append(index)
    correct = 0
    for prompt_length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = [answered[i][0] for i in chunk]
            prompts = torch.stack([row["input_ids"][:prompt_length] for row in rows]).to(wrapper.device)
            new_tokens = max_new_tokens or len(rows[0]["input_ids"]) - prompt_length
            with _reported("generation"):
                output = wrapper.generate(prompts, max_new_tokens=new_tokens, **settings)
            for i, generated in zip(chunk, output[:, prompt_length:]):
                correct += exact_match(decode(wrapper.tokenizer, generated), answered[i][1])
    return correct


# ----- commands --------------------------------------------------------------------------------------
def _training_source(args: argparse.Namespace, resume: Path | None) -> tuple[Source | None, Any, str]:
    """(the loaded model or None for a tiny one, the tokenizer, where the tokenizer comes from)."""
    if args.model is not None:
        source = load_model_folder(_existing(args.model, "--model"))
        return source, source.tokenizer, f"--model {args.model}"
    if resume is not None and args.tiny is None:
        source = load_model_folder(resume)
        return source, source.tokenizer, f"--resume {args.resume}"
    return None, build_tokenizer(), "the built-in tokenizer"


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
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


def run_train(args: argparse.Namespace) -> int:
    if args.save_every and not args.output:
        raise CLIError("--save-every needs --output DIR (checkpoints go to DIR-checkpoints/checkpoint-<step>)")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not (output / META).exists() and (
            not output.is_dir() or any(output.iterdir())):
        raise CLIError(f"--output {output} exists and is not a bilevel_dlm checkpoint; saving replaces the whole "
                       "folder, so give a new or empty one")
    resume = _existing(args.resume, "--resume") if args.resume else None
    device = resolve_device(args.device)
    with _progress_bars(not args.no_progress):
        source, tokenizer, tokenizer_source = _training_source(args, resume)
        config = effective_config(args, source.saved if source else None)
        data = load_data(args, tokenizer, tokenizer_source)
        if source is None:
            torch.manual_seed(config.seed)
            longest = max(len(row["input_ids"]) for row in data.rows)
            source = Source(tiny_model(args.tiny or "llada", tokenizer, max_length=longest), tokenizer)
        _check_vocabulary(data.rows, source.model)
        wrapper = wrap(source.model, config, device, tokenizer=tokenizer, backbone=args.backbone, saved=source.saved)

        started = time.perf_counter()
        with _reported("training"):
            history = wrapper.fit(_Rows(data.rows), max_steps=args.steps, batch_size=args.batch_size,
                                  save_every=args.save_every, output_dir=f"{output}-checkpoints" if output else None,
                                  resume_from=resume, progress=not args.no_progress)
        seconds = time.perf_counter() - started
        saved_to = wrapper.save_pretrained(output) if output is not None else None

    parameters = sum(p.numel() for p in wrapper.model.parameters())
    print(f"model: {type(wrapper.model).__name__} (backbone {wrapper.backbone.name}, "
          f"{parameters:,} parameters) on {device}")
    print(f"trained to step {args.steps} on {len(data.rows)} rows in {seconds:.1f} s "
          f"({history.skipped_batches} batches skipped)")
    if history.outer_loss:
        print(f"outer loss: first {history.outer_loss[0]:.4f}, final {history.outer_loss[-1]:.4f}")
    if history.inner_losses and history.inner_losses[-1]:
        print("inner losses at the final step: " + ", ".join(f"{v:.4f}" for v in history.inner_losses[-1]))
    if saved_to is not None:
        print(f"saved to {saved_to}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    wrapper = load_checkpoint(args.checkpoint, resolve_device(args.device))
    data = load_data(args, wrapper.tokenizer, f"--checkpoint {args.checkpoint}")
    _check_vocabulary(data.rows, wrapper.model)
    if args.accuracy and not data.answered:
        raise CLIError("--accuracy needs reference answers: use --synthetic or prompt/answer records")
    settings = generation_settings(args, wrapper) if args.accuracy else {}
    with _reported("evaluation"):
        off = wrapper.eval_loss(data.rows, memory="off", batch_size=args.batch_size)
        prompt = wrapper.eval_loss(data.rows, memory="prompt", batch_size=args.batch_size)
    print(f"eval loss, memory off:    {off:.4f}")
    print(f"eval loss, prompt memory: {prompt:.4f}")
    if args.accuracy:
        correct = accuracy(wrapper, data.answered, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, settings=settings)
        total = len(data.answered)
        print(f"exact match: {correct / total:.4f} ({correct}/{total})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    wrapper = load_checkpoint(args.checkpoint, resolve_device(args.device))
    if wrapper.tokenizer is None:
        raise CLIError(f"--checkpoint {args.checkpoint} has no tokenizer, so prompts cannot be encoded")
    settings = generation_settings(args, wrapper)
    for prompt in args.prompt:
        ids = wrapper.tokenizer(prompt, return_tensors="pt")["input_ids"].to(wrapper.device)
        with _reported("generation"):
            output = wrapper.generate(ids, max_new_tokens=args.max_new_tokens, **settings)
        print(decode(wrapper.tokenizer, output[0, ids.shape[1]:]))
    return 0


# ----- parser ----------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def _add_generation_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    group = parser.add_argument_group(f"generation{note}")
    group.add_argument("--no-adapt", action="store_true", help="generate without prompt memory")
    group.add_argument("--sampler", action="append", type=_sampler_setting, metavar="KEY=VALUE",
                       help="a setting of the backbone's sampler, e.g. steps=16, block_length=8, temperature=0.5 "
                            "(repeatable; default: its defaults)")
    group.add_argument("--seed", type=int, help="seed of the sampler and the prompt memory (default: the config seed)")


def _add_data_arguments(parser: argparse.ArgumentParser, default_data_seed: int) -> None:
    source = parser.add_argument_group("data (one of --data / --synthetic)").add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="PATH", help='JSONL file; each line {"input_ids": [...], "labels": [...]} '
                        '(labels -100 on the prompt; optional "attention_mask") or {"prompt": str, "answer": str} '
                        "(encoded with the tokenizer)")
    source.add_argument("--synthetic", action="store_true", help="the built-in offline long-context task suite")
    synthetic = parser.add_argument_group("synthetic suite")
    synthetic.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS), metavar="TASK",
                           help=f"tasks to draw from: {' '.join(TASKS)} (default: all)")
    synthetic.add_argument("--context-lengths", nargs="+", type=_positive_int, default=[128], metavar="N",
                           help="context lengths in tokens (default: 128; mv and vt need >= 72)")
    synthetic.add_argument("--examples-per-task", type=_positive_int, default=16, metavar="N",
                           help="examples per task, spread over the context lengths (default: 16)")
    synthetic.add_argument("--data-seed", type=int, default=default_data_seed, metavar="SEED",
                           help=f"seed of the synthetic examples (default: {default_data_seed}; train uses 0 "
                                "and eval 1, so eval examples are held out)")
    parser.add_argument("--max-length", type=_positive_int, metavar="N",
                        help="row length of encoded prompt/answer records: answer + EOS padding "
                             "(default: the longest example)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel-dlm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="bilevel (MemDLM) training",
                                description="Bilevel training of a masked diffusion LM with parametric memory.")
    train.add_argument("--config", metavar="YAML", help="MemDLMConfig YAML (default: the saved config of "
                       "--model/--resume checkpoints, else the MemDLM preset)")
    _add_data_arguments(train, default_data_seed=0)
    model = train.add_argument_group("model (default: --tiny llada)").add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH", help="save_pretrained folder of a built-in backbone (its "
                       "tokenizer, if saved there, encodes text data) or a bilevel_dlm checkpoint folder")
    model.add_argument("--tiny", choices=TINY_FAMILIES, help="a random tiny model sized to the built-in tokenizer")
    train.add_argument("--backbone", metavar="NAME", help="adapter name, overriding detection from the model")
    train.add_argument("--steps", type=_positive_int, default=100, metavar="N",
                       help="outer optimizer steps (default: 100)")
    train.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="rows per batch (default: 8)")
    train.add_argument("--lr", type=_non_negative_float, help="outer learning rate (overrides outer.lr)")
    train.add_argument("--seed", type=int, help="config seed (overrides seed): anchors, model init, data order")
    train.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--output", metavar="DIR", help="write the final checkpoint to DIR (a new or empty "
                       "folder, or an earlier checkpoint, which is replaced)")
    train.add_argument("--save-every", type=_positive_int, metavar="N", help="also write a resumable "
                       "checkpoint every N steps to DIR-checkpoints/checkpoint-<step> (beside DIR, as saving "
                       "DIR replaces that whole folder)")
    train.add_argument("--resume", metavar="DIR", help="continue from a --save-every checkpoint (same data, "
                       "batch size and --steps as the interrupted run reproduce it exactly); also the model "
                       "when --model/--tiny are not given")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("eval", help="eval loss (memory off / prompt memory), optional accuracy",
                                   description="MDLM loss on the response with memory off and with memory "
                                               "adapted on each prompt; optionally exact-match accuracy.")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="a bilevel_dlm checkpoint folder")
    _add_data_arguments(evaluate, default_data_seed=1)
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                          help="rows per batch (default: 8)")
    evaluate.add_argument("--accuracy", action="store_true",
                          help="also exact-match accuracy of generated answers (needs text records)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                          help="tokens generated per answer with --accuracy (default: the row's response length)")
    _add_generation_arguments(evaluate, " (with --accuracy)")
    evaluate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    evaluate.set_defaults(handler=run_eval)

    generate = commands.add_parser("generate", help="generate answers to prompts",
                                   description="Decode generations for prompts with a checkpoint's tokenizer.")
    generate.add_argument("--checkpoint", required=True, metavar="DIR", help="a bilevel_dlm checkpoint folder")
    generate.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                          help="prompt text (repeat for several; one output line each)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                          help="tokens to generate (default: 32)")
    _add_generation_arguments(generate)
    generate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    generate.set_defaults(handler=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an argument error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.handler(args)
    except CLIError as error:
        print(f"bilevel-dlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
