"""``python -m bilevel_dlm.lm_eval``: where the shipped task YAMLs are, or write task data and YAMLs.

    python -m bilevel_dlm.lm_eval --tasks-dir          # for lm_eval --include_path
    python -m bilevel_dlm.lm_eval write --output tasks/ --tasks mv babi --context-lengths 2048 4096 --examples 100
    python -m bilevel_dlm.lm_eval run --model bilevel_dlm --model_args pretrained=run/ --tasks ...   # lm_eval's CLI
"""

from __future__ import annotations

import argparse
import sys

from .tasks.loaders import DEFAULT_EXAMPLES, DEFAULT_LENGTHS, DEFAULT_SEED, TASKS, write_task_files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # lm-eval's command line, with the bilevel_dlm model registered
        from lm_eval.__main__ import cli_evaluate

        from . import BilevelDLM  # noqa: F401

        sys.argv = ["lm_eval", *argv[1:]]
        cli_evaluate()
        return 0
    parser = argparse.ArgumentParser(prog="python -m bilevel_dlm.lm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks-dir", action="store_true", help="print the folder of the shipped task YAMLs")
    commands = parser.add_subparsers(dest="command")
    write = commands.add_parser("write", help="write JSONL data and task YAMLs for lm_eval --include_path")
    write.add_argument("--output", required=True)
    write.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    write.add_argument("--context-lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
    write.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES)
    write.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    if args.tasks_dir:
        from . import TASKS_DIR

        print(TASKS_DIR)
        return 0
    if args.command != "write":
        parser.print_help()
        return 2
    paths = write_task_files(args.output, args.tasks, args.context_lengths, args.examples, args.seed)
    print(f"wrote {len(paths)} tasks to {args.output}: lm_eval --include_path {args.output} --tasks "
          + ",".join(p.stem for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
