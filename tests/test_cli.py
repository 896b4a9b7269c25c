"""The ``bilevel-dlm`` command line, run in-process through ``main(argv)`` on tiny models and short contexts."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilevel_dlm import MemoryWrapper
from bilevel_dlm.cli import main
from bilevel_dlm.cli.generation import decode
from bilevel_dlm.integrations import tiny_model
from bilevel_dlm.integrations.llada import LLaDAModelLM
from bilevel_dlm.rng import content_keys, keyed_uniform
from bilevel_dlm.tasks import build_tokenizer, encode_example, exact_match, make_dataset

SYNTHETIC = ["--synthetic", "--tasks", "babi", "--context-lengths", "64", "--examples-per-task", "4",
             "--max-length", "80"]
FAST = ["--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def numbers_after(label: str, text: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{label}\s*(-?[\d.]+)", text)]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return MemoryWrapper.from_pretrained(directory).model.state_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 3-step run on the built-in suite (default tiny LLaDA), shared by the tests that read it."""
    output = tmp_path_factory.mktemp("run") / "out"
    code = main(["train", *SYNTHETIC, *FAST, "--output", str(output)])
    assert code == 0
    return output


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """A checkpoint of the randomly initialised tiny LLaDA (lr 0), whose generations are seldom empty."""
    output = tmp_path_factory.mktemp("run") / "random"
    assert main(["train", *SYNTHETIC, *FAST, "--steps", "1", "--lr", "0", "--output", str(output)]) == 0
    return output


def test_train_writes_a_checkpoint_that_loads_with_a_trained_tiny_model(tmp_path, capsys):
    output = tmp_path / "out"
    code, out, err = run(capsys, "train", *SYNTHETIC, *FAST, "--output", str(output))
    assert code == 0, err
    first, final = numbers_after("first", out)[0], numbers_after("final", out)[0]
    assert math.isfinite(first) and math.isfinite(final)
    assert f"saved to {output}" in out

    loaded = MemoryWrapper.from_pretrained(output)
    tokenizer = build_tokenizer()
    assert isinstance(loaded.model, LLaDAModelLM) and loaded.backbone.name == "llada"
    assert loaded.config.outer.lr == 1e-3, "--lr overrides the preset's outer learning rate"
    assert len(loaded.tokenizer) == len(tokenizer) and loaded.mask_token_id == tokenizer.mask_token_id
    ids = torch.tensor([[tokenizer.bos_token_id] + [tokenizer.mask_token_id] * 9])
    logits = loaded.model(ids).logits
    assert logits.shape == (1, 10, len(tokenizer)) and torch.isfinite(logits).all()

    torch.manual_seed(0)  # the config seed initialises the tiny model
    initial = tiny_model("llada", tokenizer, max_length=80).state_dict()
    trained_state = loaded.model.state_dict()
    assert initial.keys() == trained_state.keys()
    assert any(not torch.equal(initial[k], trained_state[k]) for k in initial), "3 steps at lr 1e-3 moved no weight"


def library_losses(checkpoint: Path, task: str, count: int, length: int, seed: int) -> tuple[float, float]:
    """The eval losses (memory off, prompt memory) of the suite's rows, encoded to 80 tokens, by the library."""
    wrapper = MemoryWrapper.from_pretrained(checkpoint)
    rows = [encode_example(wrapper.tokenizer, e.prompt, e.answer, 80) for e in make_dataset(task, count, length, seed)]
    return wrapper.eval_loss(rows, memory="off", batch_size=2), wrapper.eval_loss(rows, memory="prompt", batch_size=2)


def test_eval_prints_both_losses_equal_to_the_library_values(trained, capsys):
    checkpoint = trained
    code, out, err = run(capsys, "eval", "--checkpoint", str(checkpoint), *SYNTHETIC, "--batch-size", "2")
    assert code == 0, err
    (off,), (prompt,) = numbers_after("memory off:", out), numbers_after("prompt memory:", out)
    expected_off, expected_prompt = library_losses(checkpoint, "babi", 4, 64, seed=1)
    assert off == pytest.approx(expected_off, abs=6e-5)
    assert prompt == pytest.approx(expected_prompt, abs=6e-5)


