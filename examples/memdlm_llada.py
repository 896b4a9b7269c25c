"""The main job: does MemDLM fine-tuning beat MDLM fine-tuning of the same pretrained diffusion LM at
retrieval from context, at equal steps and at equal compute? Offline, on CPU, the paper's protocol in small.

1. A tokenizer: byte-level BPE (digits one token each) trained on the job's own text: English prose from
   Python's documentation topics (``pydoc_data.topics``) plus the task formats.
2. A base model: a tiny LLaDA pretrained with plain MDLM on that prose and the task formats (PRETRAIN_MIX:
   mostly the short recall formats), once, cached in ``--output/base`` (a rerun with the same settings reuses
   it). Every arm and seed starts from it. Every batch, here and in fine-tuning, holds one task's rows
   (``task_batches``), so a short row is not padded to a needle's length.
3. Fine-tuning arms, each with the paper's outer LoRA (r 32, alpha 64), same data order per seed:
   MDLM; MDLM at 2x the learning rate (a control for "MemDLM only trains faster"); MemDLM, the paper's
   preset (anchor-consistent trajectory, 2 inner SGD steps, fast weights on the last block's FFN); MemDLM
   with fast weights on every block. Tasks: RULER's needle format (``needle``: one key; ``multikey``: two
   keys, retrieval by content), and two short recall tasks (``position``: copy values in order; ``mqar``:
   multi-query associative recall).
4. Evaluation as the paper's Table 1: memory off ("train-only") and prompt memory ("train & inference", the
   adaptation rate chosen per run on a validation split); held-out eval loss curves, exact match by decoding.
5. Equal compute: each arm's step cost relative to MDLM is calibrated by timing the arms' steps interleaved
   on the same batches in this process (one thread); an arm's curve is placed at steps x cost. Wall clocks
   of the worker processes are kept in results.json for reference only.
6. Verdicts by the rule of :mod:`bilevel_dlm.comparison` (paired-by-seed differences, 95% t intervals).
7. lm-eval's own RULER ``niah_single_1`` and ``ruler_vt`` on each arm's seed-0 checkpoint at the model's
   length, memory off and prompt (needs ``lm-eval[ruler]``; reported as not run otherwise).

    python examples/memdlm_llada.py                  # the default budget (5 seeds; 10 minutes on 2 idle cores)
    python examples/memdlm_llada.py --budget quick   # a smoke run (CI)
    python examples/memdlm_llada.py --budget long    # more steps and data (32 minutes on 2 idle cores)

Writes to --output: runs.json (every run, as soon as the runs end), results.json, results.md (the tables and
verdicts), four PNGs and checkpoints/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import random
import re
import statistics
import textwrap
from collections import Counter
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, replace
from collections.abc import Iterator
from functools import cache, partial
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy
import torch
from tqdm.auto import tqdm

from bilevel_dlm import AdaptConfig, InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.comparison import RULE, Interval, mean_interval, paired_difference, verdict
from bilevel_dlm.config import OuterLoRAConfig
from bilevel_dlm.evaluation import task_accuracy
from bilevel_dlm.data import pad_collate
from bilevel_dlm.finetune_data import EncodingOptions, encode_record, pack_documents
from bilevel_dlm.integrations import tiny_model
from bilevel_dlm.tasks import build_byte_level_tokenizer, token_accuracy
from bilevel_dlm.tasks.needles import documentation_prose, generate_needle
from bilevel_dlm.tasks.recall import generate_associative_recall, generate_position_recall
from bilevel_dlm.training import train_step


@dataclass(frozen=True)
class Budget:
    seeds: int
    pretrain_steps: int
    steps: int
    eval_every: int
    batch_size: int
    train_examples: int  # per task
    eval_examples: int  # per task and split (validation, test)
    haystack: int  # at most this many filler sentences around the needles
    calibration_rounds: int
    ruler_examples: int


BUDGETS = {
    "quick": Budget(seeds=2, pretrain_steps=4, steps=4, eval_every=2, batch_size=4, train_examples=16,
                    eval_examples=4, haystack=1, calibration_rounds=3, ruler_examples=1),
    "default": Budget(seeds=5, pretrain_steps=2000, steps=120, eval_every=20, batch_size=8, train_examples=2048,
                      eval_examples=24, haystack=2, calibration_rounds=12, ruler_examples=8),
    "long": Budget(seeds=5, pretrain_steps=4000, steps=1000, eval_every=100, batch_size=8, train_examples=8192,
                   eval_examples=64, haystack=2, calibration_rounds=20, ruler_examples=32),
}


@dataclass(frozen=True)
class Arm:
    inner_steps: int
    lr_factor: float = 1.0
    layer_fraction: float = 0.1  # the last-10% rule: the last block of a 2-block model
    meta_init: str = "none"
    meta_lr_factor: float = 1.0  # phi_0's learning rate relative to theta's (a meta-learned init only)


ARMS = {
    "MDLM": Arm(0),
    "MDLM (2x lr)": Arm(0, lr_factor=2.0),
    "MemDLM (last block)": Arm(2),
    "MemDLM (all blocks)": Arm(2, layer_fraction=1.0),
    "MemDLM (FOMAML init)": Arm(2, meta_init="fomaml"),
    "MemDLM (FOMAML init, meta lr / 20)": Arm(2, meta_init="fomaml", meta_lr_factor=0.05),
    "MemDLM (Reptile init)": Arm(2, meta_init="reptile"),
}
ARM_SETS = {  # --arms; MDLM, the reference of every comparison, is in each
    "default": ("MDLM", "MDLM (2x lr)", "MemDLM (last block)", "MemDLM (all blocks)"),
    "meta-init": ("MDLM", "MemDLM (last block)", "MemDLM (FOMAML init)", "MemDLM (FOMAML init, meta lr / 20)",
                  "MemDLM (Reptile init)"),
}
ADAPT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # 0.1 is the preset's inner rate; the sweep goes on until it hurts
TASKS = ("needle", "multikey", "position", "mqar")
# The share of steps each source gets (every batch holds one source, see task_batches). Pretraining: prose, and
# mostly the short recall formats; the needle rows are ten times longer and are not learnt at this scale.
PRETRAIN_MIX = {"prose": 0.2, "needle": 0.05, "multikey": 0.05, "position": 0.6, "mqar": 0.1}
FINETUNE_MIX = {"needle": 0.25, "multikey": 0.25, "position": 0.25, "mqar": 0.25}
PRETRAIN_BATCH, WARMUP = 32, 0.05  # pretraining batch; warmup fraction of every schedule
METRIC = {"needle": "exact_match", "multikey": "exact_match", "position": "exact_match", "mqar": "token_accuracy"}
# Pairs per recall example: position with 8 (each row supervises 8 copies: in PRETRAIN_MIX, exact match 0.917
# after 2000 steps where 4 pairs reach 0.083, benchmarks/retrieval_learnability.py), mqar with 4 pairs and 2 queries.
RECALL_PAIRS, MQAR_QUERIES = {"position": 8, "mqar": 4}, 2
# What naming one value found in the context scores: exact match of needle / multikey / position, token
# accuracy of mqar (one of its RECALL_PAIRS values per queried key).
CHANCE = {"needle": 0.0, "multikey": 0.5, "position": 0.0, "mqar": 1 / RECALL_PAIRS["mqar"]}
RULER_TASKS = ("niah_single_1", "ruler_vt")
MAX_LENGTH = 256  # the model's length, RULER's max_seq_length (lm-eval keeps 128 of it for the answer)
VT_TOO_SHORT = ("lm-eval 0.4.13's ruler_vt puts a few-shot example built for max_seq_length 500 in every prompt; "
                "at 500 or less its sample loop (vt_utils.sys_vartrack_w_noise_random) never ends")
VOCAB = 1024
DATA_VERSION = 2  # raise when the task formats or the pretraining mixture change (a cached base is then rebuilt)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--arms", choices=sorted(ARM_SETS), default="default")
    parser.add_argument("--output", default="outputs/memdlm_llada", help="folder for results, plots and checkpoints")
    parser.add_argument("--lr", type=float, default=3e-3, help="outer learning rate of fine-tuning (LoRA)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--outer", choices=("lora", "full"), default="lora",
                        help="fine-tune an outer LoRA (the paper's recipe) or every weight")
    parser.add_argument("--workers", type=int, default=0, help="worker processes, one thread each (0: one per core)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-ruler", action="store_true", help="skip lm-eval's RULER tasks")
    return parser.parse_args(argv)


# ----- data ------------------------------------------------------------------------------------------------
def make_examples(task: str, n: int, seed: int, budget: Budget, pairs: int | None = None,
                  queries: int = MQAR_QUERIES) -> list:
    """``n`` examples of a task; a deterministic function of (task, seed, budget, pairs, queries). ``pairs``:
    key-value pairs of a recall task (default RECALL_PAIRS[task])."""
    rng = random.Random(f"main-job:{task}:{seed}")
    if task in ("needle", "multikey"):
        keys = 1 if task == "needle" else 2
        return [generate_needle(rng, keys, rng.randint(0, budget.haystack), rng.choice(("noise", "prose")))
                for _ in range(n)]
    make = generate_position_recall if task == "position" else generate_associative_recall
    keys, values = recall_words()
    # The answer continues the prompt after a space, so its words are the same tokens as in the context.
    return [replace(example, answer=f" {example.answer}")
            for example in (make(rng, pairs or RECALL_PAIRS[task], queries, keys=keys, values=values)
                            for _ in range(n))]


@cache
def recall_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Keys and values of the recall tasks: the 128 most frequent words of the prose (nearly all of them one
    token of the job's tokenizer), alternately assigned."""
    counts = Counter(w for p in documentation_prose() for w in re.findall(r"\b[a-z]{4,}\b", p))
    common = [word for word, _ in counts.most_common(128)]
    return tuple(common[0::2]), tuple(common[1::2])


