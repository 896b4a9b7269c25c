"""The main job's quick budget end to end: its outputs are consistent with each other; evaluation helpers."""

import json
from functools import partial
from itertools import islice

import pytest
import torch

from bilevel_dlm.data import pad_collate
from bilevel_dlm.evaluation import decode_answers, encode_prompts
from bilevel_dlm.tasks import build_tokenizer, token_accuracy
from bilevel_dlm.tasks.recall import make_recall_dataset, recall_tokenizer
from examples_loader import example_module


@pytest.fixture(scope="module")
def job():
    with example_module("memdlm_llada.py") as module:
        yield module


@pytest.fixture(scope="module")
def quick_run(job, tmp_path_factory):
    output = tmp_path_factory.mktemp("main_job")
    record = job.main(["--budget", "quick", "--output", str(output), "--workers", "1", "--no-progress"])
    return output, record


def test_the_quick_run_writes_every_output(quick_run) -> None:
    output, record = quick_run
    for name in ("runs.json", "results.json", "results.md", "eval_loss_vs_steps.png", "eval_loss_vs_compute.png",
                 "accuracy.png", "adaptation.png"):
        assert (output / name).stat().st_size > 0, name
    environment = record["environment"]
    assert environment["torch"] == torch.__version__ and environment["threads_per_worker"] == 1
    assert environment["workers"] * environment["threads_per_worker"] <= environment["cores"]
    assert "excludes 0" in record["rule"]


def test_one_row_per_arm_and_every_interval_contains_its_mean(job, quick_run) -> None:
    output, record = quick_run
    saved = json.loads((output / "results.json").read_text())
    assert list(saved["summary"]["arms"]) == list(job.ARM_SETS["default"])
    assert sorted((r["arm"], r["seed"]) for r in saved["runs"]) == sorted(
        (a, s) for a in job.ARM_SETS["default"] for s in (0, 1))
    table = next(part for part in (output / "results.md").read_text().split("\n\n")
                 if part.startswith("| arm | step cost")).splitlines()[2:]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == list(job.ARM_SETS["default"])
    intervals = [v for row in saved["summary"]["arms"].values() for v in row.values()]
    intervals += [v for row in saved["summary"]["comparisons"].values() for v in row.values()]
    for value in intervals:
        assert value["low"] <= value["mean"] <= value["high"] and value["n"] == 2


def test_paired_differences_come_from_the_per_seed_numbers(quick_run) -> None:
    _, record = quick_run
    runs = {(r["arm"], r["seed"]): r for r in record["runs"]}
    for arm, rows in record["summary"]["comparisons"].items():
        differences = [runs[arm, s]["eval_loss"][-1] - runs["MDLM", s]["eval_loss"][-1] for s in (0, 1)]
        assert rows["final eval loss"]["mean"] == pytest.approx(sum(differences) / 2, abs=1e-12)
        half = 12.706204736174694 * abs(differences[0] - differences[1]) / 2  # t(0.975, 1) * sd / sqrt(2)
        assert rows["final eval loss"]["high"] - rows["final eval loss"]["mean"] == pytest.approx(half, abs=1e-9)
        verdict = rows["final eval loss"]["verdict"]
        low, high = rows["final eval loss"]["low"], rows["final eval loss"]["high"]
        assert verdict == ("better" if high < 0 else "worse" if low > 0 else "no difference detected")


