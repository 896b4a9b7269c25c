"""Bad input and faults: nothing hangs, nothing turns NaN silently, no trained model is lost (issue #9)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig, TrajectoryConfig
from bilevel_dlm.checkpoint import CONFIG, HISTORY, META, MODEL_DIR, CheckpointError, resolve_checkpoint
from bilevel_dlm.state_files import STATE_JSON, STATE_TENSORS
from bilevel_dlm.cli import main
from bilevel_dlm.integrations.dream import DreamModel
from bilevel_dlm.integrations.dream import tiny_config as dream_config
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.training import TrainingDiverged
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments


def tiny(seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config())


def recipe(**sections) -> MemDLMConfig:
    values = dict(memory=MemoryConfig(rank=4, layer_fraction=0.25),
                  outer=OuterConfig(lr=3e-3, warmup_ratio=0.0, lr_schedule="constant"))
    values.update(sections)
    return MemDLMConfig(**values)


def examples(n: int = 6, length: int = 12, prompt: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, 127, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----- 1. no supervised token anywhere ---------------------------------------------------------------
def test_fit_raises_after_a_full_pass_without_a_maskable_token() -> None:
    data = [{**e, "labels": torch.full_like(e["labels"], -100)} for e in examples()]
    wrapper = MemoryWrapper(tiny(), recipe())
    with pytest.raises(ValueError, match=r"full pass over the training data(?s:.*)-100"):
        wrapper.fit(data, max_steps=5, batch_size=2, progress=False)
    # one epoch of 6 examples in batches of 2 is known complete when the next epoch's first batch comes
    assert wrapper.skipped_batches == 4


def test_the_trainer_raises_after_a_full_pass_without_a_maskable_token(tmp_path) -> None:
    data = [{**e, "labels": torch.full_like(e["labels"], -100)} for e in examples()]
    args = MemDLMTrainingArguments(output_dir=str(tmp_path), memdlm=recipe(), max_steps=10,
                                   per_device_train_batch_size=2, use_cpu=True, report_to=[], save_strategy="no",
                                   disable_tqdm=True)
    with pytest.raises(ValueError, match="full pass over the training data"):
        MemDLMTrainer(tiny(), args, train_dataset=data).train()


# ----- 2. divergence ------------------------------------------------------------------------------------
def test_adam_in_unrolled_mode_stays_finite() -> None:
    """Adam's sqrt at a zero second moment (LoRA A while B = 0) has an infinite derivative."""
    model = tiny()
    wrapper = MemoryWrapper(model, recipe(inner=InnerConfig(optimizer="adam", lr=1e-2, mode="unrolled")))
    for _ in range(3):
        metrics = wrapper.step(pad(examples(4)))
        assert "nonfinite" not in metrics and all(math.isfinite(v) for v in metrics.values())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def pad(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


@pytest.mark.parametrize("cause", ["outer_lr", "inner_lr", "nan_weight"])
def test_divergence_is_skipped_then_stops_with_the_last_finite_weights(cause: str) -> None:
    model = tiny()
    # (At 1e4 / 1e8 this tiny model saturates to zero gradients instead: finite, so not skipped.)
    sections = {"outer_lr": dict(outer=OuterConfig(lr=1e30, warmup_ratio=0.0, lr_schedule="constant", max_grad_norm=None)),
                "inner_lr": dict(inner=InnerConfig(lr=1e30, clip=None)),
                "nan_weight": {}}[cause]
    wrapper = MemoryWrapper(model, recipe(**sections))
    if cause == "nan_weight":
        with torch.no_grad():
            model.model.transformer.blocks[0].ff_proj.weight[0, 0] = float("nan")
    batch = pad(examples(4))
    last_finite = weights(model)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingDiverged, match="3 steps in a row"):
        warnings.simplefilter("always")
        for _ in range(20):
            metrics = wrapper.step(batch)
            if "nonfinite" not in metrics:
                last_finite = weights(model)
    assert sum("non-finite" in str(w.message) for w in caught) == 2
    after = weights(model)
    assert all(torch.equal(after[k], v) or (torch.isnan(after[k]) == torch.isnan(v)).all() for k, v in last_finite.items())
    assert all(torch.equal(torch.nan_to_num(after[k]), torch.nan_to_num(v)) for k, v in last_finite.items())


