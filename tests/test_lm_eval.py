"""bilevel_dlm as an lm-eval model: generation equals task_accuracy prediction by prediction, the
Monte Carlo log-likelihood equals an independent estimate, prompt memory never sees the continuation,
batches equal their requests alone, and the offline task files run through lm_eval."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'bilevel_dlm[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig  # noqa: E402
from bilevel_dlm.evaluation import task_accuracy  # noqa: E402
from bilevel_dlm.integrations import tiny_model  # noqa: E402
from bilevel_dlm.lm_eval import TASKS_DIR, BilevelDLM, task_manager  # noqa: E402
from bilevel_dlm.lm_eval.tasks.loaders import load_task, write_task_files  # noqa: E402
from bilevel_dlm.tasks import build_tokenizer, encode_example, make_dataset  # noqa: E402

TASK, LENGTH, N = "babi", 256, 6


@pytest.fixture(scope="module")
def wrapper() -> MemoryWrapper:
    """A tiny LLaDA briefly trained on the task's training split (a different seed from the test cells)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llada", tokenizer, max_length=512)
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25), outer=OuterConfig(lr=2e-3))
    wrapper = MemoryWrapper(model, config, tokenizer=tokenizer)
    rows = [encode_example(tokenizer, e.prompt, e.answer, 340) for e in make_dataset(TASK, 16, LENGTH, seed=0)]
    wrapper.fit(rows, max_steps=10, batch_size=4, progress=False)
    return wrapper


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.mark.parametrize("memory", ["off", "prompt"])
def test_simple_evaluate_equals_task_accuracy_prediction_by_prediction(wrapper, memory) -> None:
    lm = BilevelDLM(wrapper=wrapper, memory=memory, batch_size=3)
    results = lm_eval.simple_evaluate(model=lm, tasks=[f"bilevel_dlm_{TASK}_{LENGTH}"], task_manager=task_manager(),
                                      limit=N, log_samples=True)
    samples = sorted(results["samples"][f"bilevel_dlm_{TASK}_{LENGTH}"], key=lambda s: s["doc_id"])
    examples = make_dataset(TASK, 50, LENGTH, seed=1000)[:N]  # the shipped task's cell
    accuracy, predictions = task_accuracy(wrapper, wrapper.tokenizer, examples, max_new_tokens=32,
                                          adapt=memory == "prompt", batch_size=3, seed=1234)
    assert [s["doc"]["prompt"] for s in samples] == [e.prompt for e in examples]
    assert [s["resps"][0][0] for s in samples] == predictions
    assert results["results"][f"bilevel_dlm_{TASK}_{LENGTH}"]["exact_match,none"] == pytest.approx(accuracy)


def _independent_estimate(wrapper: MemoryWrapper, context: list[int], continuation: list[int],
                          masks: torch.Tensor) -> float:
    """-(1 / D) sum_d (T / k_d) sum_masked CE, from the model's own full logits, one draw at a time."""
    sequence = torch.tensor(context + continuation)
    total = 0.0
    for mask in masks:
        full = torch.zeros_like(sequence, dtype=torch.bool)
        full[len(context):] = mask
        with torch.no_grad():
            logits = wrapper.model.eval()(torch.where(full, wrapper.mask_token_id, sequence)[None]).logits[0]
        ce = F.cross_entropy(logits[full], sequence[full], reduction="sum")
        total += float(ce) * len(continuation) / int(mask.sum())
    return -total / len(masks)


def test_loglikelihood_equals_an_independent_monte_carlo_estimate_with_the_same_masks(wrapper) -> None:
    lm = BilevelDLM(wrapper=wrapper, mc_num=12, batch_size=5)
    tokenizer = wrapper.tokenizer
    context, continuation = "mary went to the kitchen . where is mary ? answer :", " kitchen"
    value, greedy = lm.loglikelihood([request("loglikelihood", context, continuation)])[0]
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    masks = lm.draws(len(continuation_ids))
    assert masks.shape == (12, len(continuation_ids)) and bool(masks.any(1).all())
    assert value == pytest.approx(_independent_estimate(wrapper, context_ids, continuation_ids, masks), abs=1e-5)
    assert isinstance(greedy, bool)


