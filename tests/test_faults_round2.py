"""Faults, round 2 (issue #25): a locked output folder, Ctrl-C that saves the state it interrupts, resumes that
would silently become another run, generation past the model's length or with unknown words, messages where
a checkpoint folder falls back or holds nothing, one line instead of a traceback, and inputs that hold the
mask token or labels that are not the input token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from bilevel_dlm import MemoryWrapper
from bilevel_dlm.checkpoint import CheckpointSaveError, resolve_checkpoint
from bilevel_dlm.state_files import STATE_TENSORS
from bilevel_dlm.training import TrainingInterrupted
from test_faults import FAST, SYNTHETIC, cli, examples, recipe, tiny, weights


# ----- 1. one writer per output folder ----------------------------------------------------------------------
def test_a_second_run_on_a_locked_output_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys) -> None:
    output = tmp_path / "run"
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
              "time.sleep(60)")
    sleeper = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "run.lock")], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert sleeper.stdout.readline().strip() == "held"
        code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--output", str(output))
        assert code == 2 and f"in use by process {sleeper.pid}" in err and len(err.strip().splitlines()) == 1
        assert not (output / "bilevel_dlm.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--output", str(output))  # killed: its lock is gone
    assert code == 0 and f"taking over the lock {tmp_path / 'run.lock'} of process {sleeper.pid}" in err
    assert (output / "bilevel_dlm.json").exists() and not (tmp_path / "run.lock").exists()


# ----- 2. Ctrl-C keeps the state it interrupts ----------------------------------------------------------------
def test_ctrl_c_mid_step_saves_the_state_after_the_step_and_the_resume_is_exact(tmp_path) -> None:
    data, config = examples(8), recipe()
    plain = MemoryWrapper(tiny(), config)
    plain.fit(data, max_steps=6, batch_size=2, progress=False)

    interrupted = MemoryWrapper(tiny(), config)
    forwards = []
    handle = interrupted.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    interrupted.fit(data[:2], max_steps=1, batch_size=2, progress=False)  # count the forwards of one step
    handle.remove()
    per_step = len(forwards)
    interrupted = MemoryWrapper(tiny(), config)
    count = [0]

    def hook(*_):
        count[0] += 1
        if count[0] == 2 * per_step + 2:  # inside step 3, before its update
            signal.raise_signal(signal.SIGINT)

    interrupted.model.register_forward_pre_hook(hook)
    with pytest.raises(TrainingInterrupted) as caught:
        interrupted.fit(data, max_steps=6, batch_size=2, output_dir=tmp_path / "ckpts", progress=False)
    assert caught.value.step == 3 and caught.value.checkpoint == tmp_path / "ckpts" / "checkpoint-3"
    resumed = MemoryWrapper(tiny(1), config)
    history = resumed.fit(data, max_steps=6, batch_size=2, resume_from=caught.value.checkpoint, progress=False)
    assert history.steps == [1, 2, 3, 4, 5, 6]
    expected = weights(plain.model)
    assert all(torch.equal(value, expected[name]) for name, value in weights(resumed.model).items())


def test_ctrl_c_without_an_output_dir_says_that_nothing_was_saved() -> None:
    wrapper = MemoryWrapper(tiny(), recipe())

    def once(*_) -> None:
        handle.remove()
        signal.raise_signal(signal.SIGINT)

    handle = wrapper.model.register_forward_pre_hook(once)
    with pytest.raises(TrainingInterrupted, match="interrupted after step 1; no output_dir"):  # lands after the step
        wrapper.fit(examples(), max_steps=3, batch_size=2, progress=False)


def test_a_second_ctrl_c_abandons_the_step_at_once_and_saves_nothing(tmp_path) -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    wrapper.model.register_forward_pre_hook(lambda *_: signal.raise_signal(signal.SIGINT))  # every forward
    with pytest.raises(TrainingInterrupted, match="interrupted after step 0; interrupted twice.*nothing saved"):
        wrapper.fit(examples(), max_steps=3, batch_size=2, output_dir=tmp_path / "ckpts", progress=False)
    assert not (tmp_path / "ckpts").exists() and wrapper.updates == 0


@pytest.fixture()
def default_sigint():
    """Python's own Ctrl-C handler for the test: a shell starts its background jobs with SIGINT ignored and
    Python then keeps it ignored, so a SIGINT raised outside fit's held blocks would do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_eval_cut_short_by_ctrl_c_leaves_the_history_aligned(tmp_path, default_sigint) -> None:
    """Ctrl-C in the first eval forward at step 2: the saved history holds no half-recorded eval."""
    wrapper = MemoryWrapper(tiny(), recipe())
    calls = {"eval": 0}

    def hook(module, args):
        if not torch.is_grad_enabled() and not module.training:
            calls["eval"] += 1
            if calls["eval"] == 1:
                signal.raise_signal(signal.SIGINT)

    wrapper.model.register_forward_pre_hook(hook)
    with pytest.raises(TrainingInterrupted) as caught:
        wrapper.fit(examples(8), eval_data=examples(4, seed=3), eval_every=2, max_steps=4, batch_size=2,
                    output_dir=tmp_path / "ckpts", progress=False)
    history = json.loads((caught.value.checkpoint / "history.json").read_text())
    assert caught.value.step == 2 and history["eval_steps"] == [] and history["eval_loss"] == []