def splits(budget: Budget) -> dict[str, dict[str, list]]:
    """split -> task -> examples: train, validation (adaptation rate) and test come from disjoint streams."""
    sizes = {"train": budget.train_examples, "validation": budget.eval_examples, "test": budget.eval_examples}
    return {split: {task: make_examples(task, n, index, budget) for task in TASKS}
            for index, (split, n) in enumerate(sizes.items())}


def job_tokenizer(budget: Budget):
    """Byte-level BPE over the prose and examples of every task (digits one token each)."""
    samples = [e.prompt + e.answer for task in TASKS for e in make_examples(task, 200, 99, budget)]
    return build_byte_level_tokenizer([*documentation_prose(), *samples], VOCAB, individual_digits=True)


def rows_of(tokenizer, examples) -> list[dict]:
    """Prompt / completion rows (the completion and its EOS supervised), no chat template."""
    options = EncodingOptions(format="prompt_completion", chat_template=False)
    return [encode_record({"prompt": e.prompt, "completion": e.answer}, i, tokenizer, options)
            for i, e in enumerate(examples)]


def task_schedule(mix: dict[str, float], seed: int) -> Iterator[str]:
    """The task of each step, drawn with the probabilities of ``mix``: endless, a function of the seed alone."""
    rng = random.Random(f"task-schedule:{seed}")
    tasks, weights = list(mix), list(mix.values())
    while True:
        yield rng.choices(tasks, weights)[0]


