"""The main job: does memory-aware training help a diffusion LM recall, at equal steps and at equal time?

Offline, on CPU, from scratch. A tiny LLaDA learns two short recall tasks (bilevel_dlm.tasks.recall):
retrieval by position (copy the values of a key-value list in order) and retrieval by content
(multi-query associative recall: the value of each queried key). Four arms start from the same initial
weights and see the same data order, for every seed:

- MDLM: plain masked diffusion training (0 inner steps);
- MDLM (2x lr): the same with twice the learning rate, a control for "MemDLM only trains faster";
- MemDLM (last block): the paper's preset (anchor-consistent trajectory, 2 inner SGD steps), fast weights
  on the FFN of the last block (the last-10% rule on 2 blocks);
- MemDLM (all blocks): fast weights on every block's FFN.

Reported per arm, as mean and [min, max] over the seeds: the memory-off eval loss on held-out data
(curves against steps and against training time; the time per step is part of the result), exact-match
and token accuracy of the real decoding path (LLaDA's sampler), and prompt-memory eval loss and accuracy
with the adaptation learning rate chosen on a validation split (the sweep is reported). The training loss
(measured after adapting on the same batch) is never used as evidence. Writes results.json, results.csv
and four PNGs to --output.

    python examples/memdlm_llada.py                    # the default budget: 3 seeds, 331 s measured on 2 cores
    python examples/memdlm_llada.py --budget quick     # a smoke run (CI)
    python examples/memdlm_llada.py --budget long      # 10x the steps, harder recall (sized for ~1 hour; not run)
    python examples/memdlm_llada.py --arms meta-init   # fresh fast weights against a meta-learned phi_0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from bilevel_dlm import AdaptConfig, InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.evaluation import task_accuracy
from bilevel_dlm.integrations import TINY_FAMILIES, tiny_model
from bilevel_dlm.tasks import encode_example, token_accuracy
from bilevel_dlm.tasks.recall import make_recall_dataset, recall_tokenizer


@dataclass(frozen=True)
class Budget:
    seeds: int
    steps: int
    eval_every: int
    train_examples: int
    eval_examples: int
    position_pairs: int
    mqar_pairs: int
    mqar_queries: int


BUDGETS = {
    "quick": Budget(seeds=2, steps=8, eval_every=4, train_examples=64, eval_examples=8, position_pairs=4,
                    mqar_pairs=2, mqar_queries=2),
    "default": Budget(seeds=3, steps=400, eval_every=50, train_examples=4096, eval_examples=128, position_pairs=6,
                      mqar_pairs=2, mqar_queries=2),
    "long": Budget(seeds=3, steps=4000, eval_every=250, train_examples=32768, eval_examples=256, position_pairs=8,
                   mqar_pairs=4, mqar_queries=4),
}
ARMS = {  # name: (inner steps, lr factor, fraction of blocks with fast weights, meta_init, meta-lr factor)
    "MDLM": (0, 1.0, 0.1, "none", 1.0),
    "MDLM (2x lr)": (0, 2.0, 0.1, "none", 1.0),
    "MemDLM (last block)": (2, 1.0, 0.1, "none", 1.0),
    "MemDLM (all blocks)": (2, 1.0, 1.0, "none", 1.0),
    "MemDLM (FOMAML init)": (2, 1.0, 0.1, "fomaml", 1.0),
    "MemDLM (FOMAML init, meta lr / 20)": (2, 1.0, 0.1, "fomaml", 0.05),
    "MemDLM (Reptile init)": (2, 1.0, 0.1, "reptile", 1.0),
}
ARM_SETS = {  # --arms: the arms a run trains (MDLM, the reference of every comparison, is in each)
    "default": ("MDLM", "MDLM (2x lr)", "MemDLM (last block)", "MemDLM (all blocks)"),
    "meta-init": ("MDLM", "MemDLM (last block)", "MemDLM (FOMAML init)", "MemDLM (FOMAML init, meta lr / 20)",
                  "MemDLM (Reptile init)"),
}
ADAPT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)  # 0.1 is the preset's inner rate
TASK_NAMES = ("position", "mqar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--arms", choices=sorted(ARM_SETS), default="default",
                        help="'meta-init': the preset's fresh fast weights against a meta-learned phi_0 (FOMAML, Reptile)")
    parser.add_argument("--output", default="outputs/memdlm_llada", help="folder for the table, plots and JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", choices=TINY_FAMILIES, default="llada", help="family of the tiny model")
    parser.add_argument("--lr", type=float, default=2e-3, help="outer learning rate of the MDLM / MemDLM arms")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0,
                        help="processes running seeds side by side (0: one per CPU core, up to the seeds)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


# ----- data ---------------------------------------------------------------------------------------------
def rows_of(tokenizer, examples) -> list[dict]:
    """<bos> prompt answer <eos>: the response (answer + EOS) is supervised."""
    rows = []
    for example in examples:
        length = 2 + sum(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                         for text in (example.prompt, example.answer))
        rows.append(encode_example(tokenizer, example.prompt, example.answer, length))
    return rows


def datasets(budget: Budget) -> dict[str, dict[str, list]]:
    """split -> task -> examples; train, validation (adaptation rate) and test are disjoint seeds."""
    sizes = {"train": budget.train_examples // 2, "validation": budget.eval_examples, "test": budget.eval_examples}
    pairs = {"position": (budget.position_pairs, 1), "mqar": (budget.mqar_pairs, budget.mqar_queries)}
    return {split: {task: make_recall_dataset(task, n, seed, n_pairs=pairs[task][0], n_queries=pairs[task][1])
                    for task in TASK_NAMES}
            for seed, (split, n) in enumerate(sizes.items())}


# ----- one arm, one seed ---------------------------------------------------------------------------------
def recipe(arm: str, args: argparse.Namespace, seed: int, adapt_lr: float | None = None) -> MemDLMConfig:
    inner_steps, lr_factor, fraction, meta_init, meta_lr_factor = ARMS[arm]
    lr = args.lr * lr_factor
    return MemDLMConfig(inner=InnerConfig(steps=inner_steps, meta_init=meta_init),
                        memory=MemoryConfig(layer_fraction=fraction),
                        outer=OuterConfig(lr=lr, meta_lr=lr * meta_lr_factor, warmup_ratio=0.05),
                        adapt=AdaptConfig(lr=adapt_lr), seed=seed)


def accuracies(wrapper: MemoryWrapper, tokenizer, examples: dict[str, list], adapt: bool, seed: int) -> dict:
    """Exact match and token accuracy per task, by generation with the backbone's sampler."""
    scores = {}
    for task, items in examples.items():
        answer_tokens = len(tokenizer(items[0].answer, add_special_tokens=False)["input_ids"])
        exact, predictions = task_accuracy(wrapper, tokenizer, items, max_new_tokens=answer_tokens + 1, adapt=adapt,
                                           batch_size=64, seed=seed)
        scores[task] = {"exact_match": exact, "token_accuracy": statistics.fmean(
            token_accuracy(p, e.answer) for p, e in zip(predictions, items))}
    return scores