def test_ctrl_c_of_the_command_line_before_any_periodic_save_leaves_a_resumable_checkpoint(tmp_path) -> None:
    output = tmp_path / "run"
    argv = ["train", *SYNTHETIC, "--steps", "100000", "--batch-size", "2", "--no-progress", "--save-every", "100000",
            "--output", str(output)]
    process = subprocess.Popen([sys.executable, "-m", "bilevel_dlm.cli", *argv], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock = tmp_path / "run.lock"
    while not lock.exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(3.0)  # past the set-up, into the training steps
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "saved" in err and "resume with: bilevel-dlm train" in err and not lock.exists()
    checkpoint = resolve_checkpoint(tmp_path / "run-checkpoints")
    assert MemoryWrapper.from_pretrained(checkpoint) is not None


# ----- 4. a resume continues the same run ---------------------------------------------------------------------
@pytest.fixture()
def run_checkpoint(tmp_path):
    wrapper = MemoryWrapper(tiny(), recipe())
    wrapper.fit(examples(8), max_steps=4, batch_size=2, save_every=2, output_dir=tmp_path / "ckpts", progress=False)
    return tmp_path / "ckpts" / "checkpoint-2"


@pytest.mark.parametrize("change, differs", [
    (dict(batch_size=4), "batch_size: 2 -> 4"),
    (dict(data=examples(8, seed=1)), "data.sha256"),
    (dict(data=examples(7)), "data.examples: 8 -> 7"),
    (dict(config=recipe(seed=5)), "config.seed: 0 -> 5"),
    (dict(max_steps=6), "max_steps: 4 -> 6"),
])
def test_a_resume_that_changes_the_run_is_refused_or_recorded(run_checkpoint, change, differs) -> None:
    settings = dict(batch_size=2, max_steps=4, data=examples(8), config=recipe()) | change
    wrapper = MemoryWrapper(tiny(), settings["config"])
    with pytest.raises(ValueError, match=rf"would change the run: .*{differs}.*allow_changes=True"):
        wrapper.fit(settings["data"], max_steps=settings["max_steps"], batch_size=settings["batch_size"],
                    resume_from=run_checkpoint, progress=False)
    with pytest.warns(UserWarning, match="with changes"):
        history = wrapper.fit(settings["data"], max_steps=settings["max_steps"], batch_size=settings["batch_size"],
                              resume_from=run_checkpoint, allow_changes=True, progress=False)
    assert history.changes and history.changes[0]["step"] == 2 and differs in " ".join(history.changes[0]["changes"])


def test_a_resume_past_max_steps_is_refused(tmp_path, capsys) -> None:
    output = tmp_path / "run"
    assert cli(capsys, "train", *SYNTHETIC, *FAST, "--save-every", "4", "--output", str(output))[0] == 0
    code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--steps", "2", "--resume",
                         str(tmp_path / "run-checkpoints" / "checkpoint-4"), "--output", str(tmp_path / "again"))
    assert code == 2 and "is at step 4, past max_steps=2" in err and "trained to step" not in out