def task_batches(rows: dict[str, list[dict]], mix: dict[str, float], batch_size: int, seed: int,
                 collate_fn) -> Iterator[dict]:
    """Endless batches, each of one task's rows, the tasks in :func:`task_schedule`'s order: a batch is padded
    to its own task's length, so the short recall tasks get their steps for a tenth of a needle step's cost.
    Each task's rows are taken in a shuffled order, a new one every pass (with fewer rows than a batch, a row
    can come twice, from two passes); a row carries its index in the tasks' rows laid end to end
    (``example_index``) and its pass (``epoch``), which key its random draws. A function of the seed alone,
    so every arm of a seed sees the same batches (and one that skips a batch still gets fresh ones)."""
    rng = random.Random(f"task-rows:{seed}")
    tasks = list(mix)
    offsets = dict(zip(tasks, numpy.cumsum([0] + [len(rows[t]) for t in tasks[:-1]]).tolist()))
    queues: dict[str, list[int]] = {task: [] for task in tasks}
    passes = dict.fromkeys(tasks, -1)
    for task in task_schedule(mix, seed):
        chosen = []
        while len(chosen) < batch_size:
            if not queues[task]:
                passes[task] += 1
                queues[task] = rng.sample(range(len(rows[task])), len(rows[task]))
            index = queues[task].pop()
            chosen.append({**rows[task][index], "example_index": offsets[task] + index, "epoch": passes[task]})
        yield collate_fn(chosen)


def prose_rows(tokenizer) -> list[dict]:
    """The documentation prose as packed rows of 64 tokens (documents separated by EOS)."""
    return list(pack_documents((tokenizer(p, add_special_tokens=False)["input_ids"] for p in documentation_prose()),
                               64, tokenizer.eos_token_id))


def collate(tokenizer):
    """Batches padded with unsupervised, unattended padding (each row's own EOS is supervised): with tasks of
    very different lengths in a batch, LLaDA's supervised EOS padding would make most targets of a short
    task's row EOS."""
    return partial(pad_collate, pad_token_id=tokenizer.pad_token_id)


# ----- the base model ----------------------------------------------------------------------------------------
def pretrained_base(output: Path, args: argparse.Namespace, budget: Budget, progress: bool) -> Path:
    """Pretrain (or reuse) the base: plain MDLM on packed prose rows and the task formats (fresh examples),
    every weight trained. Cached under ``output/base`` with the settings that made it."""
    settings = {"pretrain_steps": budget.pretrain_steps, "train_examples": budget.train_examples,
                "haystack": budget.haystack, "d_model": args.d_model, "layers": args.layers, "lr": args.pretrain_lr,
                "batch_size": PRETRAIN_BATCH, "warmup_ratio": WARMUP, "vocab": VOCAB, "max_length": MAX_LENGTH,
                "data_version": DATA_VERSION, "mix": list(PRETRAIN_MIX.items()), "recall_pairs": RECALL_PAIRS,
                "mqar_queries": MQAR_QUERIES, "bilevel_dlm": importlib.metadata.version("bilevel_dlm"),
                "torch": torch.__version__, "python": platform.python_version()}  # the prose is the Python's own
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = output / "base"
    if (folder / "job_settings.json").exists() and json.loads((folder / "job_settings.json").read_text())["key"] == key:
        return folder
    tokenizer = job_tokenizer(budget)
    rows = {task: rows_of(tokenizer, make_examples(task, budget.train_examples, 1000, budget)) for task in TASKS}
    rows["prose"] = prose_rows(tokenizer)
    torch.manual_seed(0)
    model = tiny_model("llada", tokenizer, width=args.d_model, layers=args.layers, max_length=MAX_LENGTH)
    config = MemDLMConfig(inner=InnerConfig(steps=0), outer=OuterConfig(lr=args.pretrain_lr, warmup_ratio=WARMUP))
    wrapper = MemoryWrapper(model, config, tokenizer=tokenizer)
    wrapper.fit(task_batches(rows, PRETRAIN_MIX, PRETRAIN_BATCH, 0, collate(tokenizer)),
                max_steps=budget.pretrain_steps, progress=progress)
    wrapper.save_pretrained(folder)
    (folder / "job_settings.json").write_text(json.dumps({"key": key, **settings}, indent=1))
    return folder


def base_scores(base: Path, budget: Budget) -> dict:
    """What fine-tuning starts from: the base's decoding scores on the test split (memory off)."""
    wrapper = MemoryWrapper.from_pretrained(base)
    return decoding_scores(wrapper, wrapper.tokenizer, splits(budget)["test"], adapt=False, seed=0)