def test_eval_synthetic_scores_the_runs_own_suite_and_says_so(trained, capsys):
    """eval --synthetic once scored all four tasks at 128 tokens whatever the run was trained on, silently."""
    assert MemoryWrapper.from_pretrained(trained).trained_on == {
        "source": "synthetic", "tasks": ["babi"], "context_lengths": [64], "examples_per_task": 4, "data_seed": 0,
        "max_length": 80}
    code, out, err = run(capsys, "eval", "--checkpoint", str(trained), "--synthetic", "--batch-size", "2")
    assert code == 0, err
    assert ("scored: synthetic tasks babi, context lengths 64, 4 examples per task, data seed 1, "
            "4 rows of up to 80 tokens\n  (options not given are the run's training suite (data seed 0 + 1: "
            "held out))") in out
    (off,), (prompt,) = numbers_after("memory off:", out), numbers_after("prompt memory:", out)
    expected_off, expected_prompt = library_losses(trained, "babi", 4, 64, seed=1)
    assert off == pytest.approx(expected_off, abs=6e-5) and prompt == pytest.approx(expected_prompt, abs=6e-5)

    code, out, err = run(capsys, "eval", "--checkpoint", str(trained), "--synthetic", "--context-lengths", "56",
                         "--examples-per-task", "2", "--data-seed", "7", "--batch-size", "2")
    assert code == 0, err
    assert "scored: synthetic tasks babi, context lengths 56, 2 examples per task, data seed 7, 2 rows of up to 80" in out
    (off,), (prompt,) = numbers_after("memory off:", out), numbers_after("prompt memory:", out)
    expected_off, expected_prompt = library_losses(trained, "babi", 2, 56, seed=7)
    assert off == pytest.approx(expected_off, abs=6e-5) and prompt == pytest.approx(expected_prompt, abs=6e-5)


def test_eval_of_one_short_record_whose_anchor_masks_nothing_is_refused(trained, tmp_path, capsys):
    """Its one anchor draw masks no token (t below the answer token's draw): the loss once printed 0.0000;
    now one line says that nothing was masked and what to do (an unbiased estimate has no other answer)."""
    record = {"input_ids": [2, 48, 43, 48], "labels": [-100, -100, -100, 48]}
    keys = content_keys(torch.tensor([record["input_ids"]]), torch.ones(1, 4))
    t = keyed_uniform(1234, keys, torch.full((1, 1), -1))[0, 0]  # eval_loss's default seed, linear schedule
    assert keyed_uniform(1234, keys, torch.arange(4)[None])[0, 3] > t, "the record no longer tests an empty draw"
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n")
    code, out, err = run(capsys, "eval", "--checkpoint", str(trained), "--data", str(path))
    assert code == 2 and "no evaluation anchor (seed 1234) masked a token" in err and "0.0000" not in out