def test_the_same_settings_resume_silently(run_checkpoint) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MemoryWrapper(tiny(), recipe()).fit(examples(8), max_steps=4, batch_size=2, resume_from=run_checkpoint,
                                            progress=False)


# ----- 5. generation validated as training is ------------------------------------------------------------------
def test_generation_past_the_model_s_maximum_length_is_refused(tmp_path, capsys) -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    limit = wrapper.max_length
    with pytest.raises(ValueError, match=rf"needs {limit + 8} positions, more than the model's maximum length {limit}"):
        wrapper.generate(torch.randint(2, 120, (1, limit - 56)), max_new_tokens=64)
    output = tmp_path / "run"
    assert cli(capsys, "train", *SYNTHETIC, *FAST, "--output", str(output))[0] == 0
    code, out, err = cli(capsys, "generate", "--checkpoint", str(output), "--prompt", "mary went to Zurich",
                         "--no-progress")
    assert code == 2 and "['Zurich']" in err and out == ""
    code, out, err = cli(capsys, "generate", "--checkpoint", str(output), "--prompt", "mary went to the kitchen",
                         "--max-new-tokens", "100000", "--no-progress")
    assert code == 2 and "more than the model's maximum length" in err and len(err.strip().splitlines()) == 1


# ----- 7. say what happened ----------------------------------------------------------------------------------
def test_a_damaged_newest_checkpoint_is_named_when_the_previous_one_is_used(run_checkpoint) -> None:
    folder = run_checkpoint.parent
    (folder / "checkpoint-4" / STATE_TENSORS).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"checkpoint-4 is damaged .*using .*checkpoint-2"):
        assert resolve_checkpoint(folder) == run_checkpoint


def test_resuming_from_an_empty_folder_names_it_and_what_was_expected(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--resume", str(tmp_path / "empty"))
    assert code == 2 and f"no bilevel_dlm checkpoint at {tmp_path / 'empty'} (it is empty)" in err
    assert "checkpoint-<step>" in err


def test_save_every_beyond_the_run_is_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"save_every=50 but the run trains steps 1\.\.3: no periodic checkpoint"):
        MemoryWrapper(tiny(), recipe()).fit(examples(), max_steps=3, batch_size=2, save_every=50,
                                            output_dir="unused", progress=False)


# ----- 8. one line, the promised exit codes --------------------------------------------------------------------
def test_a_failed_periodic_save_is_one_line_naming_the_surviving_checkpoint(tmp_path, capsys, monkeypatch) -> None:
    import safetensors.torch

    saves = {"count": 0}
    original = safetensors.torch.save_file

    def second_save_fails(*args, **kwargs):
        saves["count"] += 1
        if saves["count"] == 2:  # the training state of the second periodic checkpoint
            raise safetensors.SafetensorError("No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", second_save_fails)
    code, out, err = cli(capsys, "train", *SYNTHETIC, *FAST, "--save-every", "2", "--output", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert f"the last complete checkpoint is {tmp_path / 'run-checkpoints' / 'checkpoint-2'}" in err


def test_saving_to_a_read_only_folder_is_a_clear_error(tmp_path) -> None:
    if os.geteuid() == 0:
        folder = tmp_path / "not-a-dir"
        folder.write_text("a file where the parent folder should be")
        target = folder / "ckpt"
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        target = folder / "ckpt"
    with pytest.raises(CheckpointSaveError, match=f"writing {target} failed"):
        MemoryWrapper(tiny(), recipe()).save_pretrained(target)


@pytest.mark.parametrize("batch, message", [
    ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "a batch needs 'input_ids'"),
    ({"input_ids": torch.randint(2, 120, (2, 6)), "attention_mask": torch.ones(2, 5, dtype=torch.long)},
     "'attention_mask' has shape"),
])
def test_malformed_batches_are_one_clear_value_error(batch, message) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryWrapper(tiny(), recipe()).step(batch)