# ----- one arm ------------------------------------------------------------------------------------------------
def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet() -> None:
    """No progress bars or load reports from transformers or lm-eval, no import-time notices from optional
    packages (bitsandbytes, DeepSpeed) that peft and transformers load: the job shows one display of its own."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("bitsandbytes.backends.cpu.ops", "DeepSpeed"):  # a filter: DeepSpeed resets its level on import
        logging.getLogger(name).addFilter(errors_only)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ["TQDM_DISABLE"] = "1"


def recipe(arm: str, args: argparse.Namespace, seed: int, adapt_lr: float | None = None,
           outer_lora: bool | None = None) -> MemDLMConfig:
    spec = ARMS[arm]
    lr = args.lr * spec.lr_factor
    lora = OuterLoRAConfig(apply=args.outer == "lora" if outer_lora is None else outer_lora, dropout=0.0)
    return MemDLMConfig(inner=InnerConfig(steps=spec.inner_steps, meta_init=spec.meta_init),
                        memory=MemoryConfig(layer_fraction=spec.layer_fraction),
                        outer=OuterConfig(lr=lr, meta_lr=lr * spec.meta_lr_factor, warmup_ratio=WARMUP, lora=lora),
                        adapt=AdaptConfig(lr=adapt_lr), seed=seed)


def fine_tuning_wrapper(base: Path, arm: str, args: argparse.Namespace, seed: int) -> MemoryWrapper:
    """The base with the arm's recipe; the outer LoRA's random init depends on the seed only."""
    pretrained = MemoryWrapper.from_pretrained(base)
    torch.manual_seed(seed)
    return MemoryWrapper(pretrained.model, recipe(arm, args, seed), tokenizer=pretrained.tokenizer)


def decoding_scores(wrapper: MemoryWrapper, tokenizer, examples: dict[str, list], adapt: bool, seed: int) -> dict:
    """Exact match and token accuracy per task, by generation with LLaDA's sampler."""
    scores = {}
    for task, items in examples.items():
        longest = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in items)
        exact, predictions = task_accuracy(wrapper, tokenizer, items, max_new_tokens=longest + 1, adapt=adapt,
                                           batch_size=32, seed=seed)
        scores[task] = {"exact_match": exact, "token_accuracy": statistics.fmean(
            token_accuracy(p, e.answer) for p, e in zip(predictions, items))}
    return scores


def with_adaptation(wrapper: MemoryWrapper, arm: str, args: argparse.Namespace, seed: int, lr: float
                    ) -> MemoryWrapper:
    """The trained model and inner method, adapting at rate ``lr`` at inference."""
    config = recipe(arm, args, seed, adapt_lr=lr, outer_lora=False)  # the model already carries its LoRA
    return MemoryWrapper(wrapper.model, config, tokenizer=wrapper.tokenizer, inner=wrapper.inner)


def run_arm(arm: str, seed: int, base: Path, args: argparse.Namespace, budget: Budget, checkpoints: Path | None
            ) -> dict:
    """Fine-tune one arm from the base for one seed; evaluate it as the module docstring says."""
    torch.set_num_threads(1)
    quiet()
    started = time.perf_counter()
    wrapper = fine_tuning_wrapper(base, arm, args, seed)
    tokenizer = wrapper.tokenizer
    data = splits(budget)
    rows = {split: {task: rows_of(tokenizer, items) for task, items in tasks.items()} for split, tasks in data.items()}
    pooled = {split: [row for task in TASKS for row in rows[split][task]] for split in ("validation", "test")}
    initial = wrapper.eval_loss(pooled["test"], batch_size=32)
    batches = task_batches(rows["train"], FINETUNE_MIX, budget.batch_size, seed, collate(tokenizer))
    history = wrapper.fit(batches, eval_data=pooled["test"], eval_every=budget.eval_every, eval_prompt_memory=False,
                          max_steps=budget.steps, progress=False)
    result = {"arm": arm, "seed": seed, "eval_steps": [0, *history.eval_steps],
              "eval_loss": [initial, *history.eval_loss],
              "tasks": list(islice(task_schedule(FINETUNE_MIX, seed), budget.steps)),
              "wall_seconds_per_step": statistics.fmean(history.step_seconds),
              "nonfinite_steps": history.nonfinite_steps, "skipped_batches": history.skipped_batches,
              "loss_off": {task: wrapper.eval_loss(rows["test"][task], batch_size=32) for task in TASKS},
              "decoding_off": decoding_scores(wrapper, tokenizer, data["test"], adapt=False, seed=seed)}
    off = wrapper.eval_loss(pooled["validation"], batch_size=32)
    sweep = {str(lr): with_adaptation(wrapper, arm, args, seed, lr).eval_loss(pooled["validation"], "prompt",
                                                                              batch_size=32) - off
             for lr in ADAPT_LRS}
    chosen = min(sweep, key=sweep.get)
    adapted = with_adaptation(wrapper, arm, args, seed, float(chosen))
    result.update(adapt_sweep=sweep, adapt_lr=float(chosen),
                  loss_prompt={task: adapted.eval_loss(rows["test"][task], "prompt", batch_size=32) for task in TASKS},
                  decoding_prompt=decoding_scores(adapted, tokenizer, data["test"], adapt=True, seed=seed))
    if checkpoints is not None:
        save_merged(wrapper, adapted.config, checkpoints / slug(arm))
        result["checkpoint"] = f"checkpoints/{slug(arm)}"  # relative to --output
    result["wall_seconds"] = time.perf_counter() - started
    return result


