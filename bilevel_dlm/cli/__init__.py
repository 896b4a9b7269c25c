"""The bilevel-dlm command line: bilevel training, evaluation and generation from a shell.

    bilevel-dlm train --synthetic --steps 200 --lr 1e-3 --output runs/tiny
    bilevel-dlm eval --checkpoint runs/tiny --synthetic --accuracy
    bilevel-dlm generate --checkpoint runs/tiny --prompt "mary went to the kitchen. question: where is mary? answer:"
    bilevel-dlm convert-checkpoint old_run/          # an earlier release's checkpoint, rewritten without pickles

Every command is also callable in-process as ``main([...])``, which returns the exit status: 0 on
success, 2 for bad arguments, missing files, unusable data or a failed save (a one-line message, no
traceback), 130 when interrupted (``train`` first saves the state after its last complete step). This
module holds the parser only and imports torch lazily, so ``--help`` is fast; each command lives in its
own module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["main", "build_parser", "CLIError", "TASK_NAMES", "FAMILY_NAMES", "DEFAULT_CONTEXT_LENGTHS",
           "DEFAULT_EXAMPLES_PER_TASK", "DEFAULT_EVAL_DATA_SEED", "FORMATS", "TRUNCATIONS"]

# The choices of --tasks and --tiny (checked against bilevel_dlm.tasks.TASKS and
# bilevel_dlm.integrations.TINY_FAMILIES by the tests), spelled out so parsing imports nothing heavy.
TASK_NAMES = ("mv", "vt", "cwe", "babi")
# The synthetic suite's defaults; eval uses the run's recorded suite instead where it has one.
DEFAULT_CONTEXT_LENGTHS, DEFAULT_EXAMPLES_PER_TASK, DEFAULT_EVAL_DATA_SEED = (128,), 16, 1
FAMILY_NAMES = ("llada", "dream", "llada_moe", "mdlm", "llada2")
# The choices of --format and --truncation (checked against bilevel_dlm.finetune_data by the tests).
FORMATS = ("messages", "alpaca", "prompt_completion", "text", "tokens")
TRUNCATIONS = ("filter", "right", "error")

DESCRIPTION = "bilevel-dlm: bilevel (MemDLM) training, evaluation and generation for masked diffusion LMs."


class CLIError(Exception):
    """A user-facing problem (bad input, missing file, failed save); ``main`` prints it on one line and returns 2."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


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
    if not 0.0 <= value < float("inf"):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text!r}")
    return value


