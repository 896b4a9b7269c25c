"""examples/custom_backbone.py: a ModernBERT adapter written outside the library trains and adapts."""

from __future__ import annotations

import inspect
import math
from types import ModuleType

import pytest
import torch

from bilevel_dlm import MemoryParams, detect_backbone, registered_backbones
from bilevel_dlm.forward import ModelView
from examples_loader import example_module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    with example_module("custom_backbone.py") as module:
        yield module


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, which only slow them down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_adapter_is_one_small_class_found_by_class_name(example: ModuleType) -> None:
    lines, _ = inspect.getsourcelines(example.ModernBertBackbone)
    assert len(lines) + 1 < 40, "the adapter (with its decorator) should stay under 40 lines"
    assert registered_backbones()["modernbert"] is example.ModernBertBackbone
    model = example.tiny_modernbert(layers=2)
    assert isinstance(detect_backbone(model), example.ModernBertBackbone)


def test_adapter_view_reproduces_the_model_logits(example: ModuleType) -> None:
    """The captured head input, pushed through the head, gives exactly the model's own logits."""
    model = example.tiny_modernbert(layers=2).eval()
    ids = torch.randint(example.MASK + 1, example.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 3::4] = example.MASK
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0
    view = ModelView(example.ModernBertBackbone(), model, example.MASK)
    with torch.no_grad():
        torch.testing.assert_close(view.logits(ids, attention), model(input_ids=ids, attention_mask=attention).logits)


def test_main_trains_and_adapts(example: ModuleType) -> None:
    result = example.main(steps=60, verbose=False)
    losses = result.history.outer_loss
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    before, after = result.train_loss
    assert after < before - 0.05, f"training examples: {before:.3f} -> {after:.3f}"
    assert all(math.isfinite(x) for x in (*result.held_out_loss, result.held_out_prompt_memory))

    memory: MemoryParams = result.memory
    expected = {f"model.layers.3.mlp.{w}" for w in ("Wi", "Wo")}  # the last of 4 blocks
    assert set(memory.targets) == expected
    assert len(memory.values) == 2 * len(expected)  # lora_A, lora_B
    shapes = dict(zip(memory.names, (tuple(v.shape) for v in memory.values)))
    assert shapes["model.layers.3.mlp.Wi.lora_B"] == (2 * 96, 4), "Wi is the fused gate + up linear"
    assert any(bool(v.abs().sum() > 0) for n, v in zip(memory.names, memory.values) if n.endswith("lora_B"))
