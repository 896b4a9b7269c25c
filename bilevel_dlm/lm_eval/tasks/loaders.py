"""The offline long-context tasks as lm-eval tasks: data from this package's generators, as JSONL.

Each task is one (task, context length) cell of the synthetic suite (RULER-style multi-value needle
``mv``, variable tracking ``vt``, common-words extraction ``cwe``; bAbI-style fact tracking ``babi``).
``load_task`` is the YAMLs' ``custom_dataset``: it reads ``<data_dir>/<task name>.jsonl`` when that file
exists (written by ``python -m bilevel_dlm.lm_eval write``), else writes it first to the cache folder
(``$BILEVEL_DLM_TASK_DATA`` or ``~/.cache/bilevel_dlm/lm_eval``); nothing is downloaded. Context
lengths count the suite's own tokens (its word-level split). ``process_results`` scores with the
suite's exact match (token sequences equal) and ``contains`` (the reference's tokens appear in order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bilevel_dlm.lm_eval  # noqa: F401  (registers the "bilevel_dlm" model when lm_eval loads these tasks)
from bilevel_dlm.tasks import exact_match, make_dataset
from bilevel_dlm.tasks.vocab import split_tokens

__all__ = ["load_task", "process_results", "task_name", "write_task_files", "contains", "DEFAULT_LENGTHS"]

DEFAULT_LENGTHS = (256, 512, 1024)
DEFAULT_EXAMPLES, DEFAULT_SEED = 50, 1000
TASKS = ("mv", "vt", "cwe", "babi")
GROUP = "bilevel_dlm_long_context"


def task_name(task: str, context_length: int) -> str:
    return f"bilevel_dlm_{task}_{context_length}"


def _cache() -> Path:
    return Path(os.environ.get("BILEVEL_DLM_TASK_DATA", Path.home() / ".cache" / "bilevel_dlm" / "lm_eval"))


def _write_jsonl(path: Path, task: str, context_length: int, examples: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": e.prompt, "answer": e.answer, "context_tokens": e.context_tokens}
            for e in make_dataset(task, examples, context_length, seed)]
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    partial.replace(path)


def load_task(task: str, context_length: int, examples: int = DEFAULT_EXAMPLES, seed: int = DEFAULT_SEED,
              data_dir: str | None = None, **_metadata: Any) -> dict:
    """lm-eval ``custom_dataset``: {"test": Dataset} of the cell's examples (prompt, answer)."""
    import datasets

    name = f"{task_name(task, context_length)}_n{examples}_s{seed}.jsonl"
    path = Path(data_dir) / name if data_dir else _cache() / name
    if not path.exists():
        _write_jsonl(path, task, context_length, examples, seed)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def contains(prediction: str, answer: str) -> bool:
    """Whether the answer's tokens appear, in order and contiguous, in the prediction's tokens."""
    predicted, reference = split_tokens(prediction), split_tokens(answer)
    return any(predicted[i:i + len(reference)] == reference for i in range(len(predicted) - len(reference) + 1))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = results[0]
    return {"exact_match": float(exact_match(prediction, doc["answer"])),
            "contains": float(contains(prediction, doc["answer"]))}


def _task_yaml(task: str, context_length: int, examples: int, seed: int, data_dir: str | None) -> str:
    kwargs = {"task": task, "context_length": context_length, "examples": examples, "seed": seed}
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return "\n".join([
        f"task: {task_name(task, context_length)}",
        f"tag: {GROUP}",
        "custom_dataset: !function loaders.load_task",
        f"dataset_kwargs: {json.dumps(kwargs)}",
        "output_type: generate_until",
        "test_split: test",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{answer}}"',
        "generation_kwargs: {until: [], max_gen_toks: 32}",
        "process_results: !function loaders.process_results",
        "metric_list:",
        "  - {metric: exact_match, aggregation: mean, higher_is_better: true}",
        "  - {metric: contains, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}",
        "",
    ])


def write_task_files(output: str | Path, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = DEFAULT_LENGTHS,
                     examples: int = DEFAULT_EXAMPLES, seed: int = DEFAULT_SEED, with_data: bool = True) -> list[Path]:
    """Write the task YAMLs (and, ``with_data``, their JSONL files and a loader shim) into ``output``,
    for ``lm_eval --include_path output``. Returns the YAML paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        for length in lengths:
            if with_data:
                _write_jsonl(output / f"{task_name(task, length)}_n{examples}_s{seed}.jsonl", task, length, examples, seed)
            path = output / f"{task_name(task, length)}.yaml"
            path.write_text(_task_yaml(task, length, examples, seed, str(output.resolve()) if with_data else None))
            paths.append(path)
    if with_data:
        (output / "loaders.py").write_text('"""lm-eval loads the task functions from here."""\n'
                                           "from bilevel_dlm.lm_eval.tasks.loaders import *  # noqa: F401,F403\n"
                                           "from bilevel_dlm.lm_eval.tasks.loaders import load_task, process_results"
                                           "  # noqa: F401\n")
    return paths