def run_arm(arm: str, seed: int, args: argparse.Namespace, budget: Budget) -> dict:
    """Train one arm from the seed's initial weights; evaluate it as the module docstring says."""
    torch.set_num_threads(1)
    tokenizer = recall_tokenizer()
    data = datasets(budget)
    rows = {split: {task: rows_of(tokenizer, items) for task, items in tasks.items()} for split, tasks in data.items()}
    torch.manual_seed(seed)
    model = tiny_model(args.backbone, tokenizer, width=args.d_model, layers=args.layers).to(args.device)
    wrapper = MemoryWrapper(model, recipe(arm, args, seed), tokenizer=tokenizer)
    test_rows = [row for task in TASK_NAMES for row in rows["test"][task]]
    initial = wrapper.eval_loss(test_rows, batch_size=64)
    history = wrapper.fit([row for task in TASK_NAMES for row in rows["train"][task]], eval_data=test_rows,
                          eval_every=budget.eval_every, eval_prompt_memory=False, max_steps=budget.steps,
                          batch_size=args.batch_size, progress=not args.no_progress)
    elapsed = [0.0] + [sum(history.step_seconds[:step]) for step in history.eval_steps]
    result = {"arm": arm, "seed": seed, "eval_steps": [0, *history.eval_steps], "eval_seconds": elapsed,
              "eval_loss": [initial, *history.eval_loss], "step_seconds": statistics.median(history.step_seconds),
              "loss_off": {task: wrapper.eval_loss(rows["test"][task], batch_size=64) for task in TASK_NAMES},
              "accuracy_off": accuracies(wrapper, tokenizer, data["test"], adapt=False, seed=seed)}
    # The adaptation rate is chosen on the validation split; memory off competes too (rate 0). The sweep's
    # wrappers share the trained inner method (a meta-learned phi_0 is where adaptation starts).
    sweep = {"0": wrapper.eval_loss([r for t in TASK_NAMES for r in rows["validation"][t]], batch_size=64)}
    for lr in ADAPT_LRS:
        adapted = MemoryWrapper(model, recipe(arm, args, seed, adapt_lr=lr), tokenizer=tokenizer, inner=wrapper.inner)
        sweep[str(lr)] = adapted.eval_loss([r for t in TASK_NAMES for r in rows["validation"][t]], memory="prompt",
                                           batch_size=64)
    chosen = min(sweep, key=sweep.get)
    result["adapt_sweep"], result["adapt_choice"], result["adapt_lr"] = sweep, chosen, float(chosen)
    if chosen == "0":
        result["loss_prompt"], result["accuracy_prompt"] = result["loss_off"], result["accuracy_off"]
    else:
        adapted = MemoryWrapper(model, recipe(arm, args, seed, adapt_lr=float(chosen)), tokenizer=tokenizer,
                                inner=wrapper.inner)
        result["loss_prompt"] = {task: adapted.eval_loss(rows["test"][task], memory="prompt", batch_size=64)
                                 for task in TASK_NAMES}
        result["accuracy_prompt"] = accuracies(adapted, tokenizer, data["test"], adapt=True, seed=seed)
    return result


