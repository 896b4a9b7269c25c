"""The main job's quick budget end to end: its outputs are consistent with each other; evaluation helpers."""

import csv
import json
import math

import pytest
import torch

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
    output, _ = quick_run
    for name in ("results.json", "results.csv", "eval_loss_vs_steps.png", "eval_loss_vs_time.png", "accuracy.png",
                 "adaptation_sweep.png"):
        assert (output / name).stat().st_size > 0, name


def test_table_json_and_csv_agree_and_record_every_seed(job, quick_run) -> None:
    output, record = quick_run
    saved = json.loads((output / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["arms"]) == set(job.ARM_SETS["default"])
    assert sorted((r["arm"], r["seed"]) for r in saved["runs"]) == sorted((a, s) for a in job.ARM_SETS["default"] for s in (0, 1))
    with open(output / "results.csv") as handle:
        rows = list(csv.reader(handle))
    assert [row[0] for row in rows[1:]] == list(job.ARM_SETS["default"]), "one table row per arm"
    header = rows[0]
    for row in rows[1:]:
        arm = saved["arms"][row[0]]
        for title, key in job.TABLE_COLUMNS:
            assert row[header.index(title)] == job.cell(arm[key])
        runs = [r for r in saved["runs"] if r["arm"] == row[0]]
        final = [r["eval_loss"][-1] for r in runs]
        assert arm["final_eval_loss"]["mean"] == pytest.approx(sum(final) / len(final))
        assert arm["final_eval_loss"]["min"] == min(final) and arm["final_eval_loss"]["max"] == max(final)


def test_curves_and_metrics_are_well_formed(quick_run) -> None:
    _, record = quick_run
    for run in record["runs"]:
        steps, seconds = run["eval_steps"], run["eval_seconds"]
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == record["budget_settings"]["steps"]
        assert seconds == sorted(seconds) and len(seconds) == len(steps) == len(run["eval_loss"])
        assert all(math.isfinite(v) for v in run["eval_loss"])
        for mode in ("off", "prompt"):
            for scores in run[f"accuracy_{mode}"].values():
                assert 0.0 <= scores["exact_match"] <= scores["token_accuracy"] <= 1.0
        assert run["adapt_sweep"][run["adapt_choice"]] == min(run["adapt_sweep"].values()), \
            "the chosen adaptation rate is the best on the validation split"
        assert float(run["adapt_choice"]) == run["adapt_lr"]


def test_arms_start_from_the_same_weights_and_data(job) -> None:
    """Every arm of a seed evaluates the same initial model: its step-0 eval loss is identical."""
    args = job.parse_args(["--budget", "quick", "--no-progress"])
    budget = job.Budget(**{**job.BUDGETS["quick"].__dict__, "steps": 1, "eval_every": 1})
    first = {arm: job.run_arm(arm, 3, args, budget)["eval_loss"][0] for arm in ("MDLM", "MemDLM (last block)")}
    assert first["MDLM"] == first["MemDLM (last block)"]


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
