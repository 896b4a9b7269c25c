"""examples/custom_bilevel_method.py: a method written against the public contracts trains its own
meta-parameters correctly (their gradient against finite differences) and adapts prompts."""

from __future__ import annotations

import pytest
import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper
from examples_loader import example_module
from toy import ToyDLM, toy_batch


@pytest.fixture(scope="module")
def example():
    with example_module("custom_bilevel_method.py") as module:
        yield module


def test_the_example_trains_and_learns_its_rates(example) -> None:
    wrapper, losses = example.main(steps=8, verbose=False)
    assert losses[-1] < losses[0] - 1.0
    assert not torch.allclose(wrapper.inner.log_lr.exp(), torch.full_like(wrapper.inner.log_lr, 0.1), rtol=0, atol=1e-6)
    assert float(wrapper.inner.forget.detach()) != -4.0
    prompt = torch.tensor([[wrapper.tokenizer.bos_token_id, 5, 6, 7, 8]])
    memory = wrapper.adapt(prompt)
    assert any(float(v.abs().sum()) > 0 for name, v in memory.state().items() if "lora_B" in name)


def test_the_meta_gradient_equals_finite_differences(example) -> None:
    """d(outer loss)/d(log_lr, forget), float64. With one inner step the first-order update is exact (the
    inner gradient at the fresh draw does not depend on the rates), so autograd must equal finite
    differences; with more steps it is the first-order approximation the example's docstring states."""
    config = MemDLMConfig(memory=MemoryConfig(rank=2, layer_fraction=0.5, dtype="float64"))
    wrapper = MemoryWrapper(ToyDLM(n_blocks=3).double(), config,
                            inner=lambda view, memory: example.LearnedRateTTT(view, memory, steps=1, lr=0.05))
    with torch.no_grad():
        wrapper.inner.log_lr.copy_(torch.linspace(-3.5, -2.5, len(wrapper.memory.names)))
        wrapper.inner.log_lr.data = wrapper.inner.log_lr.data.double()
        wrapper.inner.forget.data = torch.tensor(-2.0, dtype=torch.float64)
    batch = wrapper.prepare(toy_batch(3, 10))

    def loss() -> torch.Tensor:
        wrapper.generator.manual_seed(7)
        with wrapper.bilevel_context():
            return wrapper.compute_loss(batch)[0]

    loss().backward()
    meta = wrapper.inner.meta_parameters()
    grads = [p.grad.clone() for p in meta]
    assert all(float(g.abs().sum()) > 0 for g in grads)
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                 for i, p in enumerate(meta)]
    eps = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(meta, direction):
                p.add_(sign * eps * d)
        values.append(float(loss().detach()))
        with torch.no_grad():
            for p, d in zip(meta, direction):
                p.sub_(sign * eps * d)
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
    assert analytic == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-6)


def test_prompt_memory_of_a_batch_row_equals_the_row_alone(example) -> None:
    wrapper = MemoryWrapper(ToyDLM(n_blocks=3), MemDLMConfig(memory=MemoryConfig(rank=2, layer_fraction=0.5)),
                            inner=lambda view, memory: example.LearnedRateTTT(view, memory))
    prompts = toy_batch(3, 8)["input_ids"]
    batched = wrapper.adapt(prompts).values
    assert all(v.grad_fn is None for v in batched)  # no graph to the rates is kept
    for row in range(3):
        alone = wrapper.adapt(prompts[row:row + 1]).values
        for b, a in zip(batched, alone):
            torch.testing.assert_close(b[row], a, rtol=1e-5, atol=1e-6)