def test_fit_records_a_skipped_nonfinite_step_and_reports_nan_not_zero() -> None:
    model = tiny()
    wrapper = MemoryWrapper(model, recipe())
    weight = model.model.transformer.blocks[3].ff_out.weight  # a block with fast weights

    def batches():  # the second batch meets a poisoned weight, restored before the third
        original = weight[0, 0].item()
        for index in range(4):
            with torch.no_grad():
                weight[0, 0] = float("inf") if index == 1 else original
            yield pad(examples(2, seed=index))

    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = wrapper.fit(batches(), max_steps=3, progress=False)
    assert history.nonfinite_steps == [2] and history.steps == [1, 2, 3]
    assert all(math.isfinite(v) for v in history.outer_loss)
    with torch.no_grad():
        weight[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning):
        metrics = wrapper.step(pad(examples(2)))
    assert "nonfinite" in metrics and not math.isfinite(metrics["inner_grad_norm_1"]), metrics


def test_the_trainer_skips_nonfinite_steps_and_stops(tmp_path) -> None:
    model = tiny()
    with torch.no_grad():
        model.model.transformer.blocks[0].ff_proj.weight[0, 0] = float("nan")
    before = weights(model)
    args = MemDLMTrainingArguments(output_dir=str(tmp_path), memdlm=recipe(), max_steps=10,
                                   per_device_train_batch_size=2, use_cpu=True, report_to=[], save_strategy="no",
                                   disable_tqdm=True)
    trainer = MemDLMTrainer(model, args, train_dataset=examples())
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train()
    after = weights(model)
    assert all(torch.equal(torch.nan_to_num(after[k]), torch.nan_to_num(v)) for k, v in before.items())


# ----- 4. checkpoints ------------------------------------------------------------------------------------
@pytest.fixture()
def checkpoints(tmp_path):
    wrapper = MemoryWrapper(tiny(), recipe(inner=InnerConfig(lr=0.05, steps=3), seed=7))
    wrapper.fit(examples(), max_steps=4, batch_size=2, save_every=2, output_dir=tmp_path / "run", progress=False)
    return tmp_path / "run"


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", [CONFIG, f"{MODEL_DIR}/model.safetensors", STATE_TENSORS, STATE_JSON, META])
def test_a_damaged_checkpoint_file_is_named_with_the_fix(checkpoints, name: str) -> None:
    target = checkpoints / "checkpoint-4" / name
    if name == CONFIG:
        target.write_text("")
    else:
        _truncate(target)
    with pytest.raises(CheckpointError, match=rf"{name}(?s:.*)resume from .*checkpoint-2 instead"):
        MemoryWrapper.from_pretrained(checkpoints / "checkpoint-4")
    with pytest.raises(CheckpointError, match=name):
        MemoryWrapper(tiny(), recipe()).fit(examples(), max_steps=6, batch_size=2, progress=False,
                                            resume_from=checkpoints / "checkpoint-4")


def test_the_newest_valid_checkpoint_is_chosen_from_a_folder(checkpoints) -> None:
    assert resolve_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    _truncate(checkpoints / "checkpoint-4" / STATE_TENSORS)
    assert resolve_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    loaded = MemoryWrapper.from_pretrained(checkpoints)
    assert (loaded.config.inner.lr, loaded.config.inner.steps, loaded.config.seed) == (0.05, 3, 7)


def test_an_empty_config_file_is_an_error_not_the_preset(tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    with pytest.raises(ValueError, match="recipe.yaml is empty"):
        MemDLMConfig.from_yaml(path)
    path.write_text("inner: {lr: 0.05\n")
    with pytest.raises(ValueError, match="recipe.yaml: invalid YAML"):
        MemDLMConfig.from_yaml(path)


def test_checkpoint_folders_follow_the_umask(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        path = MemoryWrapper(tiny(), recipe()).save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == 0o755


# ----- 5. data errors ------------------------------------------------------------------------------------
def test_empty_inputs_are_refused_with_a_message() -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    with pytest.raises(ValueError, match="at least one row and one token"):
        wrapper.adapt(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one row and one token"):
        wrapper.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2, adapt=False)


def test_an_example_with_labels_of_another_length_is_named() -> None:
    data = examples(4)
    data[2] = {**data[2], "labels": data[2]["labels"][:-3]}
    with pytest.raises(ValueError, match=r"example [01] of the batch: 'labels' has 9 entries but 'input_ids' 12"):
        MemoryWrapper(tiny(), recipe()).fit(data[2:], max_steps=1, batch_size=2, progress=False)


@pytest.mark.parametrize("bad_id", [5000, -5])
def test_token_ids_outside_the_vocabulary_are_refused(bad_id: int) -> None:
    batch = pad(examples(2))
    batch["input_ids"][1, 5] = bad_id
    wrapper = MemoryWrapper(tiny(), recipe())
    with pytest.raises(ValueError, match=r"token ids in \[-?\d+, \d+\] but the model takes 0\.\.127"):
        wrapper.step(batch)
    with pytest.raises(ValueError, match="0..127"):
        wrapper.adapt(batch["input_ids"])


def test_sequences_longer_than_the_model_are_refused() -> None:
    torch.manual_seed(0)
    wrapper = MemoryWrapper(LLaDAModelLM(tiny_config(max_sequence_length=16)), recipe())
    with pytest.raises(ValueError, match="20 tokens exceed the model's maximum length 16"):
        wrapper.step(pad(examples(2, length=20)))


def test_prompts_that_are_all_padding_are_refused() -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    ids = torch.randint(2, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match="all padding"):
        wrapper.adapt(ids, mask)


def test_a_wrong_backbone_names_the_expected_module_path() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'llada' adapter expects the transformer blocks at 'model.transformer.blocks'"):
        MemoryWrapper(DreamModel(dream_config()), recipe(), backbone="llada")


# ----- 6. configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: InnerConfig(lr=float("inf")),
    lambda: InnerConfig(lr=float("nan")),
    lambda: OuterConfig(lr=float("inf")),
    lambda: TrajectoryConfig(progressive_start=0.2, progressive_end=0.9),
    lambda: MemoryConfig(rank="16"),
    lambda: InnerConfig(steps=2.0),
    lambda: MemDLMConfig(seed="1"),
])
def test_nonsense_config_values_are_refused(build) -> None:
    with pytest.raises(ValidationError):
        build()