def test_a_bool_attention_mask_is_taken_as_the_integer_one() -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    ids = torch.randint(2, 120, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(wrapper.prepare({"input_ids": ids, "attention_mask": mask.bool()}).attention_mask, mask)


# ----- 9. inputs a masked diffusion objective cannot mean ------------------------------------------------------
def test_the_mask_token_in_inputs_and_labels_other_than_the_input_are_refused() -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    ids = torch.randint(2, 120, (2, 6))
    with pytest.raises(ValueError, match=rf"holds the mask token \(id {wrapper.mask_token_id}\) at 1 attended"):
        wrapper.step({"input_ids": ids.index_fill(1, torch.tensor([3]), wrapper.mask_token_id)[:1]})
    padded = ids.clone()
    padded[0, 0] = wrapper.mask_token_id  # under padding: not read
    wrapper.prepare({"input_ids": padded, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])})
    labels = ids.clone()
    labels[1, 4] = (labels[1, 4] + 1) % 120
    with pytest.raises(ValueError, match="1 label\\(s\\) of attended positions are neither -100 nor the input token"):
        wrapper.step({"input_ids": ids, "labels": labels})
    with pytest.raises(ValueError, match="holds the mask token"):
        wrapper.generate(ids.index_fill(1, torch.tensor([2]), wrapper.mask_token_id), max_new_tokens=4)


# ----- 3. an edited checkpoint is refused before anything large is allocated -----------------------------------
def test_weights_under_another_family_s_class_are_refused_before_they_are_built(tmp_path) -> None:
    """bilevel_dlm.json edited to name Dream's class over LLaDA weights: Dream's config would default to a
    6.5B-parameter model; the shapes are compared on the meta device first."""
    import json

    from bilevel_dlm.checkpoint import META, CheckpointError, _write_manifest
    from bilevel_dlm.integrations.dream import DreamModel

    path = MemoryWrapper(tiny(), recipe()).save_pretrained(tmp_path / "ckpt")
    meta = json.loads((path / META).read_text())
    (path / META).write_text(json.dumps({**meta, "model_class": f"{DreamModel.__module__}:{DreamModel.__qualname__}"}))
    _write_manifest(path)
    with pytest.raises(CheckpointError, match=r"weights do not fit DreamModel .*model class in bilevel_dlm.json"):
        MemoryWrapper.from_pretrained(path)


# ----- 6. weights that explode with finite losses --------------------------------------------------------------
def test_an_update_that_blows_up_the_weights_stops_training_though_the_losses_stay_finite() -> None:
    """Outer lr 1e6: the losses stay near 5 while the weights grow to ~4e6; the first update multiplies the
    norm of the weights by ~1e7, so training stops at the next step with the numbers."""
    from bilevel_dlm import OuterConfig
    from bilevel_dlm.training import TrainingDiverged

    config = recipe(outer=OuterConfig(lr=1e6, warmup_ratio=0.0, lr_schedule="constant"))
    wrapper = MemoryWrapper(tiny(), config)
    with pytest.raises(TrainingDiverged, match=r"update 1 changed the norm of the trained weights from [\d.]+ to [\d.e+]+"):
        wrapper.fit(examples(8), max_steps=8, batch_size=2, progress=False)
    assert wrapper.updates == 1
    unchecked = MemoryWrapper(tiny(), config.model_copy(update={"max_weight_norm_change": None}))
    history = unchecked.fit(examples(8), max_steps=8, batch_size=2, progress=False)
    assert all(loss == loss and loss < 100 for loss in history.outer_loss)  # what went unnoticed before
    assert max(p.abs().max().item() for p in unchecked.model.parameters()) > 1e5
    ordinary = MemoryWrapper(tiny(), recipe())
    assert len(ordinary.fit(examples(8), max_steps=8, batch_size=2, progress=False).steps) == 8