def test_equal_compute_adds_up_the_calibrated_cost_of_each_step_a_run_took(job, quick_run) -> None:
    import numpy as np

    _, record = quick_run
    calibration, rounds = record["calibration"], record["budget_settings"]["calibration_rounds"]
    seconds, mix = calibration["seconds"], calibration["mix"]
    unit = [sum(share * seconds["MDLM"][task][r] for task, share in mix.items()) for r in range(rounds)]
    for arm, tasks in seconds.items():  # per task: the mean over rounds of its step time / MDLM's mean step
        assert all(len(times) == rounds for times in tasks.values())
        for task, times in tasks.items():
            expected = sum(t / u for t, u in zip(times, unit)) / rounds
            assert calibration["task_cost"][arm][task] == pytest.approx(expected, rel=1e-12)
        assert calibration["cost"][arm] == pytest.approx(
            sum(share * calibration["task_cost"][arm][task] for task, share in mix.items()), rel=1e-12)
    assert calibration["cost"]["MDLM"] == pytest.approx(1.0)
    positions = {}
    for run in record["runs"]:
        assert run["tasks"] == list(islice(job.task_schedule(job.FINETUNE_MIX, run["seed"]), len(run["tasks"])))
        steps = np.cumsum([0.0] + [calibration["task_cost"][run["arm"]][task] for task in run["tasks"]])
        positions[run["arm"], run["seed"]] = steps[run["eval_steps"]]
    budget = record["summary"]["equal_compute_mdlm_steps"]
    assert budget == pytest.approx(min(p[-1] for p in positions.values()))
    for arm, row in record["summary"]["arms"].items():
        expected = [np.interp(budget, positions[arm, r["seed"]], r["eval_loss"]) for r in record["runs"]
                    if r["arm"] == arm]
        assert row["eval loss at equal compute"]["mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_checkpoints_reload_to_the_models_the_runs_evaluated(job, quick_run) -> None:
    """Each seed-0 checkpoint (outer LoRA merged, chosen adaptation rate kept) scores the test split as its run
    did, memory off and with prompt memory (the memory lm-eval's RULER 'prompt' mode uses)."""
    from bilevel_dlm import MemoryWrapper

    output, record = quick_run
    test = job.splits(job.BUDGETS["quick"])["test"]
    for run in (r for r in record["runs"] if r["seed"] == 0):
        loaded = MemoryWrapper.from_pretrained(output / run["checkpoint"])
        assert loaded.config.adapt.lr == run["adapt_lr"]
        for task, examples in test.items():
            rows = job.rows_of(loaded.tokenizer, examples)
            assert loaded.eval_loss(rows, batch_size=32) == pytest.approx(run["loss_off"][task], rel=1e-4)
            assert loaded.eval_loss(rows, "prompt", batch_size=32) == pytest.approx(run["loss_prompt"][task], rel=1e-4)


def test_accuracies_are_higher_is_better_and_losses_lower_is_better(quick_run) -> None:
    _, record = quick_run
    runs = {(r["arm"], r["seed"]): r for r in record["runs"]}
    for arm, rows in record["summary"]["comparisons"].items():
        for name, row in rows.items():
            assert row["lower_is_better"] == ("loss" in name), name
        differences = [runs[arm, s]["decoding_off"]["mqar"]["token_accuracy"]
                       - runs["MDLM", s]["decoding_off"]["mqar"]["token_accuracy"] for s in (0, 1)]
        row = rows["mqar token accuracy, memory off"]
        assert row["mean"] == pytest.approx(sum(differences) / 2, abs=1e-12)
        if row["low"] > 0:
            assert row["verdict"].startswith("better")
        elif row["high"] < 0:
            assert row["verdict"].startswith("worse")


def test_ruler_scores_every_arm_and_memory_mode_with_lm_eval(job, quick_run) -> None:
    pytest.importorskip("lm_eval")
    _, record = quick_run
    assert set(record["ruler"]) == set(record["summary"]["arms"])
    for arm, modes in record["ruler"].items():
        assert set(modes) == {"off", "prompt"}, arm
        for mode in modes.values():
            niah = mode["niah_single_1"]
            assert 0.0 <= niah["score"] <= 1.0 and niah["examples"] == 1
            assert set(mode["ruler_vt"]) == {"not run"}, "a task lm-eval cannot build is reported, not dropped"
    output, _ = quick_run
    logs = {path.name for path in (output / "ruler_logs").iterdir()}
    expected = {f"{job.slug(arm)}-{mode}-niah_single_1.log" for arm in record["ruler"] for mode in ("off", "prompt")}
    assert expected <= logs


def test_the_tokenizer_round_trips_digits_capitals_and_punctuation(job) -> None:
    tokenizer = job.job_tokenizer(job.BUDGETS["quick"])
    for text in ("The special magic number for X-Ray is: 9152513.", "A (B) {c}; 3.14 != 2_718 @ 10%"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    digits = tokenizer.tokenize(" 9152513")
    assert digits[1:] == list("9152513"), "every digit is its own token"


def test_the_base_is_pretrained_once_and_reused(job, quick_run) -> None:
    output, record = quick_run
    base = output / "base"
    stamp = (base / "job_settings.json").stat().st_mtime_ns
    args = job.parse_args(["--budget", "quick", "--output", str(output)])
    assert job.pretrained_base(output, args, job.BUDGETS["quick"], progress=False) == base
    assert (base / "job_settings.json").stat().st_mtime_ns == stamp


def test_arms_of_a_seed_start_from_the_same_weights(job, quick_run) -> None:
    """Same base, same seed: every arm's outer LoRA starts identical, so the arms differ only by their method."""
    output, _ = quick_run
    args = job.parse_args(["--budget", "quick", "--output", str(output)])
    states = [job.fine_tuning_wrapper(output / "base", arm, args, 3).model.state_dict()
              for arm in ("MDLM", "MemDLM (all blocks)")]
    assert states[0].keys() == states[1].keys() and any("lora_A" in name for name in states[0])
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_task_batches_hold_one_task_each_and_visit_every_row_once_per_pass(job) -> None:
    """Rows are told apart by their tokens (task k's row i holds 100 k + i, 2 + k tokens long): a batch's rows
    all come from one task and are as long as that task's rows, an example_index always names the same row
    and no two rows share one, and every pass (numbered from 0) over a task visits each row once."""
    sizes = {"a": 5, "b": 12, "c": 3}
    rows = {t: [{"input_ids": [100 * k + i] * (2 + k)} for i in range(n)] for k, (t, n) in enumerate(sizes.items())}
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    collate = partial(pad_collate, pad_token_id=0)
    batches = list(islice(job.task_batches(rows, mix, 4, seed=3, collate_fn=collate), 60))
    row_of_index: dict[int, int] = {}
    seen: dict[tuple[int, int], list[int]] = {}
    tasks = []
    for batch in batches:
        owners = {int(ids[0]) // 100 for ids in batch["input_ids"]}
        assert len(owners) == 1, "one task per batch"
        task = owners.pop()
        tasks.append(list(sizes)[task])
        assert batch["input_ids"].shape == (4, 2 + task), "padded to its own task's length"
        for ids, index, epoch in zip(batch["input_ids"], batch["example_index"], batch["epoch"]):
            assert row_of_index.setdefault(int(index), int(ids[0])) == int(ids[0]), "an index names one row"
            seen.setdefault((task, int(epoch)), []).append(int(ids[0]) % 100)
    assert len(set(row_of_index.values())) == len(row_of_index), "no two rows share an index"
    assert tasks == list(islice(job.task_schedule(mix, 3), 60)), "the batches follow the schedule"
    for task, name in enumerate(sizes):
        epochs = sorted(e for t, e in seen if t == task)
        assert epochs == list(range(len(epochs))), "passes are numbered 0, 1, 2, ..."
        for epoch in epochs:
            visited = seen[task, epoch]
            assert len(visited) == len(set(visited)), "a pass visits a row once"
            if epoch < epochs[-1]:
                assert sorted(visited) == list(range(sizes[name])), "a finished pass visited every row"
    assert tasks.count("a") > tasks.count("c") > 0
    same = list(islice(job.task_batches(rows, mix, 4, seed=3, collate_fn=collate), 60))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["epoch"], y["epoch"])
               for x, y in zip(batches, same))
    other = list(islice(job.task_batches(rows, mix, 4, seed=4, collate_fn=collate), 60))
    assert any(x["input_ids"].shape != y["input_ids"].shape or not torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(batches, other))


def test_recall_tasks_are_deterministic_and_answer_from_the_context() -> None:
    tokenizer = recall_tokenizer()
    for task, pairs, queries in (("position", 6, 0), ("mqar", 4, 3)):
        examples = make_recall_dataset(task, 20, seed=5, n_pairs=pairs, n_queries=queries)
        assert examples == make_recall_dataset(task, 20, seed=5, n_pairs=pairs, n_queries=queries)
        assert examples != make_recall_dataset(task, 20, seed=6, n_pairs=pairs, n_queries=queries)
        for example in examples:
            words = example.prompt.split()
            assert tokenizer.unk_token_id not in tokenizer(example.prompt)["input_ids"]
            keys = words[:pairs] if task == "position" else words[0:2 * pairs:2]
            values = words[pairs:2 * pairs] if task == "position" else words[1:2 * pairs:2]
            if task == "position":
                assert example.answer.split() == values
            else:
                asked = words[2 * pairs + 1:-1]
                assert len(asked) == queries and example.answer.split() == [values[keys.index(k)] for k in asked]


def test_token_accuracy_gives_partial_credit_by_position() -> None:
    assert token_accuracy("va vb vc", "va vx vc") == pytest.approx(2 / 3)
    assert token_accuracy("", "va vb") == 0.0 and token_accuracy("va vb vz", "va vb") == 1.0


def test_prompts_are_left_padded_and_answers_stop_at_eos():
    tok = build_tokenizer()
    ids, mask = encode_prompts(tok, ["where is mary ?", "mary"], pad_token_id=tok.pad_token_id)
    assert ids.shape == (2, 5) and mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    assert ids[1, :3].tolist() == [tok.pad_token_id] * 3 and ids[1, 3] == tok.bos_token_id
    kitchen = tok("kitchen", add_special_tokens=False)["input_ids"]
    generated = torch.tensor([kitchen + [tok.eos_token_id] + kitchen, kitchen * 3])
    assert decode_answers(tok, generated) == ["kitchen", "kitchen kitchen kitchen"]


def test_every_arm_and_outer_option_builds_the_recipe_it_names(job) -> None:
    for outer in ("lora", "full"):
        args = job.parse_args(["--outer", outer, "--lr", "0.01"])
        for name, arm in job.ARMS.items():
            config = job.recipe(name, args, seed=4, adapt_lr=0.3)
            assert (config.inner.steps, config.inner.meta_init) == (arm.inner_steps, arm.meta_init), name
            assert config.memory.layer_fraction == arm.layer_fraction and config.seed == 4 and config.adapt.lr == 0.3
            assert config.outer.lr == pytest.approx(0.01 * arm.lr_factor)
            assert config.outer.meta_lr == pytest.approx(0.01 * arm.lr_factor * arm.meta_lr_factor)
            assert config.outer.lora.apply == (outer == "lora")
    assert all(set(arms) <= set(job.ARMS) and arms[0] == "MDLM" for arms in job.ARM_SETS.values())


def test_more_workers_than_cores_is_refused(job, tmp_path) -> None:
    import os

    with pytest.raises(SystemExit, match="cores"):
        job.main(["--budget", "quick", "--output", str(tmp_path), "--workers", str((os.cpu_count() or 1) + 1)])
