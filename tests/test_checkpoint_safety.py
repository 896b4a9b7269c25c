"""Loading a checkpoint never runs code it carries: crafted folders (a pickle payload in the training state
with the manifest re-hashed, a model class naming ``os:system`` or a module outside the library) are refused
by every entry point with a clear error and no code run (a marker file a payload would create stays
absent); earlier releases' pickled states load only by opt-in or after ``convert-checkpoint``; the Trainer's
own resume reads its RNG state with torch's restricted unpickler; the package holds no unrestricted load."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.checkpoint import META, CheckpointError, _write_manifest
from bilevel_dlm.cli import main
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.state_files import LEGACY_STATE, STATE_JSON, STATE_TENSORS, read_state
from bilevel_dlm.trainer import MemDLMTrainer
from test_trainer import arguments, examples, recipe

PACKAGE = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def saved(tmp_path: Path, steps: int = 0) -> tuple[MemoryWrapper, Path]:
    """A tiny wrapper, trained ``steps`` fit steps with a checkpoint at the last, and that checkpoint."""
    torch.manual_seed(0)
    wrapper = MemoryWrapper(LLaDAModelLM(tiny_config()), MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5)))
    if steps:
        wrapper.fit(examples(), max_steps=steps, batch_size=2, save_every=steps, output_dir=tmp_path / "run",
                    progress=False)
        return wrapper, tmp_path / "run" / f"checkpoint-{steps}"
    return wrapper, wrapper.save_pretrained(tmp_path / "ckpt")


def as_legacy(checkpoint: Path, state) -> None:
    """Replace the training state by an earlier release's pickle holding ``state``, manifest re-hashed (as
    anyone shipping a whole folder can do)."""
    (checkpoint / STATE_JSON).unlink()
    (checkpoint / STATE_TENSORS).unlink()
    torch.save(state, checkpoint / LEGACY_STATE)
    _write_manifest(checkpoint)


def entry_points(checkpoint: Path, tmp_path: Path):
    """Every way the library reads a checkpoint folder, each a call that must raise."""
    def resume() -> None:
        saved(tmp_path / "other")[0].fit(examples(), max_steps=3, batch_size=2, resume_from=checkpoint, progress=False)

    def cli(*argv: str) -> None:
        assert main(list(argv)) == 2

    def lm_eval() -> None:
        from bilevel_dlm.lm_eval import BilevelDLM

        BilevelDLM(pretrained=str(checkpoint))

    return {"from_pretrained": lambda: MemoryWrapper.from_pretrained(checkpoint),
            "fit(resume_from=)": resume,
            "bilevel-dlm eval": lambda: cli("eval", "--checkpoint", str(checkpoint), "--synthetic", "--no-progress"),
            "bilevel-dlm generate": lambda: cli("generate", "--checkpoint", str(checkpoint), "--prompt", "x"),
            "bilevel-dlm train --resume": lambda: cli("train", "--synthetic", "--tasks", "babi", "--context-lengths",
                                                      "64", "--examples-per-task", "2", "--steps", "3",
                                                      "--resume", str(checkpoint), "--no-progress"),
            "lm-eval model": lm_eval}


def test_a_pickle_payload_in_the_training_state_runs_nowhere(tmp_path, capsys) -> None:
    marker = tmp_path / "MARKER"
    _, checkpoint = saved(tmp_path, steps=2)
    as_legacy(checkpoint, {"generator": Payload(marker)})
    for name, call in entry_points(checkpoint, tmp_path).items():
        if name == "lm-eval model" and not _importable("lm_eval"):
            continue
        refused(name, call, "allow_pickle=True")
        assert not marker.exists(), f"{name} ran the payload"
    assert "--allow-pickle" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="restricted unpickler refuses"):  # the opt-in refuses other objects
        MemoryWrapper.from_pretrained(checkpoint, allow_pickle=True)
    assert main(["convert-checkpoint", str(checkpoint)]) == 2
    assert not marker.exists()


def refused(name: str, call, fix: str) -> None:
    """``call`` refuses the checkpoint: the CLI exits 2 (asserted inside), the others raise naming ``fix``."""
    if name.startswith("bilevel-dlm"):
        call()
        return
    with pytest.raises(CheckpointError, match=fix):
        call()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("model_class", ["os:system", "json:JSONDecoder", "marker_module:Model"])
def test_a_model_class_outside_the_library_is_refused_without_importing_it(tmp_path, monkeypatch, model_class):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "marker_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nModel = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, checkpoint = saved(tmp_path)
    meta = json.loads((checkpoint / META).read_text())
    (checkpoint / META).write_text(json.dumps({**meta, "model_class": model_class}))
    _write_manifest(checkpoint)
    for name, call in entry_points(checkpoint, tmp_path).items():
        if name in ("fit(resume_from=)", "bilevel-dlm train --resume"):
            continue  # resuming loads weights into the caller's model: no class is read
        refused(name, call, "trust_remote_code=True")
        assert not marker.exists(), f"{name} imported the module"
    if model_class == "marker_module:Model":  # the explicit opt-in does import it
        with pytest.raises(AttributeError):
            MemoryWrapper.from_pretrained(checkpoint, trust_remote_code=True)
        assert marker.exists()


def test_a_tokenizer_carrying_its_own_code_is_refused_without_a_prompt(tmp_path) -> None:
    """A tokenizer_config.json with an auto_map naming a module of the folder: transformers would ask on the
    terminal (or run it when told yes); loading refuses in one line and imports nothing."""
    marker = tmp_path / "IMPORTED"
    _, checkpoint = saved(tmp_path)
    from bilevel_dlm.tasks import build_tokenizer

    folder = checkpoint / "tokenizer"
    build_tokenizer().save_pretrained(folder)
    (folder / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")  # (with a class transformers knows, it loads that one and ignores auto_map)
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTok"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _write_manifest(checkpoint)
    for name, call in entry_points(checkpoint, tmp_path).items():
        if name in ("fit(resume_from=)", "bilevel-dlm train --resume"):
            continue  # resuming keeps the caller's tokenizer
        refused(name, call, "trust_remote_code=True")
        assert not marker.exists(), f"{name} ran the tokenizer's code"


def test_an_earlier_release_s_checkpoint_loads_by_opt_in_or_after_conversion(tmp_path) -> None:
    wrapper, checkpoint = saved(tmp_path, steps=2)
    # what an earlier release pickled: the live state, as its save_pretrained gathered it
    state = {"generator": wrapper.generator.get_state(), "generator_device": "cpu",
             "meta_parameters": [p.detach() for p in wrapper.inner.meta_parameters()], "skipped_batches": 0,
             "optimizer": wrapper.optimizer.state_dict(), "scheduler": wrapper.scheduler.state_dict(), "step": 2,
             "consumed_batches": 2, "history": json.loads((checkpoint / "history.json").read_text())}
    as_legacy(checkpoint, state)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        MemoryWrapper.from_pretrained(checkpoint)
    with pytest.warns(UserWarning, match="restricted unpickler"):
        opted_in = MemoryWrapper.from_pretrained(checkpoint, allow_pickle=True)
    assert torch.equal(opted_in.generator.get_state(), wrapper.generator.get_state())
    assert main(["convert-checkpoint", str(checkpoint.parent)]) == 0
    assert not (checkpoint / LEGACY_STATE).exists()
    converted = read_state(checkpoint)
    assert converted.keys() == state.keys()
    assert torch.equal(converted["optimizer"]["state"][0]["exp_avg_sq"], state["optimizer"]["state"][0]["exp_avg_sq"])
    assert converted["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert converted["history"] == state["history"] and converted["scheduler"] == state["scheduler"]
    assert torch.equal(converted["generator"], wrapper.generator.get_state())
    resumed, _ = saved(tmp_path / "resumed")
    resumed.fit(examples(), max_steps=3, batch_size=2, resume_from=checkpoint, allow_changes=True,
                progress=False)  # no allow_pickle needed (3 steps where the run had 2: an allowed change)


def test_the_trainer_reads_its_rng_state_with_the_restricted_unpickler(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    config = recipe()
    torch.manual_seed(0)
    trainer = MemDLMTrainer(LLaDAModelLM(tiny_config()), arguments(tmp_path, config, 2, save_strategy="steps",
                                                                   save_steps=2), train_dataset=examples())
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    torch.save({"python": Payload(marker)}, checkpoint / "rng_state.pth")
    torch.manual_seed(0)
    again = MemDLMTrainer(LLaDAModelLM(tiny_config()), arguments(tmp_path, config, 4, allow_changes=True),
                          train_dataset=examples())
    with pytest.raises(Exception, match="Weights only load failed"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_the_package_never_unpickles_unrestricted() -> None:
    sources = [p for folder in ("bilevel_dlm", "integrations") for p in (PACKAGE / folder).rglob("*.py")]
    assert len(sources) > 40
    offending = [f"{p.relative_to(PACKAGE)}:{i}" for p in sources
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|Unpickler\(|torch\.load\((?!.*weights_only=True)",
                              line)]
    assert offending == []


def test_a_backbone_carrying_lora_layers_is_refused_and_its_merged_model_round_trips(tmp_path) -> None:
    """The backbone trained under an outer LoRA has PEFT's layers injected; saved as it is, its weight names
    (``base_layer``, ``lora_A``) would not fit the model class and loading would leave the weights random."""
    pytest.importorskip("peft")
    from bilevel_dlm.config import OuterConfig, OuterLoRAConfig

    torch.manual_seed(0)
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5),
                          outer=OuterConfig(lora=OuterLoRAConfig(apply=True, rank=4, dropout=0.0)))
    trained = MemoryWrapper(LLaDAModelLM(tiny_config()), config)
    with torch.no_grad():
        for name, parameter in trained.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a LoRA that changes the outputs
    plain_config = config.model_copy(update={"outer": OuterConfig()})
    for wrapper in (trained, MemoryWrapper(trained.model, plain_config)):
        with pytest.raises(NotImplementedError, match="merge_and_unload"):
            wrapper.save_pretrained(tmp_path / "refused")
    ids = torch.randint(0, 100, (2, 12))
    expected = trained.model.eval()(input_ids=ids).logits
    merged = MemoryWrapper(trained.peft_model.merge_and_unload(), plain_config)
    loaded = MemoryWrapper.from_pretrained(merged.save_pretrained(tmp_path / "merged"))
    torch.testing.assert_close(loaded.model.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)  # merging rounds


def test_weights_saved_under_other_names_are_refused_not_left_random(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _, checkpoint = saved(tmp_path)
    (weights,) = (checkpoint / "model").glob("*.safetensors")
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("ff_out.weight"))
    tensors[name.replace("ff_out.weight", "ff_out.base_layer.weight")] = tensors.pop(name)  # same sizes, other name
    save_file(tensors, weights, metadata={"format": "pt"})
    _write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="would stay random"):
        MemoryWrapper.from_pretrained(checkpoint)