def save_merged(trained: MemoryWrapper, config: MemDLMConfig, folder: Path) -> Path:
    """A stand-alone checkpoint of a trained wrapper (its last use): the outer LoRA merged into the weights,
    the trained inner method kept, ``config`` (the chosen adaptation rate) recorded."""
    model = trained.peft_model.merge_and_unload() if trained.peft_model is not None else trained.model
    return MemoryWrapper(model, config, tokenizer=trained.tokenizer, inner=trained.inner).save_pretrained(folder)


def slug(arm: str) -> str:
    """A folder name for an arm: 'MemDLM (last block)' -> 'memdlm-last-block'."""
    return re.sub(r"[^a-z0-9]+", "-", arm.lower()).strip("-")


# ----- equal compute ------------------------------------------------------------------------------------------
def calibrate(base: Path, arms: tuple[str, ...], args: argparse.Namespace, budget: Budget) -> dict:
    """Each arm's step cost per fine-tuning task, in units of MDLM's mean step under FINETUNE_MIX: the arms'
    training steps timed interleaved (a shuffled order per task and round), one thread, on the same batch
    per task and round; round 0 is a warm-up. Ratios are taken within a round, so machine load that changes
    between rounds cancels. ``cost`` is an arm's mean step under the mix (MDLM: 1), ``task_cost`` a step of
    each task (what :func:`compute_positions` adds up over a run's own tasks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wrappers = {arm: fine_tuning_wrapper(base, arm, args, 0) for arm in arms}
        tokenizer = wrappers["MDLM"].tokenizer
        rows = {task: rows_of(tokenizer, make_examples(task, 4 * budget.batch_size, 7, budget))
                for task in FINETUNE_MIX}
        seconds = {arm: {task: [] for task in FINETUNE_MIX} for arm in arms}
        for wrapper in wrappers.values():
            wrapper.configure_optimizers(len(FINETUNE_MIX) * (budget.calibration_rounds + 1))
        for round_index in range(budget.calibration_rounds + 1):
            start = round_index % 4 * budget.batch_size
            for task in FINETUNE_MIX:
                batch = collate(tokenizer)(rows[task][start:start + budget.batch_size])
                order = list(arms)
                random.Random(f"{round_index}:{task}").shuffle(order)
                for arm in order:
                    begin = time.perf_counter()
                    train_step(wrappers[arm], batch)
                    if round_index:
                        seconds[arm][task].append(time.perf_counter() - begin)
    finally:
        torch.set_num_threads(threads)
    mean_step = {arm: [sum(share * seconds[arm][task][r] for task, share in FINETUNE_MIX.items())
                       for r in range(budget.calibration_rounds)] for arm in arms}
    unit = mean_step["MDLM"]
    ratios = {arm: [t / u for t, u in zip(mean_step[arm], unit)] for arm in arms}
    return {"rounds": budget.calibration_rounds, "mix": FINETUNE_MIX, "seconds": seconds,
            "cost": {arm: statistics.fmean(r) for arm, r in ratios.items()},
            "cost_interval": {arm: mean_interval(r).as_dict() if arm != "MDLM" else None for arm, r in ratios.items()},
            "task_cost": {arm: {task: statistics.fmean(t / u for t, u in zip(times, unit))
                                for task, times in seconds[arm].items()} for arm in arms}}


def compute_positions(run: dict, task_cost: dict[str, dict[str, float]]) -> list[float]:
    """A run's compute at each of its eval steps, in MDLM mean steps: the calibrated cost of every step it
    took, by the task of that step."""
    spent = numpy.concatenate([[0.0], numpy.cumsum([task_cost[run["arm"]][task] for task in run["tasks"]])])
    return [float(spent[step]) for step in run["eval_steps"]]


# ----- lm-eval's RULER ----------------------------------------------------------------------------------------
def ruler_scores(checkpoint: Path, examples: int, logs: Path) -> dict:
    """lm-eval's own RULER tasks on a checkpoint at MAX_LENGTH, memory off and prompt: {mode: {task: score}}.
    What lm-eval prints (its bars and warnings; its task index also asks nltk for punkt_tab) goes to
    ``logs/<checkpoint>-<mode>-<task>.log`` rather than the job's display."""
    try:
        import lm_eval
    except ImportError:
        return {"not run": "lm-eval is not installed (pip install -e '.[ruler]')"}
    from bilevel_dlm.lm_eval import BilevelDLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    wrapper = MemoryWrapper.from_pretrained(checkpoint)
    scores: dict = {}
    for mode in ("off", "prompt"):
        model = BilevelDLM(wrapper=wrapper, memory=mode, batch_size=8, steps=32, block_length=32)
        for task in RULER_TASKS:
            if task == "ruler_vt" and MAX_LENGTH <= 500:
                scores.setdefault(mode, {})[task] = {"not run": VT_TOO_SHORT}
                continue
            printed = io.StringIO()
            try:
                with redirect_stdout(printed), redirect_stderr(printed):
                    out = lm_eval.simple_evaluate(model=model, tasks=[task], limit=examples, log_samples=False,
                                                  metadata={"max_seq_lengths": [MAX_LENGTH],
                                                            "tokenizer": str(checkpoint / "tokenizer")})
            except Exception as error:  # noqa: BLE001 - recorded in the results, never dropped: e.g. lm-eval
                # cannot build one example at this length, or [eval] without RULER's packages ([ruler])
                scores.setdefault(mode, {})[task] = {"not run": f"{type(error).__name__}: {error}"[:300]}
                continue
            finally:
                logs.mkdir(parents=True, exist_ok=True)
                (logs / f"{checkpoint.name}-{mode}-{task}.log").write_text(printed.getvalue())
            metrics = out["results"][task]
            scores.setdefault(mode, {})[task] = {"score": metrics[f"{MAX_LENGTH},none"],
                                                 "stderr": metrics[f"{MAX_LENGTH}_stderr,none"],
                                                 "examples": examples}
    return scores