def test_the_estimate_varies_less_with_more_draws(wrapper) -> None:
    context, continuation = "john moved to the garden . where is john ? answer :", " garden garden office"
    spreads = []
    for draws in (2, 16):
        values = [BilevelDLM(wrapper=wrapper, mc_num=draws, seed=seed, batch_size=16).score(context, continuation)[0]
                  for seed in range(8)]
        spreads.append(statistics.pvariance(values))
    assert spreads[1] < spreads[0]


def test_prompt_memory_never_sees_the_scored_continuation(wrapper) -> None:
    lm = BilevelDLM(wrapper=wrapper, memory="prompt", mc_num=4)
    context = "sandra journeyed to the hallway . where is sandra ? answer :"
    states = []
    for continuation in (" hallway", " bedroom bathroom"):
        lm.score(context, continuation)
        states.append(lm.last_memory.state())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    off = BilevelDLM(wrapper=wrapper, memory="off", mc_num=4).score(context, " hallway")[0]
    assert lm.score(context, " hallway")[0] != off, "the memory must change the score"


def test_generate_until_with_prompt_memory_on_a_batch_equals_each_request_alone(wrapper) -> None:
    examples = make_dataset(TASK, 4, LENGTH, seed=7)
    settings = {"until": ["question"], "max_gen_toks": 8}
    requests = [request("generate_until", e.prompt, settings) for e in examples]
    together = BilevelDLM(wrapper=wrapper, memory="prompt", batch_size=4).generate_until(requests)
    alone = [BilevelDLM(wrapper=wrapper, memory="prompt", batch_size=1).generate_until([r])[0] for r in requests]
    assert together == alone and len(together) == 4
    assert all("question" not in text for text in together)


def test_loglikelihood_rolling_is_a_finite_negative_log_likelihood(wrapper) -> None:
    lm = BilevelDLM(wrapper=wrapper, mc_num=4)
    (value,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", "mary went to the office . mary is here")])
    assert value < 0 and value == value


def test_model_args_are_parsed_as_lm_eval_passes_them(wrapper, tmp_path) -> None:
    wrapper.save_pretrained(tmp_path / "run")
    lm = BilevelDLM.create_from_arg_string(f"pretrained={tmp_path / 'run'},memory=prompt,steps=4,mc_num=3",
                                           {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert (lm.memory, lm.mc_num, lm.batch_size, lm.sampler_settings) == ("prompt", 3, 2, {"steps": 4})
    with pytest.raises(ValueError, match="unknown model_args"):
        BilevelDLM(wrapper=wrapper, stepz=3)


def test_shipped_task_yamls_are_what_the_writer_writes(tmp_path) -> None:
    paths = write_task_files(tmp_path, with_data=False)
    assert len(paths) == 12
    for path in paths:
        assert (TASKS_DIR / path.name).read_text() == path.read_text(), path.name


def test_written_task_files_run_through_the_lm_eval_command_line(wrapper, tmp_path) -> None:
    wrapper.save_pretrained(tmp_path / "run")
    assert subprocess.run([sys.executable, "-m", "bilevel_dlm.lm_eval", "write", "--output", str(tmp_path / "tasks"),
                           "--tasks", "mv", "--context-lengths", "128", "--examples", "3"], check=True).returncode == 0
    rows = load_task("mv", 128, examples=3, data_dir=str(tmp_path / "tasks"))["test"]
    assert len(rows) == 3 and rows[0]["prompt"] == make_dataset("mv", 3, 128, 1000)[0].prompt
    command = [sys.executable, "-m", "bilevel_dlm.lm_eval", "run", "--model", "bilevel_dlm", "--model_args",
               f"pretrained={tmp_path / 'run'},batch_size=3", "--device", "cpu", "--tasks", "bilevel_dlm_mv_128",
               "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bilevel_dlm_mv_128" in result.stdout and "exact_match" in result.stdout