@pytest.mark.parametrize("command, options", [
    ("train", ["--config", "--data", "--synthetic", "--tasks", "--context-lengths", "--examples-per-task",
               "--max-length", "--model", "--tiny", "--backbone", "--steps", "--batch-size", "--lr", "--seed",
               "--device", "--output", "--save-every", "--resume", "--no-progress"]),
    ("eval", ["--checkpoint", "--data", "--synthetic", "--batch-size", "--accuracy", "--max-new-tokens",
              "--no-adapt", "--sampler", "--seed"]),
    ("generate", ["--checkpoint", "--prompt", "--max-new-tokens", "--no-adapt", "--sampler", "--seed", "--device"]),
])
def test_help_of_each_command_exits_0_and_lists_its_options(capsys, command, options):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert [option for option in options if option not in out] == []


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["train", "--steps", "3"], "one of the arguments --data --synthetic is required"),
    (["train", "--synthetic", "--data", "x.jsonl"], "not allowed with"),
    (["train", "--synthetic", "--steps", "0"], "positive integer"),
    (["train", "--synthetic", "--tiny", "gpt2"], "invalid choice"),
    (["train", "--synthetic", "--tasks", "nope"], "invalid choice"),
    (["train", "--synthetic", "--lr", "-1"], "non-negative"),
    (["train", "--synthetic", "--batch-size", "two"], "must be a positive integer, got 'two'"),
    (["train", "--data", "missing.jsonl"], "--data missing.jsonl: no such file or directory"),
    (["train", "--synthetic", "--config", "missing.yaml"], "--config missing.yaml: no such file"),
    (["train", "--synthetic", "--model", "missing_model"], "--model missing_model: no such file"),
    (["train", "--synthetic", "--save-every", "2"], "--save-every needs --output"),
    (["eval", "--checkpoint", "missing_ckpt", "--synthetic"], "--checkpoint missing_ckpt: no such file"),
    (["generate", "--checkpoint", "missing_ckpt"], "--prompt"),
    (["train", "--synthetic", "--device", "nosuchdevice"], "--device nosuchdevice"),
    (["train", *SYNTHETIC, "--backbone", "nope"], "unknown backbone 'nope'"),
    (["train", *SYNTHETIC[:-1], "20"], "max_length is 20"),
])
def test_bad_arguments_exit_2_with_a_one_line_message(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_unusable_inputs_exit_2_naming_the_problem(capsys, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"input_ids": [2, 5, 6]}\n{"prompt": "x"\n')
    code, _, err = run(capsys, "train", "--data", str(bad_json), *FAST)
    assert code == 2 and f"{bad_json}:2: invalid JSON" in err

    out_of_vocab = tmp_path / "ids.jsonl"
    out_of_vocab.write_text(json.dumps({"input_ids": [2, 5, 999], "labels": [-100, 5, 999]}) + "\n")
    code, _, err = run(capsys, "train", "--data", str(out_of_vocab), *FAST)
    assert code == 2 and "[2, 999]" in err and "0..190" in err

    config = tmp_path / "run.yaml"
    config.write_text("inner:\n  stepz: 3\n")
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--config", str(config))
    assert code == 2 and "stepz" in err

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--output", str(occupied))
    assert code == 2 and "not a bilevel_dlm checkpoint" in err
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_jsonl_token_and_text_records_train_and_eval(tmp_path, capsys):
    tokenizer = build_tokenizer()
    examples = make_dataset("babi", 3, 64, seed=5)
    token_lines = []
    for example in examples[:2]:
        row = encode_example(tokenizer, example.prompt, example.answer, 80)
        token_lines.append({"input_ids": row["input_ids"].tolist(), "labels": row["labels"].tolist()})
    text_lines = [{"prompt": e.prompt, "answer": e.answer} for e in examples[2:]]
    for name, records in (("tokens", token_lines), ("text", text_lines), ("mixed", token_lines + text_lines)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        output = tmp_path / f"out-{name}"
        code, out, err = run(capsys, "train", "--data", str(path), *FAST, "--steps", "1", "--output", str(output))
        assert code == 0, (name, err)
        assert f"on {len(records)} rows" in out
        code, out, err = run(capsys, "eval", "--checkpoint", str(output), "--data", str(path))
        assert code == 0 and len(numbers_after("prompt memory:", out)) == 1, (name, err)


def test_text_records_with_a_model_folder_without_tokenizer_are_refused(tmp_path, capsys):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    tiny_model("llada", tokenizer, max_length=80).save_pretrained(tmp_path / "bare")
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"prompt": "where is mary ?", "answer": "garden"}) + "\n")
    code, _, err = run(capsys, "train", "--data", str(path), "--model", str(tmp_path / "bare"), *FAST)
    assert code == 2 and "need a tokenizer" in err and "bare" in err