# ----- aggregation --------------------------------------------------------------------------------------------
def runs_by_arm(results: list[dict]) -> dict[str, list[dict]]:
    """arm -> its runs sorted by seed, arms in the order they were listed."""
    return {arm: sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
            for arm in dict.fromkeys(r["arm"] for r in results)}


def per_seed_measures(runs: list[dict], task_cost: dict, equal_compute: float) -> dict[str, list[float]]:
    """The numbers compared between arms, one per seed (lower is better for losses, higher for accuracies)."""
    measures = {"final eval loss": [r["eval_loss"][-1] for r in runs],
                "eval loss at equal compute": [float(numpy.interp(equal_compute, compute_positions(r, task_cost),
                                                                  r["eval_loss"])) for r in runs],
                "prompt memory: test loss change": [statistics.fmean(r["loss_prompt"].values())
                                                    - statistics.fmean(r["loss_off"].values()) for r in runs]}
    for task, metric in METRIC.items():
        for mode in ("off", "prompt"):
            measures[decoding_measure(task, mode)] = [r[f"decoding_{mode}"][task][metric] for r in runs]
    return measures


def decoding_measure(task: str, mode: str) -> str:
    """The name of a task's decoding score with memory ``mode``: 'mqar token accuracy, memory off'."""
    return f"{task} {METRIC[task].replace('_', ' ')}, memory {mode}"


LOWER_IS_BETTER = {"final eval loss", "eval loss at equal compute", "prompt memory: test loss change"}


def summarise(results: list[dict], calibration: dict) -> dict:
    """Per arm: each measure's mean and 95% interval; per arm and measure: the paired difference to MDLM and
    its verdict; per arm: whether prompt memory changes the test loss (its interval against 0)."""
    by_arm = runs_by_arm(results)
    task_cost = calibration["task_cost"]
    equal_compute = min(compute_positions(r, task_cost)[-1] for r in results)
    measures = {arm: per_seed_measures(runs, task_cost, equal_compute) for arm, runs in by_arm.items()}
    arms = {arm: {name: mean_interval(values).as_dict() for name, values in m.items()} for arm, m in measures.items()}
    comparisons = {}
    for arm in by_arm:
        if arm == "MDLM":
            continue
        for name, values in measures[arm].items():
            difference = paired_difference(values, measures["MDLM"][name])
            lower_is_better = name in LOWER_IS_BETTER
            comparisons.setdefault(arm, {})[name] = {**difference.as_dict(), "lower_is_better": lower_is_better,
                                                     "verdict": verdict(difference, lower_is_better)}
    memory_effect = {}
    for arm in by_arm:
        change = mean_interval(measures[arm]["prompt memory: test loss change"])
        memory_effect[arm] = {**change.as_dict(), "verdict": verdict(change, lower_is_better=True)}
    return {"equal_compute_mdlm_steps": equal_compute, "arms": arms, "comparisons": comparisons,
            "prompt_memory_effect": memory_effect}