def test_the_trainer_stops_too_when_an_update_blows_up_the_weights(tmp_path) -> None:
    from bilevel_dlm import OuterConfig
    from bilevel_dlm.trainer import MemDLMTrainer
    from bilevel_dlm.training import TrainingDiverged
    from test_trainer import arguments

    config = recipe(outer=OuterConfig(lr=1e6, warmup_ratio=0.0, lr_schedule="constant"))
    trainer = MemDLMTrainer(tiny(), arguments(tmp_path, config, 6), train_dataset=examples(8))
    with pytest.raises(TrainingDiverged, match="update 1 changed the norm of the trained weights"):
        trainer.train()


def test_the_weight_check_takes_released_layouts_and_refuses_a_folder_without_safetensors(tmp_path) -> None:
    """A transformers MoE stores its experts one by one where the model holds them fused: other names, the same
    sizes, so it passes; a model folder whose weights are not safetensors is refused (the library writes only
    those, and other formats are not read before the model is built)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from bilevel_dlm.checkpoint import CheckpointError, check_weights_fit

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    check_weights_fit(MixtralForCausalLM, tmp_path / "mixtral")
    for file in (tmp_path / "mixtral").glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="holds no safetensors weights"):
        check_weights_fit(MixtralForCausalLM, tmp_path / "mixtral")


def test_fit_takes_examples_with_extra_fields_and_a_missing_mask() -> None:
    data = [{**example, "text": "a note", "attention_mask": None} for example in examples(6)]
    assert len(MemoryWrapper(tiny(), recipe()).fit(data, max_steps=2, batch_size=2, progress=False).steps) == 2


def test_zero_initialised_trainable_weights_warm_up_without_a_divergence_stop() -> None:
    """Only a zero-initialised weight trains, under warmup: its norm grows by large fractions of almost
    nothing; the check is relative to at least 1, so ordinary training goes on."""
    from bilevel_dlm import OuterConfig

    model = tiny()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = model.model.transformer.ff_out
    with torch.no_grad():
        head.weight.zero_()
    head.weight.requires_grad_(True)
    config = recipe(outer=OuterConfig(lr=1e-2, warmup_ratio=0.5, lr_schedule="linear"))
    assert len(MemoryWrapper(model, config).fit(examples(8), max_steps=6, batch_size=2, progress=False).steps) == 6


def test_the_save_every_warning_counts_the_checkpoints_a_resume_still_writes(tmp_path) -> None:
    wrapper = MemoryWrapper(tiny(), recipe())
    wrapper.fit(examples(8), max_steps=5, batch_size=2, save_every=5, output_dir=tmp_path / "a", progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="save_every")  # resuming at 5 of 8 still writes checkpoint-8
        MemoryWrapper(tiny(), recipe()).fit(examples(8), max_steps=8, batch_size=2, save_every=4,
                                            output_dir=tmp_path / "b", resume_from=tmp_path / "a" / "checkpoint-5",
                                            allow_changes=True, progress=False)


def test_a_trainer_resume_that_changes_the_run_is_refused_unless_allowed(tmp_path) -> None:
    from bilevel_dlm.trainer import RUN_FILE, MemDLMTrainer
    from test_trainer import arguments

    config = recipe()
    MemDLMTrainer(tiny(), arguments(tmp_path, config, 2, save_strategy="steps", save_steps=2),
                  train_dataset=examples(8)).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert json.loads((checkpoint / RUN_FILE).read_text())["batch_size"] == 2
    wider = MemDLMTrainer(tiny(), arguments(tmp_path, config, 4, per_device_train_batch_size=4),
                          train_dataset=examples(8))
    with pytest.raises(ValueError, match=r"would change the run: .*batch_size: 2 -> 4.*max_steps: 2 -> 4"):
        wider.train(resume_from_checkpoint=str(checkpoint))
    allowed = MemDLMTrainer(tiny(), arguments(tmp_path, config, 4, allow_changes=True), train_dataset=examples(8))
    with pytest.warns(UserWarning, match="with changes: max_steps: 2 -> 4"):
        allowed.train(resume_from_checkpoint=str(checkpoint))
    assert allowed.state.global_step == 4
