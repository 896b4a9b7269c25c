"""MemoryParams: fast weights outside the model, bound by hooks, exact LoRA / delta arithmetic."""

import math

import pytest
import torch

from bilevel_dlm import Backbone, MemoryConfig, MemoryParams, register_backbone
from toy import ToyDLM, toy_batch


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_targets_are_the_ffn_of_the_last_blocks():
    model = ToyDLM(n_blocks=10)
    memory = MemoryParams(model, MemoryConfig(rank=4))
    assert memory.first_block == 9  # int(10 * 0.9)
    assert list(memory.targets) == ["blocks.9.ff_proj", "blocks.9.up_proj", "blocks.9.ff_out"]
    both = MemoryParams(model, MemoryConfig(rank=4, targets="ffn+attention", layer_fraction=0.2))
    assert len(both.targets) == 2 * 7


def test_never_part_of_the_model():
    model = ToyDLM()
    keys, n_params = set(model.state_dict()), len(list(model.parameters()))
    memory = MemoryParams(model, MemoryConfig(rank=4))
    memory.reset()
    with memory.bind():
        assert set(model.state_dict()) == keys and len(list(model.parameters())) == n_params
    assert _hook_count(model) == 0


def test_lora_delta_arithmetic_and_init():
    model = ToyDLM(n_blocks=2)
    config = MemoryConfig(rank=3, alpha=6.0, layer_fraction=0.5)
    memory = MemoryParams(model, config)
    memory.reset(generator=torch.Generator().manual_seed(0))
    a = memory.values[0]
    assert a.dtype == torch.float32 and a.abs().max() <= 1 / math.sqrt(a.shape[1])
    assert all(torch.count_nonzero(v) == 0 for v in memory.values[1::2]), "B must start at zero"
    x = torch.randn(2, 5, 16)
    module = memory.targets["blocks.1.ff_proj"]
    base = module(x)
    with memory.bind():
        assert torch.equal(module(x), base), "delta W = B A = 0 at start"
    g = torch.Generator().manual_seed(1)
    memory.set([torch.randn(v.shape, generator=g) for v in memory.values])
    a, b = memory.values[0], memory.values[1]
    with memory.bind():
        out = module(x)
    assert torch.allclose(out, base + 2.0 * x @ a.T @ b.T, atol=1e-5)


def test_full_delta():
    model = ToyDLM(n_blocks=2)
    memory = MemoryParams(model, MemoryConfig(kind="full", layer_fraction=0.5))
    memory.reset()
    assert memory.names[0].endswith(".delta") and all(torch.count_nonzero(v) == 0 for v in memory.values)
    delta = torch.randn_like(memory.values[0])
    memory.set([delta] + list(memory.values[1:]))
    module = memory.targets["blocks.1.ff_proj"]
    x = torch.randn(3, 16)
    with memory.bind():
        assert torch.allclose(module(x), torch.nn.functional.linear(x, module.weight + delta), atol=1e-5)


def test_per_sample_rows_are_independent():
    model = ToyDLM(n_blocks=2)
    memory = MemoryParams(model, MemoryConfig(rank=2, layer_fraction=0.5), per_sample=True)
    memory.reset(batch_size=3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v[0], v[2]) for v in memory.values), "rows start from the same draw"
    memory.set([v + torch.randn_like(v) for v in memory.values])
    ids = toy_batch(3, 7)["input_ids"]
    with memory.bind():
        batched = model(ids)
    state = memory.state()
    for row in range(3):
        memory.load_state({k: v[row : row + 1] for k, v in state.items()})
        with memory.bind():
            assert torch.allclose(model(ids[row : row + 1]), batched[row : row + 1], atol=1e-5)
    memory.load_state(state)
    with memory.bind(), pytest.raises(RuntimeError, match="batch size 3"):
        model(ids[:2])


def test_unknown_target_lists_the_available_linears():
    with pytest.raises(ValueError, match=r"gate_proj.*available linear modules.*ff_out"):
        MemoryParams(ToyDLM(), MemoryConfig(targets=("gate_proj",)))


def test_token_mixing_targets_refuse_per_sample_memory():
    @register_backbone
    class MixingToy(Backbone):
        name = "toy_mixing"
        ffn_targets = ("ff_proj", "ff_out")
        token_mixing_targets = ("ff_proj",)

        def blocks(self, model):
            return model.blocks

    model = ToyDLM()
    MemoryParams(model, backbone=MixingToy())  # shared memory is fine
    with pytest.raises(ValueError, match="per-sample fast weights"):
        MemoryParams(model, backbone=MixingToy(), per_sample=True)


def test_values_before_reset_raise():
    with pytest.raises(RuntimeError, match="reset"):
        MemoryParams(ToyDLM()).values


def test_adapting_in_train_mode_refuses_active_dropout():
    from bilevel_dlm import MemoryWrapper

    @register_backbone
    class TrainModeToy(Backbone):
        name = "toy_train_mode"
        ffn_targets = ("ff_proj", "up_proj", "ff_out")
        adapt_in_train_mode = True

        def blocks(self, model):
            return model.blocks

    model = ToyDLM()
    wrapper = MemoryWrapper(model, backbone=TrainModeToy())
    ids = toy_batch(2, 8)["input_ids"]
    wrapper.adapt(ids)  # no dropout: fine
    model.blocks[0].attn_out = torch.nn.Sequential(model.blocks[0].attn_out, torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        wrapper.adapt(ids)