# ----- output -------------------------------------------------------------------------------------------------
def cell(value: dict) -> str:
    """'mean [low, high]' of an interval stored in results.json."""
    return str(Interval(value["mean"], value["low"], value["high"], value["n"]))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(record: dict) -> str:
    """results.md: the environment, the rule, the tables and every verdict."""
    summary, seeds, by_arm = record["summary"], len(record["seeds"]), runs_by_arm(record["runs"])
    measures = list(next(iter(summary["arms"].values())))
    costs = record["calibration"]["cost_interval"]
    arms_table = markdown_table(["arm", "step cost vs MDLM (95% t interval)", *measures], [
        [arm, "1 (reference)" if costs[arm] is None else cell(costs[arm]), *(cell(row[m]) for m in measures)]
        for arm, row in summary["arms"].items()])
    comparison_rows = [[arm, name, cell(value), value["verdict"]]
                       for arm, rows in summary["comparisons"].items() for name, value in rows.items()]
    comparison_table = markdown_table(["arm", "measure", "arm - MDLM, paired by seed", "verdict"], comparison_rows)
    memory_table = markdown_table(["arm", "test loss, prompt memory - memory off", "verdict",
                                   "rates chosen (per seed)"],
                                  [[arm, cell(value), value["verdict"], " ".join(
                                      f"{r['adapt_lr']:g}" for r in by_arm[arm])]
                                   for arm, value in summary["prompt_memory_effect"].items()])
    ruler = record["ruler"]
    ruler_rows = []
    for arm, modes in ruler.items():
        for mode, tasks in modes.items():
            if not isinstance(tasks, dict):
                ruler_rows.append([arm, "-", mode, tasks])
                continue
            for task, value in tasks.items():
                stderr = value.get("stderr")
                text = (f"{value['score']:.2f} ± {stderr if isinstance(stderr, str) else f'{stderr:.2f}'} "
                        f"({value['examples']} examples)" if "score" in value else f"not run: {value['not run']}")
                ruler_rows.append([arm, task, mode, text])
    env = record["environment"]
    return "\n\n".join([
        f"Budget `{record['budget']}`: {seeds} seeds, {record['budget_settings']['steps']} fine-tuning steps from one "
        f"base model pretrained {record['budget_settings']['pretrain_steps']} steps (shared by every seed); "
        f"torch {env['torch']} ({env['build']}), {env['cpu']}, {env['workers']} workers x 1 thread; "
        f"{record['seconds']:.0f} s.",
        "The base before fine-tuning (memory off, seed 0 decoding): " + ", ".join(
            f"{task} {metric.replace('_', ' ')} {record['base_scores'][task][metric]:.2f}"
            for task, metric in METRIC.items()) + ".",
        f"Rule: {record['rule']}.",
        f"Equal compute: {summary['equal_compute_mdlm_steps']:.1f} MDLM mean steps' worth (a run's compute at a step: "
        "the calibrated cost of each step it took, by that step's task)." + "".join(
            f" {r['arm']} seed {r['seed']}: {len(r['nonfinite_steps'])} non-finite and {r['skipped_batches']} skipped "
            "batches, not counted in its compute."
            for r in record["runs"] if r["nonfinite_steps"] or r["skipped_batches"]),
        arms_table, comparison_table, memory_table,
        markdown_table(["arm (seed 0 checkpoint)", "lm-eval task", "memory", "score (lm-eval stderr)"], ruler_rows)])


