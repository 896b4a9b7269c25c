"""bilevel_dlm as an lm-eval model: generation equals task_accuracy prediction by prediction, prompt memory
never sees the continuation and is adapted once per distinct context, batches (also of mixed generation
settings) equal their requests alone, any max_gen_toks runs with any block length, over-length inputs are
left-truncated with no forward past max_length, and the offline task files run through lm_eval.
(The scores' parity with lm-eval, LLaDA and dllm is tests/test_lm_eval_parity.py.)"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'bilevel_dlm[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig  # noqa: E402
from bilevel_dlm.evaluation import task_accuracy  # noqa: E402
from bilevel_dlm.integrations import tiny_model  # noqa: E402
from bilevel_dlm.lm_eval import TASKS_DIR, BilevelDLM, task_manager  # noqa: E402
from bilevel_dlm.lm_eval.generation import answer_tokens, decoding_run, stop_token_ids  # noqa: E402
from bilevel_dlm.lm_eval.protocols import fit_to_length  # noqa: E402
from bilevel_dlm.lm_eval.tasks.loaders import load_task, write_task_files  # noqa: E402
from bilevel_dlm.sampling import LLaDASampler  # noqa: E402
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


def loglikelihood(lm: BilevelDLM, context: str, continuation: str) -> float:
    return lm.loglikelihood([request("loglikelihood", context, continuation)])[0][0]


def test_the_estimate_varies_less_with_more_draws(wrapper) -> None:
    context, continuation = "john moved to the garden . where is john ? answer :", " garden garden office"
    spreads = []
    for draws in (2, 16):
        values = [loglikelihood(BilevelDLM(wrapper=wrapper, mc_num=draws, seed=seed, batch_size=draws), context,
                                continuation) for seed in range(8)]
        spreads.append(statistics.pvariance(values))
    assert spreads[1] < spreads[0]


def test_prompt_memory_never_sees_the_scored_continuation(wrapper) -> None:
    lm = BilevelDLM(wrapper=wrapper, memory="prompt", mc_num=4, batch_size=4)
    context = "sandra journeyed to the hallway . where is sandra ? answer :"
    states = []
    for continuation in (" hallway", " bedroom bathroom"):
        loglikelihood(lm, context, continuation)
        states.append(lm.last_memory.state())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    off = loglikelihood(BilevelDLM(wrapper=wrapper, memory="off", mc_num=4, batch_size=4), context, " hallway")
    assert loglikelihood(lm, context, " hallway") != off, "the memory must change the score"


def test_memory_is_adapted_once_per_distinct_context_with_the_same_scores(wrapper) -> None:
    first, second = ("mary went to the kitchen . where is mary ? answer :",
                     "john went to the garden . where is john ? answer :")
    pairs = [(first, " kitchen"), (second, " garden"), (first, " garden"), (first, " office"), (second, " kitchen")]
    lm = BilevelDLM(wrapper=wrapper, memory="prompt", mc_num=4, batch_size=4, is_check_greedy=True)
    together = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    assert lm.adaptations == 2
    for pair, result in zip(pairs, together):
        alone = BilevelDLM(wrapper=wrapper, memory="prompt", mc_num=4, batch_size=4, is_check_greedy=True)
        assert alone.loglikelihood([request("loglikelihood", *pair)]) == [result] and alone.adaptations == 1


@contextmanager
def forward_widths(model) -> Iterator[list[int]]:
    """The sequence length of every forward of ``model`` while inside."""
    widths: list[int] = []

    def record(module, args, kwargs):
        widths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield widths
    finally:
        handle.remove()


def test_a_batch_mixing_two_tasks_settings_equals_each_request_alone(wrapper) -> None:
    """Requests of two tasks in one call: each batch decodes with its own requests' settings (canvases of
    prompt + 8 and prompt + 24 tokens), and every answer equals the request generated alone."""
    short, long = {"until": ["question"], "max_gen_toks": 8}, {"until": ["."], "max_gen_toks": 24}
    names = ["mary", "john", "sandra", "daniel"]
    requests = [request("generate_until", f"{name} went to the office . where is {name} ? answer :", setting)
                for name, setting in zip(names, [short, long, short, long])]
    prompt = len(wrapper.tokenizer(requests[0].args[0])["input_ids"])
    assert {len(wrapper.tokenizer(r.args[0])["input_ids"]) for r in requests} == {prompt}
    with forward_widths(wrapper.model) as widths:
        together = BilevelDLM(wrapper=wrapper, memory="prompt", batch_size=4).generate_until(requests)
    assert set(widths) - {prompt} == {prompt + 8, prompt + 24}  # (the adaptation runs on the prompt)
    alone = [BilevelDLM(wrapper=wrapper, memory="prompt", batch_size=1).generate_until([r])[0] for r in requests]
    assert together == alone
    assert all(len(wrapper.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 8 for text in together[::2])


def test_generate_until_with_prompt_memory_on_a_batch_equals_each_request_alone(wrapper) -> None:
    examples = make_dataset(TASK, 4, LENGTH, seed=7)
    settings = {"until": ["question"], "max_gen_toks": 8}
    requests = [request("generate_until", e.prompt, settings) for e in examples]
    together = BilevelDLM(wrapper=wrapper, memory="prompt", batch_size=4).generate_until(requests)
    alone = [BilevelDLM(wrapper=wrapper, memory="prompt", batch_size=1).generate_until([r])[0] for r in requests]
    assert together == alone and len(together) == 4
    assert all("question" not in text for text in together)


def test_any_max_gen_toks_runs_with_any_block_length_and_is_cut_to_it(wrapper) -> None:
    """The paper-protocol settings (steps 256, blocks of 32) on a task asking 30 tokens: 32 are generated
    in 32 steps (the same tokens as 256 steps, which only add steps that reveal nothing) and cut to 30."""
    tokenizer = wrapper.tokenizer
    context = "mary went to the office . john went to the garden . where is john ? answer :"
    lm = BilevelDLM(wrapper=wrapper, steps=256, block_length=32)
    (text,) = lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 30})])
    ids = torch.tensor([tokenizer(context)["input_ids"]])
    planned = wrapper.generate(ids, max_new_tokens=32, adapt=False, seed=1234, steps=32, block_length=32)
    assert torch.equal(planned, wrapper.generate(ids, max_new_tokens=32, adapt=False, seed=1234, steps=256,
                                                 block_length=32))
    tokens = answer_tokens(planned[0, ids.shape[1]:].tolist(), 30, lm.stops)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True) and len(tokens) <= 30


@given(st.integers(1, 300), st.integers(1, 64), st.one_of(st.none(), st.integers(1, 1024)))
@settings(max_examples=300, deadline=None)
def test_a_decoding_run_covers_the_wanted_tokens_in_whole_blocks(wanted, block_length, steps) -> None:
    length, sampler = decoding_run(LLaDASampler(steps=steps, block_length=block_length), wanted)
    blocks = length // block_length
    assert length % block_length == 0 and wanted <= length < wanted + block_length
    if steps is None:
        assert sampler.steps is None
    else:
        assert sampler.steps % blocks == 0 and blocks <= sampler.steps <= max(length, blocks)
        assert sampler.steps == steps or steps > length or steps % blocks
    assert sampler.block_length == block_length


def test_answers_end_at_the_first_stop_token_of_the_tokenizer_or_the_generation_config(wrapper) -> None:
    tokenizer = wrapper.tokenizer
    model = type("Model", (), {"generation_config": type("Config", (), {"eos_token_id": [7, 9]})()})()
    stops = stop_token_ids(tokenizer, model)
    assert stops == {tokenizer.eos_token_id, 7, 9}
    assert answer_tokens([3, 4, 9, 5, tokenizer.eos_token_id], None, stops) == [3, 4]
    assert answer_tokens([3, 4, 5, 6], 3, stops) == [3, 4, 5]


@pytest.mark.parametrize("memory", ["off", "prompt"])
def test_over_length_inputs_are_left_truncated_and_no_forward_runs_past_max_length(wrapper, memory, caplog) -> None:
    tokenizer = wrapper.tokenizer
    context = " ".join(f"{name} went to the {room} ." for name, room in
                       [("mary", "kitchen"), ("john", "garden"), ("sandra", "office"), ("daniel", "hallway")] * 3)
    context += " where is mary ? answer :"
    ids = tokenizer(context)["input_ids"]
    assert len(ids) > 64
    lm = BilevelDLM(wrapper=wrapper, memory=memory, max_length=64, mc_num=4, batch_size=4)
    with forward_widths(wrapper.model) as widths, caplog.at_level("WARNING"):
        (text,) = lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 8})])
        (value, _), = lm.loglikelihood([request("loglikelihood", context, " kitchen")])
    assert max(widths) <= 64 and "left-truncated" in caplog.text
    kept = torch.tensor([ids[-(64 - 8):]])
    expected = wrapper.generate(kept, max_new_tokens=8, adapt=memory == "prompt", seed=1234)
    assert text == tokenizer.decode(answer_tokens(expected[0, kept.shape[1]:].tolist(), 8, lm.stops),
                                    skip_special_tokens=True)
    context_ids, target = lm._encode_pair(context, " kitchen")
    context_ids, target, _ = fit_to_length(context_ids, target, 64)
    assert len(context_ids) + len(target) == 64
    assert value == lm.score_tokens(context_ids, target, lm.adapted_memory(context_ids), lm.protocol)[0]
    with pytest.raises(ValueError, match="leaves no room for a context"):
        lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 64})])


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


def test_llada2_whole_block_canvases_stay_within_max_length() -> None:
    """LLaDA2's sampler completes the last block (up to block_length - 1 more columns): the context budget
    leaves room for it, so no forward runs past max_length (60, not a multiple of the blocks of 8)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    wrapper = MemoryWrapper(tiny_model("llada2", tokenizer), MemDLMConfig(memory=MemoryConfig(rank=4)),
                            tokenizer=tokenizer)
    context = " ".join(["mary went to the kitchen ."] * 20) + " where is mary ? answer :"
    lm = BilevelDLM(wrapper=wrapper, max_length=60, block_length=8, threshold=0.5)
    with forward_widths(wrapper.model) as widths:
        lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 8}),
                           request("generate_until", context[40:], {"until": [], "max_gen_toks": 8})])
    assert widths and max(widths) <= 60


@pytest.mark.parametrize("family, settings", [("mdlm", {}), ("llada", {"temperature": 1.0})])
def test_sampling_decoders_give_each_request_its_own_draws_whatever_the_batch(family, settings) -> None:
    """MDLM's ancestral sampler and LLaDA at temperature 1 draw random numbers, which a batch would share
    out differently: such requests are generated one at a time, so batch_size changes no answer."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    wrapper = MemoryWrapper(tiny_model(family, tokenizer), MemDLMConfig(memory=MemoryConfig(rank=4)),
                            tokenizer=tokenizer)
    requests = [request("generate_until", f"{name} went to the office . where is {name} ? answer :",
                        {"until": [], "max_gen_toks": 6}) for name in ("mary", "john", "sandra")]
    together = BilevelDLM(wrapper=wrapper, batch_size=3, **settings).generate_until(requests)
    alone = [BilevelDLM(wrapper=wrapper, batch_size=1, **settings).generate_until([r])[0] for r in requests]
    assert together == alone  # (one shared random stream gives other answers: the test fails on it)