def _sampler_setting(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as a YAML scalar (steps=16, temperature=0.5, block_length=8)."""
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE is not a YAML scalar") from error


def _add_generation_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    group = parser.add_argument_group(f"generation{note}")
    group.add_argument("--no-adapt", action="store_true", help="generate without prompt memory")
    group.add_argument("--sampler", action="append", type=_sampler_setting, metavar="KEY=VALUE",
                       help="a setting of the backbone's sampler, e.g. steps=16, block_length=8, temperature=0.5 "
                            "(repeatable; default: its defaults)")
    group.add_argument("--seed", type=int, help="seed of the sampler and the prompt memory (default: the config seed)")


def _add_data_arguments(parser: argparse.ArgumentParser, *, from_run: bool) -> None:
    """--data / --synthetic and the suite's options. With ``from_run`` (eval) the suite's options default
    to None, filled in from the checkpoint's recorded training suite (``bilevel_dlm.cli.evaluate``)."""
    source = parser.add_argument_group("data (one of --data / --synthetic)").add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="PATH", help="records: a .json / .jsonl / .parquet / .csv file, a "
                        "datasets save_to_disk folder or a hub dataset name; formats messages, alpaca, "
                        "prompt/completion (or prompt/answer), text, or token records {\"input_ids\", \"labels\"}")
    source.add_argument("--synthetic", action="store_true", help="the built-in offline long-context task suite")
    records = parser.add_argument_group("records (--data)")
    records.add_argument("--format", choices=FORMATS, help="record format (default: detected per record)")
    records.add_argument("--split", default="train", help="split of a folder or hub dataset (default: train)")
    records.add_argument("--truncation", choices=TRUNCATIONS, default="filter", help="a record longer than "
                         "--max-length: filter (drop), right (keep the prompt, clip the response) or error "
                         "(default: filter)")
    template = records.add_mutually_exclusive_group()
    template.add_argument("--chat-template", dest="chat_template", action="store_const", const=True, default=None,
                          help="encode chats with the tokenizer's chat template (an error if it has none; default: "
                               "use it when the tokenizer has one)")
    template.add_argument("--no-chat-template", dest="chat_template", action="store_const", const=False,
                          help="encode <bos> prompt response <eos> without a template (base models)")
    records.add_argument("--supervise", choices=("last", "all"), default="last",
                         help="assistant turns to supervise in multi-turn chats (default: last)")
    records.add_argument("--num-proc", type=_positive_int, metavar="N", help="processes that encode the records "
                         "(datasets.map; the encoding is cached by datasets either way)")
    records.add_argument("--document-mask", action="store_true", help="text records: keep the documents packed "
                         "into a row apart in attention (block-diagonal mask), as if each ran alone")
    synthetic = parser.add_argument_group(
        "synthetic suite" + (" (each option defaults to the run's recorded training suite, else to the "
                             "value named)" if from_run else ""))
    lengths = " ".join(map(str, DEFAULT_CONTEXT_LENGTHS))
    synthetic.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None if from_run else list(TASK_NAMES),
                           metavar="TASK", help=f"tasks to draw from: {' '.join(TASK_NAMES)} (default: all)")
    synthetic.add_argument("--context-lengths", nargs="+", type=_positive_int, metavar="N",
                           default=None if from_run else list(DEFAULT_CONTEXT_LENGTHS),
                           help=f"context lengths in tokens (default: {lengths}; mv and vt need >= 72)")
    synthetic.add_argument("--examples-per-task", type=_positive_int, metavar="N",
                           default=None if from_run else DEFAULT_EXAMPLES_PER_TASK,
                           help="examples per task, spread over the context lengths "
                                f"(default: {DEFAULT_EXAMPLES_PER_TASK})")
    synthetic.add_argument("--data-seed", type=int, default=None if from_run else 0, metavar="SEED",
                           help="seed of the synthetic examples " + (
                               f"(default: the run's data seed + 1, held-out examples, else {DEFAULT_EVAL_DATA_SEED})"
                               if from_run else "(default: 0; eval uses the run's seed + 1, held-out examples)"))
    recorded = "with --synthetic the run's --max-length if it gave one, else " if from_run else ""
    parser.add_argument("--max-length", type=_positive_int, metavar="N",
                        help="length policy limit of --data records (see --truncation) and row length of encoded "
                             "text: the response is followed by supervised EOS padding to it (default: "
                             f"{recorded}the longest example)")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    trust = parser.add_argument_group("loading checkpoints of untrusted origin (off: nothing a checkpoint carries runs)")
    trust.add_argument("--allow-pickle", action="store_true", help="read the pickled training state of a checkpoint "
                       "written by an earlier bilevel_dlm (torch's restricted unpickler); or run convert-checkpoint once")
    trust.add_argument("--trust-remote-code", action="store_true", help="import a model class the checkpoint names "
                       "that is neither a built-in family's nor a transformers class (runs that module's code)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel-dlm", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="bilevel (MemDLM) training",
                                description="Bilevel training of a masked diffusion LM with parametric memory.")
    train.add_argument("--config", metavar="YAML", help="MemDLMConfig YAML (default: the saved config of "
                       "--model/--resume checkpoints, else the MemDLM preset)")
    _add_data_arguments(train, from_run=False)
    model = train.add_argument_group("model (default: --tiny llada)").add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH", help="save_pretrained folder of a built-in backbone (its "
                       "tokenizer, if saved there, encodes text data) or a bilevel_dlm checkpoint folder")
    model.add_argument("--tiny", choices=FAMILY_NAMES, help="a random tiny model sized to the built-in tokenizer")
    train.add_argument("--backbone", metavar="NAME", help="adapter name, overriding detection from the model")
    train.add_argument("--steps", type=_positive_int, default=100, metavar="N",
                       help="outer optimizer steps (default: 100)")
    train.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="rows per batch (default: 8)")
    train.add_argument("--accumulation", type=_positive_int, default=1, metavar="N", help="micro-batches of "
                       "--batch-size rows per optimizer step, their gradients accumulated (default: 1)")
    train.add_argument("--lr", type=_non_negative_float, help="outer learning rate (overrides outer.lr)")
    train.add_argument("--seed", type=int, help="config seed (overrides seed): anchors, model init, data order")
    train.add_argument("--output", metavar="DIR", help="write the final checkpoint to DIR (a new or empty "
                       "folder, or an earlier checkpoint, which is replaced); checked for writing before training")
    train.add_argument("--save-every", type=_positive_int, metavar="N", help="also write a resumable "
                       "checkpoint (with its history.json) every N steps to DIR-checkpoints/checkpoint-<step> "
                       "(beside DIR, as saving DIR replaces that whole folder)")
    train.add_argument("--resume", metavar="DIR", help="continue from a --save-every checkpoint, or from the newest "
                       "valid one in a DIR-checkpoints folder (same data, batch size and --steps as the interrupted "
                       "run reproduce it exactly); also the model when --model/--tiny are not given")
    train.add_argument("--allow-changes", action="store_true", help="with --resume: continue although the config, "
                       "data, --batch-size, --accumulation or --steps differ from the checkpoint's run (recorded in "
                       "its history)")
    train.add_argument("--eval-every", type=_positive_int, metavar="N", help="eval loss (memory off and prompt "
                       "memory) every N steps and at the end, on --eval-data or, with --synthetic, on held-out examples")
    held_out = train.add_mutually_exclusive_group()
    held_out.add_argument("--eval-data", metavar="PATH", help="evaluation records (read as --data) for --eval-every")
    held_out.add_argument("--eval-split", metavar="NAME", help="evaluation records: this split of --data's folder or "
                          "hub dataset (e.g. test)")
    held_out.add_argument("--eval-fraction", type=_fraction, metavar="F", help="evaluation records: a fraction F of "
                          "--data's records, held out of training (drawn with --data-seed)")
    _add_common_arguments(train)
    train.set_defaults(handler="train")

    evaluate = commands.add_parser("eval", help="eval loss (memory off / prompt memory), optional accuracy",
                                   description="MDLM loss on the response with memory off and with memory "
                                               "adapted on each prompt; optionally exact-match accuracy.")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="a bilevel_dlm checkpoint folder")
    _add_data_arguments(evaluate, from_run=True)
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                          help="rows per batch (default: 8)")
    evaluate.add_argument("--accuracy", action="store_true",
                          help="also exact-match accuracy of generated answers (needs text records)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                          help="tokens generated per answer with --accuracy (default: the row's response length)")
    _add_generation_arguments(evaluate, " (with --accuracy)")
    _add_common_arguments(evaluate)
    evaluate.set_defaults(handler="evaluate")

    generate = commands.add_parser("generate", help="generate answers to prompts",
                                   description="Decode generations for prompts with a checkpoint's tokenizer.")
    generate.add_argument("--checkpoint", required=True, metavar="DIR", help="a bilevel_dlm checkpoint folder")
    generate.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                          help="prompt text (repeat for several; one output line each)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                          help="tokens to generate (default: 32)")
    _add_generation_arguments(generate)
    _add_common_arguments(generate)
    generate.set_defaults(handler="generation")

    convert = commands.add_parser("convert-checkpoint", help="rewrite an earlier release's checkpoint without pickles",
                                  description="Rewrite checkpoints written by an earlier bilevel_dlm, whose training "
                                              "state is a pickle, in the current format (safetensors + JSON). Read "
                                              "with torch's restricted unpickler; run it on checkpoints you trust.")
    convert.add_argument("path", metavar="DIR", help="a checkpoint, or a folder of checkpoint-<step> folders (each)")
    convert.set_defaults(handler="convert")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an argument error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    args.argv = argv
    try:
        return importlib.import_module(f".{args.handler}", __name__).run(args)
    except CLIError as error:
        print(f"bilevel-dlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train reports its own (with the checkpoint it saved); here: before or after it
        print(f"bilevel-dlm {args.command}: interrupted", file=sys.stderr)
        return 130