def interval_band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and 95% t interval at each point of equally long curves (one per seed)."""
    points = [mean_interval(values) for values in zip(*curves)]
    return [p.mean for p in points], [p.low for p in points], [p.high for p in points]


def headline(comparisons: dict, measure: str) -> str:
    """A title that states the finding: the arms grouped by their verdict on ``measure``."""
    groups: dict[str, list[str]] = {}
    for arm, rows in comparisons.items():
        groups.setdefault(rows[measure]["verdict"], []).append(arm)
    return "; ".join(f"{found} than MDLM: {', '.join(arms)}" if found != "no difference detected"
                     else f"no difference from MDLM detected: {', '.join(arms)}" for found, arms in groups.items())


def plot(output: Path, record: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, by_arm = record["summary"], runs_by_arm(record["runs"])
    seeds, cost, paths = len(record["seeds"]), record["calibration"]["cost"], []
    band = f"line: mean over {seeds} seeds; band: 95% t interval"
    for axis, measure in (("steps", "final eval loss"), ("compute", "eval loss at equal compute")):
        fig, ax = plt.subplots(figsize=(8, 4.6))
        for arm, runs in by_arm.items():
            x = runs[0]["eval_steps"] if axis == "steps" else numpy.mean(
                [compute_positions(r, record["calibration"]["task_cost"]) for r in runs], axis=0)
            mean, low, high = interval_band([r["eval_loss"] for r in runs])
            ax.plot(x, mean, label=f"{arm} (step cost {cost[arm]:.2f})" if axis == "compute" else arm)
            ax.fill_between(x, low, high, alpha=0.2)
        if axis == "compute":
            ax.axvline(summary["equal_compute_mdlm_steps"], color="grey", ls=":", lw=1)
        ax.set(xlabel="fine-tuning step" if axis == "steps" else
               "compute (MDLM mean steps, calibrated by interleaved timing; mean over seeds)",
               ylabel="held-out eval loss, memory off",
               title=f"At equal {axis}: " + headline(summary["comparisons"], measure))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, title=band, title_fontsize=8)
        paths.append(output / f"eval_loss_vs_{axis}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 4.8))
    for ax, task in zip(axes, TASKS):
        for i, arm in enumerate(by_arm):
            for j, mode in enumerate(("off", "prompt")):
                value = summary["arms"][arm][decoding_measure(task, mode)]
                ax.bar(i + 0.4 * j, value["mean"], 0.38, color=f"C{i}", alpha=1.0 if mode == "off" else 0.45,
                       yerr=[[value["mean"] - value["low"]], [value["high"] - value["mean"]]], capsize=3,
                       label=f"memory {mode}" if i == 0 else None)
        if CHANCE[task]:
            ax.axhline(CHANCE[task], color="grey", ls="--", lw=1, label="chance")
        ax.axhline(record["base_scores"][task][METRIC[task]], color="black", ls=":", lw=1,
                   label="the base, before fine-tuning")
        ax.set_xticks([i + 0.2 for i in range(len(by_arm))], list(by_arm), rotation=25, fontsize=7, ha="right")
        off = decoding_measure(task, "off")
        learnt = [arm for arm in by_arm if summary["arms"][arm][off]["low"] > CHANCE[task]]
        verdicts = {rows[off]["verdict"] for rows in summary["comparisons"].values()}
        finding = (f"above chance: {', '.join(learnt)}" if learnt else "no arm above chance") + (
            "; no arm differs from MDLM" if verdicts == {"no difference detected"} else "; arms differ (see table)")
        ax.set(ylim=(0, 1.05), ylabel=METRIC[task].replace("_", " "), title=textwrap.fill(f"{task}: {finding}", 48))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Decoding accuracy on held-out examples (bars: mean over {seeds} seeds; whiskers: 95% t interval)",
                 fontsize=9, y=1.04)
    paths.append(output / "accuracy.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(8, 4.6))
    for arm, runs in by_arm.items():
        mean, low, high = interval_band([[r["adapt_sweep"][str(lr)] for lr in ADAPT_LRS] for r in runs])
        ax.plot(ADAPT_LRS, mean, marker="o", label=arm)
        ax.fill_between(ADAPT_LRS, low, high, alpha=0.2)
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_yscale("symlog", linthresh=0.01)  # linear within +-0.01, where a small gain would show; log beyond
    ax.set(xscale="log", xlabel="adaptation learning rate at inference",
           ylabel="validation eval loss: prompt memory - memory off\n(below 0: memory helps; symlog scale)",
           title=textwrap.fill("Prompt memory at the rate chosen on validation: " + "; ".join(
               f"{arm}: {v['verdict'].replace('better', 'helps').replace('worse', 'hurts')}"
               for arm, v in summary["prompt_memory_effect"].items()), 110))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8, title=band, title_fontsize=8)
    paths.append(output / "adaptation.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def environment(workers: int) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"torch": torch.__version__, "build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
            "cpu": cpu, "cores": os.cpu_count(), "workers": workers, "threads_per_worker": 1,
            "platform": platform.platform(), "python": platform.python_version()}


def run_all(base: Path, arms: tuple[str, ...], args: argparse.Namespace, budget: Budget, output: Path,
            workers: int) -> list[dict]:
    """Every (arm, seed) fine-tuning run, on ``workers`` processes of one thread; one progress bar."""
    checkpoints = output / "checkpoints"
    calls = [(arm, seed, base, args, budget, checkpoints if seed == 0 else None)
             for seed in range(budget.seeds) for arm in arms]
    with ExitStack() as stack:
        if workers == 1:
            finished = (run_arm(*call) for call in calls)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=get_context("spawn")))
            finished = (future.result() for future in as_completed([pool.submit(run_arm, *call) for call in calls]))
        return list(tqdm(finished, total=len(calls), desc="fine-tuning runs", disable=args.no_progress))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    arms = ARM_SETS[args.arms]
    started = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    if args.workers > cores:
        raise SystemExit(f"--workers {args.workers} is more than the {cores} cores: worker processes run one thread "
                         "each and must not share a core (their timings are kept); use --workers <= the cores")
    workers = max(1, min(args.workers or cores, budget.seeds * len(arms)))
    print(f"{args.budget} budget: base {budget.pretrain_steps} steps, then {len(arms)} arms x {budget.seeds} seeds x "
          f"{budget.steps} steps on {workers} worker(s) of one thread", flush=True)
    phases = {}
    clock = time.time()
    quiet()
    base = pretrained_base(output, args, budget, progress=not args.no_progress)
    phases["base"], clock = time.time() - clock, time.time()
    before = base_scores(base, budget)
    phases["base evaluation"], clock = time.time() - clock, time.time()
    calibration = calibrate(base, arms, args, budget)
    phases["calibration"], clock = time.time() - clock, time.time()
    results = sorted(run_all(base, arms, args, budget, output, workers),
                     key=lambda r: (arms.index(r["arm"]), r["seed"]))
    phases["fine-tuning"], clock = time.time() - clock, time.time()
    (output / "runs.json").write_text(json.dumps({"calibration": calibration, "runs": results}, indent=1))
    by_arm = runs_by_arm(results)
    ruler = {} if args.no_ruler else {
        arm: ruler_scores(output / next(r for r in runs if r["seed"] == 0)["checkpoint"], budget.ruler_examples,
                          output / "ruler_logs")
        for arm, runs in tqdm(by_arm.items(), desc="lm-eval RULER", disable=args.no_progress)}
    phases["ruler"] = time.time() - clock
    record = {"budget": args.budget, "budget_settings": asdict(budget), "arguments": vars(args),
              "arms": {arm: asdict(ARMS[arm]) for arm in arms}, "tasks": list(TASKS), "chance": CHANCE,
              "adaptation_rates": list(ADAPT_LRS), "seeds": list(range(budget.seeds)), "rule": RULE,
              "environment": environment(workers), "base": str(base), "base_scores": before, "calibration": calibration,
              "runs": results, "ruler": ruler,
              "phase_seconds": phases}
    record["summary"] = summarise(record["runs"], calibration)
    record["seconds"] = time.time() - started
    (output / "results.json").write_text(json.dumps(record, indent=1))
    text = report(record)
    (output / "results.md").write_text(text + "\n")
    plots = plot(output, record)
    print(text)
    print(f"wrote {output / 'results.json'}, {output / 'results.md'}, " + ", ".join(str(p) for p in plots))
    return record


if __name__ == "__main__":
    main()