def test_model_folder_with_its_tokenizer_trains(tmp_path, capsys):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    tiny_model("llada", tokenizer, max_length=80).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--steps", "1", "--model", str(folder),
                       "--output", str(tmp_path / "from-hf"))
    assert code == 0, err
    loaded = MemoryWrapper.from_pretrained(tmp_path / "from-hf")
    assert loaded.backbone.name == "llada" and len(loaded.tokenizer) == len(tokenizer)


def test_checkpoint_as_model_keeps_its_config_weights_and_learned_inner_rates(tmp_path, capsys):
    config = tmp_path / "metasgd.yaml"
    config.write_text("memory: {rank: 4, layer_fraction: 0.25}\ninner: {mode: unrolled, optimizer: metasgd}\n")
    first = tmp_path / "first"
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--config", str(config), "--output", str(first))
    assert code == 0, err
    # continuing with a zero learning rate (and the checkpoint's own config) changes nothing it learned
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--lr", "0", "--model", str(first),
                       "--output", str(tmp_path / "continued"))
    assert code == 0, err
    before, after = MemoryWrapper.from_pretrained(first), MemoryWrapper.from_pretrained(tmp_path / "continued")
    assert after.config.inner.optimizer == "metasgd" and after.config.memory.rank == 4
    state_before, state_after = before.model.state_dict(), after.model.state_dict()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    rates_before, rates_after = before.inner.meta_parameters(), after.inner.meta_parameters()
    fresh = MemoryWrapper(before.model, before.config).inner.meta_parameters()
    assert any(not torch.equal(t, f) for t, f in zip(rates_before, fresh)), "3 steps did not train the rates"
    assert all(torch.equal(b, a) for b, a in zip(rates_before, rates_after))


def test_resume_from_a_periodic_checkpoint_reproduces_the_uninterrupted_run(tmp_path, capsys):
    full = tmp_path / "full"
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--steps", "4", "--save-every", "2", "--output", str(full))
    assert code == 0, err
    middle = tmp_path / "full-checkpoints" / "checkpoint-2"
    assert (tmp_path / "full-checkpoints" / "checkpoint-4").exists() and middle.exists()
    assert MemoryWrapper.from_pretrained(middle).trained_on["tasks"] == ["babi"], "periodic checkpoints record the data"
    resumed = tmp_path / "resumed"
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--steps", "4", "--resume", str(middle),
                       "--output", str(resumed))
    assert code == 0, err
    expected, got = weights(full), weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("family, model_class", [("dream", "DreamModel"), ("llada_moe", "LLaDAMoEModelLM"),
                                                 ("mdlm", "MDLM")])
def test_tiny_models_of_every_family_train_and_reload(tmp_path, capsys, family, model_class):
    output = tmp_path / family
    code, _, err = run(capsys, "train", *SYNTHETIC, *FAST, "--steps", "1", "--tiny", family, "--output", str(output))
    assert code == 0, err
    loaded = MemoryWrapper.from_pretrained(output)
    assert type(loaded.model).__name__ == model_class and loaded.backbone.name == family
    tokenizer = loaded.tokenizer
    ids = torch.tensor([[tokenizer.bos_token_id] + [tokenizer.mask_token_id] * 9])
    with torch.no_grad():
        logits = loaded.view.logits(ids)
    predictable = torch.arange(len(tokenizer)) != tokenizer.mask_token_id  # MDLM's SUBS sets the mask to -inf
    assert logits.shape == (1, 10, len(tokenizer)) and torch.isfinite(logits[:, 1:, predictable]).all()


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def test_decode_stops_at_the_first_eos_and_drops_special_tokens():
    tokenizer = build_tokenizer()
    words = tokenizer.convert_tokens_to_ids(["where", "is", "mary"])
    ids = torch.tensor([tokenizer.bos_token_id, *words[:2], tokenizer.mask_token_id, tokenizer.eos_token_id, words[2]])
    assert decode(tokenizer, ids) == "where is"
    assert decode(tokenizer, torch.tensor(words)) == "where is mary"