def run_seed(seed: int, args: argparse.Namespace, budget: Budget) -> list[dict]:
    return [run_arm(arm, seed, args, budget) for arm in ARM_SETS[args.arms]]


# ----- aggregation -------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Linear interpolation of a curve at x (clamped to its ends)."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def compare(name: str, value: dict, reference: dict, lower_is_better: bool = True) -> str:
    """A claim only when the seed ranges do not overlap; otherwise 'no difference'."""
    better = value["max"] < reference["min"] if lower_is_better else value["min"] > reference["max"]
    worse = value["min"] > reference["max"] if lower_is_better else value["max"] < reference["min"]
    if better:
        return f"{name} is better than MDLM (no overlap over the seeds)"
    if worse:
        return f"{name} is worse than MDLM (no overlap over the seeds)"
    return f"{name}: no difference from MDLM beyond the seed spread"


def runs_by_arm(results: list[dict]) -> dict[str, list[dict]]:
    """arm -> its runs, in the order the arms ran."""
    return {arm: [r for r in results if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in results)}


def summarise(results: list[dict]) -> dict:
    by_arm = runs_by_arm(results)
    equal_time = min(max(r["eval_seconds"]) for r in results)  # the time every arm's runs reached
    base_step = statistics.fmean(r["step_seconds"] for r in by_arm["MDLM"])
    summary = {}
    for arm, runs in by_arm.items():
        row = {
            "final_eval_loss": spread([r["eval_loss"][-1] for r in runs]),
            "eval_loss_at_equal_time": spread([interpolate(r["eval_seconds"], r["eval_loss"], equal_time) for r in runs]),
            "step_cost_vs_mdlm": statistics.fmean(r["step_seconds"] for r in runs) / base_step,
            "adapt_lr_chosen": [r["adapt_lr"] for r in runs],
        }
        for task in TASK_NAMES:
            for mode in ("off", "prompt"):
                row[f"{task}_loss_{mode}"] = spread([r[f"loss_{mode}"][task] for r in runs])
                for metric in ("exact_match", "token_accuracy"):
                    row[f"{task}_{metric}_{mode}"] = spread([r[f"accuracy_{mode}"][task][metric] for r in runs])
        summary[arm] = row
    mdlm = summary["MDLM"]
    claims = {"equal_time_seconds": equal_time}
    for arm, row in summary.items():
        if arm == "MDLM":
            continue
        claims[arm] = {
            "equal_steps": compare(arm, row["final_eval_loss"], mdlm["final_eval_loss"]),
            "equal_time": compare(arm, row["eval_loss_at_equal_time"], mdlm["eval_loss_at_equal_time"]),
        }
    for arm, row in summary.items():
        claims.setdefault("prompt_memory", {})[arm] = adaptation_effect(by_arm[arm])
    return {"arms": summary, "claims": claims}


