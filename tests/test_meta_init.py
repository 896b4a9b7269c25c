"""Meta-learned fast-weight initialisation: FOMAML, MAML and Reptile against their definitions.

- first-order MAML: phi_0's gradient is the outer loss's gradient at the adapted phi_K (summed over the
  samples of per-sample memory), checked by central finite differences of the outer loss at a fixed phi_K;
- MAML: phi_0's gradient through the unrolled inner loop equals finite differences of the whole step's
  outer loss in phi_0 (float64), and differs from the first-order one;
- Reptile: phi_0 <- phi_0 + rate (mean phi_K - phi_0) after the step, phi_0 outside the optimizer;
- phi_0 is saved in checkpoints and is where ``adapt`` starts.
"""

from __future__ import annotations

import pytest
import torch

from bilevel_dlm import (AdaptConfig, InnerConfig, InnerLoop, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig,
                         TrainingDiverged)
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from toy import ToyDLM, toy_batch

STEP_SEED = 5


def make(meta_init: str, mode: str = "first_order", per_sample: bool = False, rate: float = 0.1,
         model: torch.nn.Module | None = None, **adapt) -> MemoryWrapper:
    """A float64 toy wrapper whose phi_0 is random (so every entry of the gradient is non-zero); the
    inner rate is small enough that the toy model's unnormalised tanh head stays out of saturation."""
    config = MemDLMConfig(memory=MemoryConfig(rank=2, layer_fraction=0.5, dtype="float64", per_sample=per_sample),
                          inner=InnerConfig(mode=mode, meta_init=meta_init, lr=0.05, reptile_rate=rate),
                          adapt=AdaptConfig(**adapt))
    wrapper = MemoryWrapper(model if model is not None else ToyDLM(n_blocks=3).double(), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for value in wrapper.inner.initial.values:
            value.copy_(0.05 * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    return wrapper


def outer_step(wrapper: MemoryWrapper, batch) -> tuple[torch.Tensor, object]:
    """The step's outer loss (anchors and trajectory from a fixed seed) and its anchor."""
    wrapper.generator.manual_seed(STEP_SEED)
    loss, _, anchor = wrapper.compute_loss(batch)
    return loss, anchor


def directions(values, count: int = 3, seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(v.shape, generator=generator, dtype=v.dtype) for v in values] for _ in range(count)]


def dot(a, b) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


@pytest.mark.parametrize("per_sample", [False, True])
def test_first_order_maml_applies_the_outer_gradient_at_the_adapted_weights_to_phi0(per_sample: bool) -> None:
    wrapper = make("fomaml", per_sample=per_sample)
    batch = wrapper.prepare(toy_batch(3, 10))
    with wrapper.bilevel_context():
        loss, anchor = outer_step(wrapper, batch)
        loss.backward()
    adapted = [v.detach().clone() for v in wrapper.memory.values]
    wrapper.inner.after_backward()
    phi0 = [p.detach() for p in wrapper.inner.initial.values]
    grad = [p.grad.clone() for p in wrapper.inner.initial.values]
    start = [v.expand_as(a) if per_sample else v for v, a in zip(phi0, adapted)]
    assert max(float((a - s).abs().max()) for a, s in zip(adapted, start)) > 1e-3  # the inner loop moved

    def outer_at(values) -> float:
        wrapper.memory.set(values)
        with torch.no_grad(), wrapper.memory.bind():
            return float(wrapper.outer.loss(batch.x0, batch.maskable, anchor, batch.model_attention_mask))

    eps = 1e-6
    for direction in directions(phi0):  # one unbatched direction, added to every sample's phi_K
        plus = outer_at([a + eps * d for a, d in zip(adapted, direction)])
        minus = outer_at([a - eps * d for a, d in zip(adapted, direction)])
        assert dot(grad, direction) == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9)


def test_maml_gradient_of_phi0_equals_finite_differences_of_the_unrolled_step() -> None:
    wrapper = make("maml", mode="unrolled")
    batch = wrapper.prepare(toy_batch(3, 10))
    with wrapper.bilevel_context():
        loss, anchor = outer_step(wrapper, batch)
        loss.backward()
    phi0 = list(wrapper.inner.initial.values)
    grad = [p.grad.clone() for p in phi0]

    def step_loss(shift) -> float:
        with torch.no_grad():
            for p, d in zip(phi0, shift):
                p.add_(d)
        try:
            with wrapper.bilevel_context():
                return float(outer_step(wrapper, batch)[0].detach())
        finally:
            with torch.no_grad():
                for p, d in zip(phi0, shift):
                    p.sub_(d)

    eps = 1e-6
    for direction in directions(phi0):
        plus = step_loss([eps * d for d in direction])
        minus = step_loss([-eps * d for d in direction])
        assert dot(grad, direction) == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9)

    # The second-order terms matter here: the first-order gradient at phi_K differs.
    adapted = [v.detach().requires_grad_() for v in wrapper.memory.values]
    wrapper.memory.set(adapted)
    with wrapper.memory.bind():
        first_order = torch.autograd.grad(
            wrapper.outer.loss(batch.x0, batch.maskable, anchor, batch.model_attention_mask), adapted)
    difference = sum(float((a - b).norm()) for a, b in zip(grad, first_order))
    assert difference > 1e-3 * sum(float(g.norm()) for g in grad)


