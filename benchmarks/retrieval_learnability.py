"""Which settings let plain MDLM learn retrieval from scratch within a few hundred steps on a CPU?

The main job's base learns none of its tasks in 600 steps; this isolates why. Each trial trains a tiny LLaDA
(2 blocks, width 128, AdamW 3e-3, batch 32, cosine with 5% warmup) from scratch with plain MDLM on one mixture
of the main job's tasks, then scores exact match / token accuracy by decoding 48 held-out examples per task.
Tokenizers: the word-level recall vocabulary (136 tokens) or the main job's byte-level BPE (1024 tokens).
Trials run on two processes of one thread each; prints one JSON line per trial.

    python benchmarks/retrieval_learnability.py
"""

from __future__ import annotations

import json
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TRIALS = [  # name, tasks, tokenizer, steps, recall pairs
    ("position, 4 pairs, word-level, 400 steps", ("position",), "word", 400, 4),
    ("position, 4 pairs, job BPE, 400 steps", ("position",), "bpe", 400, 4),
    ("position, 4 pairs, job BPE, 1200 steps", ("position",), "bpe", 1200, 4),
    ("mqar, 4 pairs / 2 queries, job BPE, 400 steps", ("mqar",), "bpe", 400, 4),
    ("mqar, 2 pairs / 2 queries, word-level, 1200 steps", ("mqar",), "word", 1200, 2),
    ("the job's four tasks mixed, job BPE, 400 steps", ("needle", "multikey", "position", "mqar"), "bpe", 400, 4),
]


def trial(name: str, tasks: tuple[str, ...], tokenizer_kind: str, steps: int, pairs: int) -> dict:
    import torch

    import memdlm_llada as job
    from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryWrapper, OuterConfig
    from bilevel_dlm.data import pad_collate
    from bilevel_dlm.integrations import tiny_model
    from bilevel_dlm.tasks import encode_example
    from bilevel_dlm.tasks.recall import generate_associative_recall, generate_position_recall, recall_tokenizer

    torch.set_num_threads(1)
    budget = job.BUDGETS["default"]
    word_level = tokenizer_kind == "word"
    tokenizer = recall_tokenizer() if word_level else job.job_tokenizer(budget)
    keys, values = job.recall_words()

    def make(task: str, n: int, seed: int) -> list:
        if task in ("needle", "multikey"):
            return job.make_examples(task, n, seed, budget)
        rng = random.Random(f"{task}{seed}")
        generate = generate_position_recall if task == "position" else generate_associative_recall
        if word_level:
            return [generate(rng, pairs, 2) for _ in range(n)]
        return [replace(e, answer=f" {e.answer}") for e in (generate(rng, pairs, 2, keys=keys, values=values)
                                                            for _ in range(n))]

    def rows(examples: list) -> list[dict]:
        if not word_level:
            return job.rows_of(tokenizer, examples)
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return [encode_example(tokenizer, e.prompt, e.answer, 2 + count(e.prompt) + count(e.answer)) for e in examples]

    train = [row for task in tasks for row in rows(make(task, 4096, 0))]
    torch.manual_seed(0)
    model = tiny_model("llada", tokenizer, width=128, layers=2, max_length=256)
    config = MemDLMConfig(inner=InnerConfig(steps=0), outer=OuterConfig(lr=3e-3, warmup_ratio=0.05))
    wrapper = MemoryWrapper(model, config, tokenizer=tokenizer)
    started = time.perf_counter()
    wrapper.fit(train, max_steps=steps, batch_size=32, collate_fn=partial(pad_collate, pad_token_id=tokenizer.pad_token_id),
                progress=False)
    scores = job.decoding_scores(wrapper, tokenizer, {task: make(task, 48, 1) for task in tasks}, adapt=False, seed=0)
    return {"trial": name, "train_seconds": round(time.perf_counter() - started, 1), "scores": scores}


def main() -> None:
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        for result in pool.map(trial, *zip(*TRIALS)):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