def adaptation_effect(runs: list[dict]) -> str:
    """Whether prompt memory (at the rate chosen on validation) changes the test loss beyond the seed spread."""
    off = [statistics.fmean(r["loss_off"].values()) for r in runs]
    prompt = [statistics.fmean(r["loss_prompt"].values()) for r in runs]
    gaps = [p - o for p, o in zip(prompt, off)]
    mean, width = statistics.fmean(gaps), max(gaps) - min(gaps)
    if abs(mean) <= width or not (all(g < 0 for g in gaps) or all(g > 0 for g in gaps)):
        return f"does nothing measurable (test loss {mean:+.4f}, within the spread between seeds {width:.4f})"
    verdict = "helps" if mean < 0 else "hurts"
    return f"{verdict} (test loss {mean:+.4f} with memory, every seed alike, spread {width:.4f})"


# ----- output ---------------------------------------------------------------------------------------------
def cell(value: dict) -> str:
    return f"{value['mean']:.3f} [{value['min']:.3f}, {value['max']:.3f}]"


TABLE_COLUMNS = (
    ("eval loss, memory off (final)", "final_eval_loss"),
    ("eval loss at equal time", "eval_loss_at_equal_time"),
    ("position exact match", "position_exact_match_off"),
    ("position token acc.", "position_token_accuracy_off"),
    ("mqar token acc.", "mqar_token_accuracy_off"),
    ("position exact, prompt memory", "position_exact_match_prompt"),
    ("mqar token acc., prompt memory", "mqar_token_accuracy_prompt"),
)