def test_reptile_moves_phi0_toward_the_mean_adapted_weights_after_the_step() -> None:
    rate = 0.25
    wrapper, twin = make("reptile", per_sample=True, rate=rate), make("reptile", per_sample=True, rate=rate)
    raw = toy_batch(3, 10)
    with twin.bilevel_context():  # the same seed and model: the step's anchors and adapted weights
        twin.compute_loss(twin.prepare(raw))
    mean_adapted = [v.detach().mean(0) for v in twin.memory.values]
    before = [p.detach().clone() for p in wrapper.inner.initial.values]
    wrapper.step(raw)
    optimized = {id(p) for group in wrapper.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in wrapper.inner.initial.values)
    for after, start, target in zip(wrapper.inner.initial.values, before, mean_adapted):
        torch.testing.assert_close(after.detach(), start + rate * (target - start), rtol=1e-12, atol=1e-14)


def test_a_skipped_step_leaves_reptiles_phi0_unchanged() -> None:
    wrapper = make("reptile")
    before = [p.detach().clone() for p in wrapper.inner.initial.values]
    with torch.no_grad():
        wrapper.model.lm_head.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        metrics = wrapper.step(toy_batch(3, 10))
    assert metrics["nonfinite"] == 1.0
    for after, start in zip(wrapper.inner.initial.values, before):
        assert torch.equal(after, start)


def test_adapt_starts_from_phi0() -> None:
    """With a negligible adaptation rate, every prompt's memory is phi_0 (a fresh draw would have B = 0)."""
    wrapper = make("fomaml", lr=1e-12)
    prompts = toy_batch(3, 6)["input_ids"]
    memory = wrapper.adapt(prompts)
    for value, start in zip(memory.values, wrapper.inner.initial.values):
        torch.testing.assert_close(value, start.detach().expand_as(value), rtol=0, atol=1e-10)
        assert not value.requires_grad


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_phi0_is_saved_in_checkpoints(tmp_path, method: str) -> None:
    wrapper = make(method, model=LLaDAModelLM(tiny_config()))
    ids = torch.randint(2, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    wrapper.step({"input_ids": ids})
    wrapper.save_pretrained(tmp_path / "ckpt")
    loaded = MemoryWrapper.from_pretrained(tmp_path / "ckpt")
    for saved, original in zip(loaded.inner.initial.values, wrapper.inner.initial.values, strict=True):
        assert torch.equal(saved, original)
    with pytest.raises(ValueError, match="inner meta-parameters"):
        MemoryWrapper.from_pretrained(tmp_path / "ckpt", inner=lambda view, memory: InnerLoop(view, memory))


@pytest.mark.parametrize(("meta_init", "mode", "backend", "message"), [
    ("maml", "first_order", "torchopt", "needs mode='unrolled'"),
    ("fomaml", "unrolled", "torchopt", "first-order rule"),
    ("reptile", "unrolled", "torchopt", "first-order rule"),
    ("fomaml", "first_order", "higher", "backend='torchopt'"),
])
def test_inconsistent_meta_init_settings_are_refused(meta_init: str, mode: str, backend: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InnerConfig(meta_init=meta_init, mode=mode, backend=backend)


def test_meta_parameters_step_at_their_own_rate_without_weight_decay() -> None:
    """Adam's first step moves every coordinate with a gradient by its group's rate: phi_0 by meta_lr,
    theta by lr (weight decay applies to theta only)."""
    wrapper = make("fomaml")
    wrapper.config = wrapper.config.model_copy(update={"outer": OuterConfig(lr=1e-3, meta_lr=1e-5, weight_decay=0.1)})
    before = [p.detach().clone() for p in wrapper.inner.initial.values]
    theta_before = wrapper.model.lm_head.weight.detach().clone()
    wrapper.step(toy_batch(3, 10))
    steps = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(wrapper.inner.initial.values, before)])
    torch.testing.assert_close(steps.max(), torch.tensor(1e-5, dtype=steps.dtype), rtol=1e-3, atol=0)
    theta_step = (wrapper.model.lm_head.weight.detach() - theta_before * (1 - 1e-3 * 0.1)).abs().max()
    torch.testing.assert_close(theta_step, torch.tensor(1e-3, dtype=theta_step.dtype), rtol=1e-3, atol=0)


def test_meta_init_needs_inner_steps() -> None:
    with pytest.raises(ValueError, match="needs inner steps > 0"):
        InnerConfig(meta_init="fomaml", steps=0)


def test_an_initialisation_is_trained_by_its_own_rule_or_only_started_from() -> None:
    wrapper = make("fomaml")
    with pytest.raises(ValueError, match="make them agree"):
        InnerLoop(wrapper.view, wrapper.memory, config=InnerConfig(meta_init="reptile"), initial=wrapper.inner.initial)
    fixed = InnerLoop(wrapper.view, wrapper.memory, config=InnerConfig(), initial=wrapper.inner.initial)
    assert fixed.meta_parameters() == [] and not fixed.trains_initial  # a fixed start (what adapt uses)


def test_a_diverged_run_leaves_no_gradient_on_phi0() -> None:
    wrapper = make("fomaml")
    wrapper.config = wrapper.config.model_copy(update={"max_nonfinite_steps": 1})
    with torch.no_grad():
        wrapper.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged):
        wrapper.step(toy_batch(3, 10))
    assert all(p.grad is None for p in wrapper.inner.initial.values)
