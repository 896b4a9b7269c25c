"""Checkpoints: round trip, atomic writes under a failure, exact resume."""

import pytest
import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.checkpoint import atomic_directory_write
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.tasks import build_tokenizer


def make(seed=0, **inner):
    torch.manual_seed(seed)
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25), inner=InnerConfig(**inner),
                          outer=OuterConfig(lr=3e-3), seed=seed)
    return MemoryWrapper(LLaDAModelLM(tiny_config()), config)


def data(n=12, length=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 127, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def test_round_trip_restores_model_config_tokenizer_and_metasgd(tmp_path):
    wrapper = make(mode="unrolled", optimizer="metasgd")
    wrapper.tokenizer = build_tokenizer()
    wrapper.step({"input_ids": torch.stack([d["input_ids"] for d in data(4)])})
    wrapper.save_pretrained(tmp_path / "ckpt")
    loaded = MemoryWrapper.from_pretrained(tmp_path / "ckpt")
    ids = data(2)[0]["input_ids"][None]
    assert torch.equal(loaded.model(ids).logits, wrapper.model(ids).logits)
    assert loaded.config == wrapper.config and loaded.tokenizer.mask_token_id == wrapper.tokenizer.mask_token_id
    assert torch.equal(loaded.inner.optimizer.log_lr, wrapper.inner.optimizer.log_lr)
    assert torch.equal(loaded.generator.get_state(), wrapper.generator.get_state())


def test_a_failure_inside_the_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    wrapper = make()
    target = tmp_path / "ckpt"
    wrapper.save_pretrained(target)
    reference = MemoryWrapper.from_pretrained(target).model.state_dict()
    wrapper.step({"input_ids": torch.stack([d["input_ids"] for d in data(4)])})
    # an entry the state files cannot hold makes the last write fail, after the new model files were written
    with pytest.raises(TypeError, match="state.unstorable = a function, which a checkpoint cannot store"):
        wrapper.save_pretrained(target, training_state={"unstorable": lambda: None})
    restored = MemoryWrapper.from_pretrained(target).model.state_dict()
    assert all(torch.equal(restored[k], reference[k]) for k in reference)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary directory left behind"


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "d"
    atomic_directory_write(target, lambda d: (d / "a").write_text("1"))
    atomic_directory_write(target, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b", "manifest.json"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = make().fit(data(), max_steps=20, batch_size=4, save_every=10, output_dir=tmp_path, progress=False)
    resumed = make(seed=0).fit(data(), max_steps=20, batch_size=4, resume_from=tmp_path / "checkpoint-10", progress=False)
    assert resumed.steps == list(range(1, 21))
    assert resumed.outer_loss[:10] == full.outer_loss[:10]
    assert torch.allclose(torch.tensor(resumed.outer_loss[10:]), torch.tensor(full.outer_loss[10:]), atol=1e-6)
    assert torch.allclose(torch.tensor(resumed.inner_losses[10:]), torch.tensor(full.inner_losses[10:]), atol=1e-6)


def test_resume_from_a_plain_save_is_refused(tmp_path):
    wrapper = make()
    wrapper.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no training progress"):
        make().fit(data(), max_steps=2, resume_from=tmp_path / "plain", progress=False)


def test_peft_models_are_refused_with_a_clear_error(tmp_path):
    from bilevel_dlm.config import OuterLoRAConfig

    torch.manual_seed(0)
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25),
                          outer=OuterConfig(lora=OuterLoRAConfig(apply=True, rank=4)))
    wrapper = MemoryWrapper(LLaDAModelLM(tiny_config()), config)
    assert wrapper.peft_model is not None
    with pytest.raises(NotImplementedError, match="peft_model.save_pretrained"):
        wrapper.save_pretrained(tmp_path / "x")
    with pytest.raises(NotImplementedError, match="PEFT"):
        wrapper.fit(data(), max_steps=2, save_every=1, output_dir=tmp_path, progress=False)
