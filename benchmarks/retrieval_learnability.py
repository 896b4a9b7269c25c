"""Which settings let plain MDLM learn retrieval from scratch within a few thousand steps on a CPU?

The main job needs a base model that has learnt at least one retrieval task; this isolates what decides it.
Each trial trains a tiny LLaDA (width 128, AdamW, batch 32, 5% warmup) from scratch with plain MDLM on a
mixture of the main job's sources (its own examples, ``train_examples`` of each task, and prose rows), one
source per batch drawn with the mixture's probabilities (the main job's ``task_batches``), then scores
exact match / token accuracy by decoding 48 held-out examples per task. Tokenizer: the main job's
byte-level BPE (1024 tokens); recall keys and values are its frequent prose words. The ``job-mix`` trials
train on the main job's PRETRAIN_MIX, as its base does.
Trials run on two processes of one thread each; prints one JSON line per trial, in the order listed.

    python benchmarks/retrieval_learnability.py                      # every trial (about 12 minutes)
    python benchmarks/retrieval_learnability.py position-8 mqar-8x8  # the named ones
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import memdlm_llada as job  # noqa: E402 - the main job's data, batching and scoring


@dataclass(frozen=True)
class Trial:
    mix: dict[str, float]  # source -> share of the steps ("prose" or a main-job task)
    steps: int
    pairs: dict[str, int] = field(default_factory=lambda: {"position": 4, "mqar": 4})
    queries: int = 2  # mqar keys asked per example
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    layers: int = 2


TRIALS = {
    "position-4-1200": Trial({"position": 1.0}, 1200),
    "position-4-800": Trial({"position": 1.0}, 800),
    "position-8-600": Trial({"position": 1.0}, 600, {"position": 8}),
    "position-4-600-lr-1e-2": Trial({"position": 1.0}, 600, lr=1e-2),
    "position-4+prose-1500": Trial({"prose": 0.2, "position": 0.8}, 1500),
    "job-mix-position-4-2000": Trial(job.PRETRAIN_MIX, 2000),
    "job-mix-position-8-2000": Trial(job.PRETRAIN_MIX, 2000, {"position": 8, "mqar": 4}),
    "job-mix-position-8-2000-constant-lr": Trial(job.PRETRAIN_MIX, 2000, {"position": 8, "mqar": 4},
                                                 lr_schedule="constant"),
    "mqar-4x2-3000": Trial({"mqar": 1.0}, 3000),
    "mqar-4x1-3000": Trial({"mqar": 1.0}, 3000, queries=1),
    "mqar-4x1-3000-4-layers": Trial({"mqar": 1.0}, 3000, queries=1, layers=4),
    "mqar-2x1-2000": Trial({"mqar": 1.0}, 2000, {"mqar": 2}, queries=1),
    "mqar-4x4-2000": Trial({"mqar": 1.0}, 2000, queries=4),
    "mqar-8x8-1500": Trial({"mqar": 1.0}, 1500, {"mqar": 8}, queries=8),
}


def run_trial(name: str) -> dict:
    import torch

    from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryWrapper, OuterConfig
    from bilevel_dlm.integrations import tiny_model

    torch.set_num_threads(1)
    trial, budget = TRIALS[name], job.BUDGETS["default"]
    tokenizer = job.job_tokenizer(budget)

    def make(task: str, n: int, seed: int) -> list:
        return job.make_examples(task, n, seed, budget, trial.pairs.get(task), trial.queries)

    tasks = [source for source in trial.mix if source != "prose"]
    rows = {task: job.rows_of(tokenizer, make(task, budget.train_examples, 1000)) for task in tasks}
    if "prose" in trial.mix:
        rows["prose"] = job.prose_rows(tokenizer)
    batches = job.task_batches(rows, trial.mix, 32, 0, job.collate(tokenizer))
    torch.manual_seed(0)
    model = tiny_model("llada", tokenizer, width=128, layers=trial.layers, max_length=256)
    config = MemDLMConfig(inner=InnerConfig(steps=0),
                          outer=OuterConfig(lr=trial.lr, warmup_ratio=0.05, lr_schedule=trial.lr_schedule))
    wrapper = MemoryWrapper(model, config, tokenizer=tokenizer)
    started = time.perf_counter()
    wrapper.fit(batches, max_steps=trial.steps, progress=False)
    seconds = time.perf_counter() - started
    scores = job.decoding_scores(wrapper, tokenizer, {task: make(task, 48, 2) for task in tasks}, adapt=False, seed=0)
    return {"trial": name, "train_seconds": round(seconds, 1),
            "scores": {task: {k: round(v, 3) for k, v in s.items()} for task, s in scores.items()}}


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(TRIALS))
    if unknown:
        raise SystemExit(f"unknown trials {unknown}; choose from {list(TRIALS)}")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run_trial, names or list(TRIALS)):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