@pytest.fixture(scope="module")
def untrained_llada2(tmp_path_factory) -> Path:
    """A checkpoint of the randomly initialised tiny LLaDA2 (lr 0)."""
    output = tmp_path_factory.mktemp("run") / "random_llada2"
    assert main(["train", *SYNTHETIC, *FAST, "--tiny", "llada2", "--steps", "1", "--lr", "0", "--output", str(output)]) == 0
    return output


@pytest.mark.parametrize("options, settings", [
    ([], {}),
    (["--no-adapt"], {"adapt": False}),
    (["--sampler", "steps=2", "--sampler", "temperature=0.5", "--seed", "7"],
     {"steps": 2, "temperature": 0.5, "seed": 7}),
    (["--sampler", "threshold=0.02", "--sampler", "threshold_rule=share", "--sampler", "steps=4"],
     {"threshold": 0.02, "threshold_rule": "share", "steps": 4}),
])
def test_generate_prints_one_decoded_line_per_prompt(untrained, capsys, options, settings):
    assert_generate_prints_the_library_s_generations(untrained, capsys, options, settings)


def test_generate_takes_llada21_token_editing(untrained_llada2, capsys):
    options = ["--sampler", "editing_threshold=0.05", "--sampler", "block_length=4", "--sampler", "threshold=0.5"]
    assert_generate_prints_the_library_s_generations(untrained_llada2, capsys, options, {
        "editing_threshold": 0.05, "block_length": 4, "threshold": 0.5})


def assert_generate_prints_the_library_s_generations(checkpoint: Path, capsys, options: list[str], settings: dict):
    prompts = ["mary went to the kitchen .\nquestion: where is mary ?\nanswer:", "var alpha = 1 2 .\nanswer:"]
    code, out, err = run(capsys, "generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "4",
                         *[arg for prompt in prompts for arg in ("--prompt", prompt)], *options)
    assert code == 0, err
    assert out.endswith("\n")
    lines = out.split("\n")[:-1]  # a generation may be empty (EOS first); its line is still printed

    wrapper = MemoryWrapper.from_pretrained(checkpoint)
    tokenizer = wrapper.tokenizer
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = wrapper.generate(ids, max_new_tokens=4, **settings)[0, ids.shape[1]:].tolist()
        expected.append(tokenizer.decode(until_eos(generated, tokenizer.eos_token_id), skip_special_tokens=True))
    assert lines == expected and any(lines), "an empty generation everywhere would test little"


def test_bad_sampler_settings_exit_2_before_any_generation(untrained, capsys):
    for setting, message in (("stepz=3", "stepz"), ("steps=0", "steps"), ("steps", "KEY=VALUE")):
        code, out, err = run(capsys, "generate", "--checkpoint", str(untrained), "--prompt", "where is mary ?",
                             "--sampler", setting)
        assert code == 2 and message in err and out == "", setting


def test_eval_accuracy_counts_exact_matches_of_generated_answers(trained, capsys):
    code, out, err = run(capsys, "eval", "--checkpoint", str(trained), *SYNTHETIC, "--accuracy", "--batch-size", "1")
    assert code == 0, err
    match = re.search(r"exact match: ([\d.]+) \((\d+)/(\d+)\)", out)
    assert match is not None and int(match[3]) == 4

    wrapper = MemoryWrapper.from_pretrained(trained)
    tokenizer = wrapper.tokenizer
    correct = 0
    for example in make_dataset("babi", 4, 64, seed=1):  # eval's default data seed
        ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]  # <bos> prompt, as in training rows
        generated = wrapper.generate(ids, max_new_tokens=80 - ids.shape[1])[0, ids.shape[1]:].tolist()
        text = tokenizer.decode(until_eos(generated, tokenizer.eos_token_id), skip_special_tokens=True)
        correct += exact_match(text, example.answer)
    assert int(match[2]) == correct and float(match[1]) == pytest.approx(correct / 4, abs=1e-4)


def test_console_script_runs(tmp_path):
    script = shutil.which("bilevel-dlm", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "bilevel_dlm.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("train", "eval", "generate"))
