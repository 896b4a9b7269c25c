"""A compiled model (model.compile(), in place) trains, adapts, evaluates and generates as the eager one, on
every backbone family (dynamo with the aot_eager backend; inductor with -m slow), and a dense model's training
compiles nothing new after its second step (the first compiles, the second makes the varying shapes dynamic): fast weights are bound by hooks after compilation, which the guards
on module hooks (bilevel_dlm.compiled) let the compiled graphs see."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, detect_backbone
from test_backbones_bilevel import FAMILIES, make_batch

FAMILY_NAMES = ("llada", "llada_moe", "dream", "mdlm", "llada2")
# MoE models break the graph at their data-dependent routing and dynamo specialises each expert's forward on its
# module: an expert compiles when it first receives tokens (up to dynamo's recompile limit, then runs eagerly),
# whatever the fast weights do. Dense models compile everything in the first step.
DENSE = ("llada", "dream", "mdlm")


def pair(family: str, backend: str, device: torch.device | str) -> tuple[MemoryWrapper, MemoryWrapper]:
    """The same model eager and compiled, each in its own wrapper (MemDLM preset, first order); the compiled
    one runs once before it is wrapped (a graph without hooks is then cached, which must not be reused)."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5), inner=InnerConfig(lr=0.5))
    eager = MemoryWrapper(FAMILIES[family].build(0).to(device), config)
    model = FAMILIES[family].build(0).to(device)
    model.compile(backend=backend)
    with torch.no_grad():  # as the backbone's adapter calls it (MDLM's forward takes its time steps)
        detect_backbone(model).call(model, make_batch(FAMILIES[family].bos, n=4, length=12)["input_ids"].to(device), None)
    return eager, MemoryWrapper(model, config)


def check_equal(family: str, backend: str, tolerance: float, device: torch.device | str = "cpu") -> None:
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    eager, compiled = pair(family, backend, device)
    bos = FAMILIES[family].bos
    for step in range(4):
        batch = {**make_batch(bos, n=4, length=12, seed=step), "example_index": torch.arange(4) + 4 * step}
        # Dense models: the first step compiles, the second makes the varying shapes (the supervised positions)
        # dynamic; after that a recompilation raises.
        stance = "fail_on_recompile" if family in DENSE and step >= 2 else "default"
        torch.compiler.set_stance(stance)
        try:
            expected, got = eager.step(batch), compiled.step(batch)
        finally:
            torch.compiler.set_stance("default")
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=tolerance, abs=tolerance), (step, name)
    assert counters["stats"]["unique_graphs"] > before, "nothing was compiled"
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance)

    prompts = make_batch(bos, n=2, length=8, seed=9)["input_ids"].to(device)
    for a, b in zip(eager.adapt(prompts).values, compiled.adapt(prompts).values):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance)
    data = [{key: value.to(device) for key, value in make_batch(bos, n=3, length=12, seed=11).items()}]
    for memory in ("off", "prompt"):
        assert compiled.eval_loss(data, memory) == pytest.approx(eager.eval_loss(data, memory), rel=tolerance)
    settings = dict(max_new_tokens=4, steps=4, seed=0)
    assert torch.equal(compiled.generate(prompts, **settings), eager.generate(prompts, **settings))


@pytest.mark.device
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_compiled_model_computes_what_the_eager_one_does(family: str, device: torch.device) -> None:
    check_equal(family, "aot_eager", 1e-5, device)


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