def test_yaml_keeps_its_natural_types(tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("memory: {rank: 16, targets: [ff_proj, up_proj]}\nouter: {betas: [0.9, 0.95], lr: 1}\n")
    config = MemDLMConfig.from_yaml(path)
    assert (config.memory.rank, config.memory.targets, config.outer.betas, config.outer.lr) == (
        16, ("ff_proj", "up_proj"), (0.9, 0.95), 1.0)
    path.write_text("memory: {rank: '16'}\n")
    with pytest.raises(ValidationError, match="rank"):
        MemDLMConfig.from_yaml(path)


# ----- 3 and 7: the command line keeps the trained model ----------------------------------------------
SYNTHETIC = ["--synthetic", "--tasks", "babi", "--context-lengths", "64", "--examples-per-task", "4",
             "--max-length", "80"]
FAST = ["--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--no-progress"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_unusable_output_fails_before_training(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--output", str(blocker / "run"))
    assert code == 2 and "cannot write there" in err and len(err.strip().splitlines()) == 1
    assert "trained" not in out


def test_a_failed_final_save_says_where_the_last_checkpoint_is(tmp_path, capsys, monkeypatch) -> None:
    """Fault injection: the disk fills up when the final model is written."""
    original = MemoryWrapper.save_pretrained

    def full_disk(self, directory, **kwargs):
        if Path(directory).name == "run":
            raise OSError(28, "No space left on device")
        return original(self, directory, **kwargs)

    monkeypatch.setattr(MemoryWrapper, "save_pretrained", full_disk)
    code, _, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--save-every", "2", "--output", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "No space left on device" in err and str(tmp_path / "run-checkpoints" / "checkpoint-4") in err
    assert MemoryWrapper.from_pretrained(tmp_path / "run-checkpoints" / "checkpoint-4") is not None


def test_checkpoints_carry_their_history_and_resume_takes_the_newest_valid(tmp_path, capsys) -> None:
    output = tmp_path / "run"
    assert cli(capsys, "train", *SYNTHETIC, *FAST, "--save-every", "2", "--eval-every", "2",
               "--output", str(output))[0] == 0
    history = json.loads((output.with_name("run-checkpoints") / "checkpoint-4" / HISTORY).read_text())
    assert history["steps"] == [1, 2, 3, 4] and history["eval_steps"] == [2, 4] and history["variant"] == "MemDLM"
    assert json.loads((output / HISTORY).read_text())["eval_steps"] == [2, 4]
    folder = output.with_name("run-checkpoints")
    (folder / "checkpoint-4" / STATE_TENSORS).write_bytes(b"")
    code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--steps", "6", "--save-every", "2",
                         "--resume", str(folder), "--output", str(tmp_path / "resumed"), "--allow-changes")
    assert code == 0, err
    resumed = json.loads((tmp_path / "resumed" / HISTORY).read_text())
    assert resumed["steps"] == [1, 2, 3, 4, 5, 6]  # from checkpoint-2: steps 3..6 trained again
    assert resumed["changes"] == [{"step": 2, "changes": ["max_steps: 4 -> 6"]}]


def test_every_command_takes_no_progress(tmp_path, capsys) -> None:
    output = tmp_path / "run"
    assert cli(capsys, "train", *SYNTHETIC, *FAST, "--output", str(output))[0] == 0
    code, out, err = cli(capsys, "eval", "--checkpoint", str(output), *SYNTHETIC, "--no-progress")
    assert code == 0 and "eval loss" in out and "%|" not in err
    code, out, err = cli(capsys, "generate", "--checkpoint", str(output), "--prompt", "where is mary?",
                         "--max-new-tokens", "2", "--no-progress")
    assert code == 0 and "%|" not in err


def test_help_is_plain_text_and_imports_no_torch() -> None:
    probe = ("import sys, contextlib, io; from bilevel_dlm.cli import main; out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out): code = main(['train', '--help'])\n"
             "print(code, 'torch' in sys.modules, '``' in out.getvalue())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "False", "False"], result.stderr


def test_ctrl_c_prints_the_resume_command_and_exits_130(tmp_path) -> None:
    output = tmp_path / "run"
    argv = ["train", *SYNTHETIC, "--steps", "100000", "--batch-size", "2", "--no-progress", "--save-every", "2",
            "--output", str(output)]
    process = subprocess.Popen([sys.executable, "-m", "bilevel_dlm.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (output.with_name("run-checkpoints") / "checkpoint-4").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    command = shlex.split(err.split("resume with: ", 1)[1])
    checkpoint = Path(command[command.index("--resume") + 1])
    assert checkpoint.parent == output.with_name("run-checkpoints") and checkpoint.name.startswith("checkpoint-")
    assert command[0] == "bilevel-dlm" and command[1:command.index("--resume")] == argv
    step = int(checkpoint.name.split("-")[1])
    command[command.index("--steps") + 1] = str(step + 2)
    assert main([*command[1:], "--allow-changes"]) == 0
    assert json.loads((output / HISTORY).read_text())["steps"][-1] == step + 2


def test_the_parser_choices_are_the_libraries_tasks_and_families() -> None:
    from bilevel_dlm.cli import FAMILY_NAMES, TASK_NAMES
    from bilevel_dlm.integrations import TINY_FAMILIES
    from bilevel_dlm.tasks import TASKS

    assert TASK_NAMES == tuple(TASKS) and FAMILY_NAMES == TINY_FAMILIES


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe", "mdlm"])
def test_load_pretrained_picks_the_native_class_of_every_family(tmp_path, family) -> None:
    from bilevel_dlm.integrations import load_pretrained, tiny_model
    from bilevel_dlm.tasks import build_tokenizer

    model = tiny_model(family, build_tokenizer())
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_the_trainer_example_trains_any_family(tmp_path) -> None:
    from bilevel_dlm.integrations import tiny_model
    from bilevel_dlm.tasks import build_tokenizer

    tiny_model("dream", build_tokenizer()).save_pretrained(tmp_path / "model")
    with (tmp_path / "train.jsonl").open("w") as lines:
        for row in examples(4):
            lines.write(json.dumps({k: v.tolist() for k, v in row.items()}) + "\n")
    example = Path(__file__).parents[1] / "examples" / "memdlm_trainer.py"
    result = subprocess.run([sys.executable, str(example), "--model", str(tmp_path / "model"), "--train_file",
                             str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                             "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
                             "--save_strategy", "no", "--disable_tqdm", "true"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_trainer_example_trains_a_4bit_base_through_the_recipes_outer_lora(tmp_path) -> None:
    from bilevel_dlm.integrations import tiny_model
    from bilevel_dlm.tasks import build_tokenizer

    tiny_model("llada", build_tokenizer()).save_pretrained(tmp_path / "model")
    with (tmp_path / "train.jsonl").open("w") as lines:
        for row in examples(4):
            lines.write(json.dumps({k: v.tolist() for k, v in row.items()}) + "\n")
    MemDLMConfig(outer=OuterConfig(lora={"apply": True, "rank": 4, "alpha": 8.0, "dropout": 0.0}),
                 memory=MemoryConfig(rank=4)).to_yaml(tmp_path / "recipe.yaml")
    example = Path(__file__).parents[1] / "examples" / "memdlm_trainer.py"
    command = [sys.executable, str(example), "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.jsonl"),
               "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
               "--memdlm", str(tmp_path / "recipe.yaml"), "--load_in_4bit"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    folder = Path(__file__).parents[1] / "examples" / "accelerate"
    kinds = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED"}
    for name, kind in kinds.items():
        config = ClusterConfig.from_yaml_file(str(folder / f"{name}.yaml"))
        assert config.distributed_type.name == kind and config.num_processes == 8
    assert ClusterConfig.from_yaml_file(str(folder / "fsdp2.yaml")).fsdp_config["fsdp_version"] == 2
    assert ClusterConfig.from_yaml_file(str(folder / "zero2.yaml")).deepspeed_config["zero_stage"] == 2
