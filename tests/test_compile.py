"""A compiled model (model.compile(), in place) trains, adapts, evaluates and generates as the eager one, on
every backbone family (dynamo with the aot_eager backend; inductor with -m slow), and a dense model's training
compiles nothing new after its second step (the first compiles, the second makes the varying shapes dynamic): fast weights are bound by hooks after compilation, which the guards
on module hooks (bilevel_dlm.compiled) let the compiled graphs see."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper
from test_backbones_bilevel import FAMILIES, make_batch

FAMILY_NAMES = ("llada", "llada_moe", "dream", "mdlm", "llada2")
# MoE models break the graph at their data-dependent routing and dynamo specialises each expert's forward on its
# module: an expert compiles when it first receives tokens (up to dynamo's recompile limit, then runs eagerly),
# whatever the fast weights do. Dense models compile everything in the first step.
DENSE = ("llada", "dream", "mdlm")


def pair(family: str, backend: str) -> tuple[MemoryWrapper, MemoryWrapper]:
    """The same model eager and compiled, each in its own wrapper (MemDLM preset, first order)."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5), inner=InnerConfig(lr=0.5))
    eager = MemoryWrapper(FAMILIES[family].build(0), config)
    model = FAMILIES[family].build(0)
    model.compile(backend=backend)
    return eager, MemoryWrapper(model, config)


def check_equal(family: str, backend: str, tolerance: float) -> None:
    torch._dynamo.reset()
    eager, compiled = pair(family, backend)
    bos = FAMILIES[family].bos
    graphs = []
    for step in range(4):
        batch = {**make_batch(bos, n=4, length=12, seed=step), "example_index": torch.arange(4) + 4 * step}
        expected, got = eager.step(batch), compiled.step(batch)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=tolerance, abs=tolerance), (step, name)
        graphs.append(counters["stats"]["unique_graphs"])
    if family in DENSE:  # the second step recompiles once, making the varying shapes (supervised positions) dynamic
        assert graphs[1] == graphs[2] == graphs[3], f"a training step recompiled: graphs after each step {graphs}"
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance)

    prompts = make_batch(bos, n=2, length=8, seed=9)["input_ids"]
    for a, b in zip(eager.adapt(prompts).values, compiled.adapt(prompts).values):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance)
    data = [make_batch(bos, n=3, length=12, seed=11)]
    for memory in ("off", "prompt"):
        assert compiled.eval_loss(data, memory) == pytest.approx(eager.eval_loss(data, memory), rel=tolerance)
    settings = dict(max_new_tokens=4, steps=4, seed=0)
    assert torch.equal(compiled.generate(prompts, **settings), eager.generate(prompts, **settings))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_compiled_model_computes_what_the_eager_one_does(family: str) -> None:
    check_equal(family, "aot_eager", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_inductor_compiled_model_computes_what_the_eager_one_does(family: str) -> None:
    check_equal(family, "inductor", 1e-4)


def test_what_cannot_run_compiled_is_refused() -> None:
    model = FAMILIES["llada"].build(0)
    with pytest.raises(TypeError, match="compile the model in place instead"):
        MemoryWrapper(torch.compile(model, backend="aot_eager"))
    model.compile(backend="aot_eager")
    with pytest.raises(NotImplementedError, match="double backward"):
        MemoryWrapper(model, MemDLMConfig(inner=InnerConfig(mode="unrolled")))
