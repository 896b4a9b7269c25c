"""The main job: does memory-aware training (and inference-time memory) help a diffusion LM retrieve
from long contexts? Offline, on CPU by default, in about 10 minutes on 2 cores.

1. Build the synthetic long-context suite (multi-value needle, variable tracking, common words, bAbI-style
   fact tracking) and a word-level tokenizer, locally.
2. Build a tiny LLaDA and pre-train it briefly with plain MDLM on whole sequences.
3. Fine-tune two copies from the same weights and seed for the same number of steps on the answers:
   standard MDLM, and MemDLM (the paper's preset: anchor-consistent trajectory, 2 inner SGD steps).
4. Evaluate MDLM, MemDLM (train only) and MemDLM + inference-time prompt memory on every task at two
   context lengths (exact match by generation), eval loss with memory off / on the prompt, and the
   exposure-bias ratio R_EB per denoising step with both commit orders.
5. Print the results table and write results.json, results.csv and PNG plots into --output.

    python examples/memdlm_llada.py                              # the default run
    python examples/memdlm_llada.py --pretrain-steps 20 --finetune-steps 10 --eval-examples 4   # smoke run
    python examples/memdlm_llada.py --model path/to/LLaDA-8B-Instruct --device cuda   # a released checkpoint
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.evaluation import task_accuracy
from bilevel_dlm.metrics import exposure_bias
from bilevel_dlm.tasks import TASKS, build_tokenizer, encode_example, make_dataset

VARIANTS = ("MDLM", "MemDLM (train)", "MemDLM (train + inference)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/memdlm_llada", help="folder for the table, plots and tokenizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--context-lengths", type=int, nargs=2, default=[96, 160], metavar=("SHORT", "LONG"))
    parser.add_argument("--train-examples", type=int, default=96, help="training examples per task and length")
    parser.add_argument("--eval-examples", type=int, default=16, help="eval examples per task and length")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="outer learning rate (tiny model from scratch)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=20, help="generation budget (answer + EOS)")
    parser.add_argument("--reb-steps", type=int, default=8, help="commit steps of the exposure-bias curve")
    parser.add_argument("--model", help="start from a released checkpoint folder instead of the tiny default")
    parser.add_argument("--backbone", choices=["llada", "dream", "llada_moe", "mdlm"],
                        help="family of the tiny model (default llada), or the adapter for --model (detected by default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, tokenizer):
    """A tiny model of ``--backbone`` (LLaDA by default) sized to the tokenizer, or a released checkpoint
    with its own tokenizer."""
    if args.model:
        from transformers import AutoModel, AutoTokenizer

        import bilevel_dlm.integrations  # noqa: F401  (registers the native model classes)

        return AutoModel.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    from bilevel_dlm.integrations import tiny_model

    torch.manual_seed(args.seed)
    return tiny_model(args.backbone or "llada", tokenizer, width=args.d_model, layers=args.layers), tokenizer


def training_rows(tokenizer, examples, answer_tokens: int, whole_sequence: bool) -> list[dict]:
    """Rows shaped like generation: <bos> prompt, then the answer padded with EOS to ``answer_tokens``.

    ``whole_sequence`` supervises every token (pre-training); otherwise only the response (fine-tuning).
    """
    rows = []
    for example in examples:
        n_prompt = len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
        row = encode_example(tokenizer, example.prompt, example.answer, 1 + n_prompt + answer_tokens)
        if whole_sequence:
            row["labels"] = row["input_ids"].clone()
        rows.append(row)
    return rows


def recipe(args: argparse.Namespace, inner_steps: int) -> MemDLMConfig:
    """MemDLM's preset (or plain MDLM with 0 inner steps); a higher outer lr for a model this small.

    layer_fraction 0.25 is MemDLM's last-10% rule on 4 blocks (int(4 * 0.9) = 3: the last block).
    """
    return MemDLMConfig(inner=InnerConfig(steps=inner_steps), memory=MemoryConfig(layer_fraction=0.25),
                        outer=OuterConfig(lr=args.lr), seed=args.seed)


def evaluate(args, wrapper: MemoryWrapper, tokenizer, eval_sets, adapt: bool) -> tuple[dict[str, float], dict]:
    """Exact match per task @ length (and the mean), plus the first predictions of each for inspection."""
    scores, samples = {}, {}
    for (task, length), examples in eval_sets.items():
        accuracy, predictions = task_accuracy(wrapper, tokenizer, examples, max_new_tokens=args.answer_tokens,
                                              adapt=adapt, batch_size=args.batch_size, seed=args.seed)
        scores[f"{task}@{length}"] = accuracy
        samples[f"{task}@{length}"] = [{"answer": e.answer, "prediction": p} for e, p in zip(examples[:3], predictions)]
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores, samples


def exposure_curves(args, wrapper: MemoryWrapper, rows: list[dict]) -> dict[str, dict]:
    from bilevel_dlm.data import pad_collate

    batch = wrapper.prepare(pad_collate(rows, wrapper.pad_token_id()))
    curves = {}
    wrapper.model.eval()
    for order in ("confidence", "random"):
        curve = exposure_bias(wrapper.view, batch.x0, batch.maskable, batch.attention_mask, steps=args.reb_steps,
                              order=order, generator=torch.Generator(wrapper.device).manual_seed(args.seed))
        curves[order] = {"mask_ratio": curve.mask_ratio, "ratio": curve.ratio,
                         "seq_loss": curve.seq_loss, "static_loss": curve.static_loss}
    return curves


def plot(output: Path, histories: dict, curves: dict, accuracy: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        losses = torch.tensor(history["outer_loss"])
        window = max(1, len(losses) // 20)
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        ax.plot(range(window, window + len(smooth)), smooth, label=name)
    ax.set(xlabel="step", ylabel="outer MDLM loss (moving average)", title="training loss", yscale="log")
    ax.legend()
    paths.append(output / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, order in zip(axes, ("confidence", "random")):
        for name, by_order in curves.items():
            c = by_order[order]
            ax.plot(c["mask_ratio"], c["ratio"], marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="remaining mask ratio", title=f"R_EB, {order}-first commits")
        ax.invert_xaxis()
    axes[0].set_ylabel("L_seq / L_static")
    axes[0].legend()
    paths.append(output / "exposure_bias.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(10, 4))
    columns = [c for c in next(iter(accuracy.values())) if c != "mean"] + ["mean"]
    width = 0.8 / len(accuracy)
    for i, (name, scores) in enumerate(accuracy.items()):
        ax.bar([j + i * width for j in range(len(columns))], [scores[c] for c in columns], width, label=name)
    ax.set_xticks([j + width * (len(accuracy) - 1) / 2 for j in range(len(columns))], columns, rotation=30)
    ax.set(ylabel="exact match", ylim=(0, 1), title="accuracy by task @ context length")
    ax.legend()
    paths.append(output / "accuracy.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def write_table(output: Path, accuracy: dict, losses: dict) -> str:
    columns = list(next(iter(accuracy.values())))
    header = ["variant", *columns, "eval loss (memory off)", "eval loss (prompt memory)"]
    rows = [[name, *[f"{scores[c]:.3f}" for c in columns], f"{losses[name]['off']:.3f}", f"{losses[name]['prompt']:.3f}"]
            for name, scores in accuracy.items()]
    with open(output / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model, tokenizer = build_model(args, tokenizer)
    model.to(args.device)
    tokenizer.save_pretrained(output / "tokenizer")
    progress = not args.no_progress

    train = [e for t in args.tasks for n in args.context_lengths
             for e in make_dataset(t, args.train_examples, n, args.seed)]
    eval_sets = {(t, n): make_dataset(t, args.eval_examples, n, args.seed + 1000)
                 for t in args.tasks for n in args.context_lengths}
    eval_examples = [e for examples in eval_sets.values() for e in examples]
    eval_rows = training_rows(tokenizer, eval_examples, args.answer_tokens, whole_sequence=False)

    print(f"pre-training with plain MDLM for {args.pretrain_steps} steps on {len(train)} sequences")
    pretrain = MemoryWrapper(model, recipe(args, inner_steps=0), tokenizer=tokenizer, backbone=args.backbone)
    histories = {"pre-training (MDLM)": asdict(pretrain.fit(
        training_rows(tokenizer, train, args.answer_tokens, whole_sequence=True),
        max_steps=args.pretrain_steps, batch_size=args.batch_size, progress=progress))}

    finetune_rows = training_rows(tokenizer, train, args.answer_tokens, whole_sequence=False)
    wrappers = {}
    for name, inner_steps in (("MDLM", 0), ("MemDLM", 2)):
        print(f"fine-tuning {name} for {args.finetune_steps} steps")
        wrapper = MemoryWrapper(copy.deepcopy(model), recipe(args, inner_steps), tokenizer=tokenizer,
                                backbone=args.backbone)
        history = wrapper.fit(finetune_rows, eval_data=eval_rows, max_steps=args.finetune_steps,
                              batch_size=args.batch_size, progress=progress)
        histories[f"fine-tuning ({name})"] = asdict(history)
        wrappers[name] = wrapper

    print("evaluating")
    roles = {"MDLM": (wrappers["MDLM"], False), "MemDLM (train)": (wrappers["MemDLM"], False),
             "MemDLM (train + inference)": (wrappers["MemDLM"], True)}
    evaluated = {name: evaluate(args, w, tokenizer, eval_sets, adapt) for name, (w, adapt) in roles.items()}
    accuracy = {name: scores for name, (scores, _) in evaluated.items()}
    samples = {name: predictions for name, (_, predictions) in evaluated.items()}
    losses = {name: {"off": w.eval_loss(eval_rows, memory="off", batch_size=args.batch_size),
                     "prompt": w.eval_loss(eval_rows, memory="prompt", batch_size=args.batch_size)}
              for name, (w, _) in roles.items()}
    curves = {name: exposure_curves(args, wrappers[name], eval_rows[: args.batch_size]) for name in ("MDLM", "MemDLM")}

    table = write_table(output, accuracy, losses)
    plots = plot(output, histories, curves, accuracy)
    results = {"arguments": vars(args), "accuracy": accuracy, "eval_loss": losses, "exposure_bias": curves,
               "sample_predictions": samples,
               "histories": histories, "seconds": time.time() - started}
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(table)
    for name, by_order in curves.items():
        for order, c in by_order.items():
            print(f"R_EB {name:7s} {order:10s}: " + " ".join(f"{r:.2f}" for r in c["ratio"]))
    print(f"wrote {output / 'results.json'}, {output / 'results.csv'}, " + ", ".join(str(p) for p in plots))
    print(f"total time {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