def write_table(output: Path, summary: dict) -> str:
    header = ["arm", *(title for title, _ in TABLE_COLUMNS), "step cost vs MDLM", "adaptation lr (per seed)"]
    rows = [[arm, *(cell(row[key]) for _, key in TABLE_COLUMNS), f"{row['step_cost_vs_mdlm']:.2f}",
             " ".join(f"{lr:g}" for lr in row["adapt_lr_chosen"])] for arm, row in summary["arms"].items()]
    with open(output / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def headline(claims: dict, key: str, prefix: str) -> str:
    """A title that states the finding: the arms grouped by their verdict against MDLM."""
    groups: dict[str, list[str]] = {"better": [], "no different": [], "worse": []}
    for arm, claim in claims.items():
        if arm in ARMS and isinstance(claim, dict):
            verdict = "better" if "is better" in claim[key] else "worse" if "is worse" in claim[key] else "no different"
            groups[verdict].append(arm)
    parts = [f"{verdict} than MDLM: {', '.join(arms)}" for verdict, arms in groups.items() if arms]
    return f"{prefix}, " + ";\n".join(parts)


def plot(output: Path, results: list[dict], summary: dict, budget: Budget) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims, paths = summary["claims"], []
    by_arm = runs_by_arm(results)
    for axis, key, label in (("steps", "eval_steps", "training step"), ("time", "eval_seconds", "training time (s)")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for arm, runs in by_arm.items():
            grid = runs[0]["eval_steps"] if axis == "steps" else [
                claims["equal_time_seconds"] * i / 20 for i in range(1, 21)]
            curves = [[interpolate(r[key], r["eval_loss"], x) for x in grid] for r in runs]
            mean = [statistics.fmean(c) for c in zip(*curves)]
            ax.plot(grid, mean, label=arm)
            ax.fill_between(grid, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)], alpha=0.2)
        ax.set(xlabel=label, ylabel="held-out eval loss, memory off\n(ELBO-weighted CE per response token)",
               title=headline(claims, f"equal_{axis}", f"At equal {axis}"))
        ax.legend(fontsize=8, title=f"{len(by_arm['MDLM'])} seeds, band = min-max", title_fontsize=8)
        paths.append(output / f"eval_loss_vs_{axis}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (task, metric, chance) in zip(axes, (("position", "exact_match", None),
                                                 ("mqar", "token_accuracy", 1 / budget.mqar_pairs))):
        for i, arm in enumerate(by_arm):
            for j, mode in enumerate(("off", "prompt")):
                value = summary["arms"][arm][f"{task}_{metric}_{mode}"]
                ax.bar(i + 0.4 * j, value["mean"], 0.38, color=f"C{i}", alpha=1.0 if mode == "off" else 0.5,
                       yerr=[[value["mean"] - value["min"]], [value["max"] - value["mean"]]], capsize=3,
                       label=f"memory {mode}" if i == 0 else None)
        if chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1, label="chance (pick one of the pairs' values)")
        ax.set_xticks([i + 0.2 for i in range(len(by_arm))], list(by_arm), rotation=15, fontsize=8)
        ax.set(ylim=(0, 1), ylabel=metric.replace("_", " "), title=f"{task}: {metric.replace('_', ' ')} by decoding")
        ax.legend(fontsize=8)
    paths.append(output / "accuracy.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, runs in by_arm.items():
        off = statistics.fmean(r["adapt_sweep"]["0"] for r in runs)
        means = [statistics.fmean(r["adapt_sweep"][str(lr)] for r in runs) for lr in ADAPT_LRS]
        line = ax.plot(ADAPT_LRS, means, marker="o", label=arm)[0]
        ax.axhline(off, color=line.get_color(), ls=":", lw=1)
    ax.set(xscale="log", xlabel="adaptation learning rate (dotted: memory off)",
           ylabel="validation eval loss with prompt memory", title="Inference-time adaptation sweep (validation split)")
    ax.legend(fontsize=8)
    paths.append(output / "adaptation_sweep.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    started = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    seeds = list(range(budget.seeds))
    workers = min(len(seeds), args.workers or os.cpu_count() or 1)
    print(f"{args.budget} budget: {len(ARM_SETS[args.arms])} arms x {len(seeds)} seeds x {budget.steps} steps, {workers} worker(s)")
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = [r for seed_results in pool.map(run_seed, seeds, [args] * len(seeds), [budget] * len(seeds))
                       for r in seed_results]
    else:
        results = [r for seed in seeds for r in run_seed(seed, args, budget)]
    summary = summarise(results)
    table = write_table(output, summary)
    plots = plot(output, results, summary, budget)
    record = {"budget": args.budget, "budget_settings": asdict(budget),
              "arguments": vars(args), "arms": {arm: list(ARMS[arm]) for arm in ARM_SETS[args.arms]},
              "adaptation_rates": list(ADAPT_LRS), "seeds": seeds, "runs": results, **summary,
              "machine": {"cpus": os.cpu_count(), "torch_threads_per_worker": 1, "workers": workers,
                          "platform": platform.platform(), "torch": torch.__version__},
              "seconds": time.time() - started}
    (output / "results.json").write_text(json.dumps(record, indent=1))
    print(table)
    for arm, claim in summary["claims"].items():
        print(f"{arm}: {claim}")
    print(f"wrote {output / 'results.json'}, {output / 'results.csv'}, " + ", ".join(str(p) for p in plots))
    print(f"total time {record['seconds']:.0f} s")
    return record


if __name__ == "__main__":
    main()
