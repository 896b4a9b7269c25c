"""The engine's contracts, implemented from scratch: a memory, an inner method and an outer objective that
share no code with MemDLM's classes, trained through ``MemoryWrapper.fit``.

- ``ResidualBias``: a vector (shared or one per sample) added to the last block's output;
- ``OneStepSGD``: one plain gradient step on the anchor's masked tokens, first order;
- ``HalfMasked``: unweighted cross-entropy on a random half of the maskable tokens.

The wrapper's step must be exactly: anchor, inner run, outer loss with the adapted memory bound; ``adapt``
must use the method's ``for_prompts``; a method without it is refused by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from bilevel_dlm.rng import uniform
from bilevel_dlm import (Anchor, FastWeights, InnerMethod, InnerResult, MemDLMConfig, MemoryWrapper, ModelView,
                         OuterConfig, OuterObjective)
from toy import MASK_ID, ToyBackbone, ToyDLM


class ResidualBias(FastWeights):
    """A vector added to the output of the model's last block."""

    def __init__(self, model: ToyDLM, per_sample: bool = False) -> None:
        self.model, self.per_sample = model, per_sample
        self.names, self.first_block = ("bias",), len(model.blocks) - 1
        self.device = next(model.parameters()).device
        self._values: tuple[torch.Tensor, ...] = ()
        self._depth, self._active = 0, True

    @property
    def values(self) -> tuple[torch.Tensor, ...]:
        if not self._values:
            raise RuntimeError("empty memory")
        return self._values

    def initial_values(self, generator=None) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(self.model.embed.embedding_dim),)

    def reset(self, batch_size=None, generator=None, initial=None) -> None:
        (value,) = initial if initial is not None else self.initial_values(generator)
        self._values = (value.expand(batch_size, -1).clone() if self.per_sample else value.clone(),)

    def set(self, values) -> None:
        self._values = tuple(values)

    def clear(self) -> None:
        self._values = ()

    def spawn(self, per_sample: bool) -> "ResidualBias":
        return ResidualBias(self.model, per_sample)

    def _add(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return output
        bias = self.values[0]
        return output + (bias[:, None, :] if self.per_sample else bias)

    @contextmanager
    def bind(self) -> Iterator["ResidualBias"]:
        handle = self.model.blocks[-1].register_forward_hook(self._add) if self._depth == 0 else None
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if handle is not None:
                handle.remove()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        self._active = False
        try:
            yield
        finally:
            self._active = True


class OneStepSGD(InnerMethod):
    """bias <- bias - lr * d CE(anchor's masked tokens) / d bias, a constant for the outer gradient."""

    name = "one-step"

    def __init__(self, view: ModelView, memory: FastWeights, lr: float = 2.0) -> None:
        self.view, self.memory, self.lr = view, memory, lr
        self.prefixes: list = []

    def run(self, x0, maskable, anchor, attention_mask=None, *, generator=None, weighting=None, prefix=None):
        self.prefixes.append(prefix)
        self.memory.reset(batch_size=x0.shape[0], generator=generator)
        (bias,) = self.memory.values
        bias.requires_grad_()
        masked = anchor.masked & maskable
        with self.memory.bind():
            loss = F.cross_entropy(self.view.model(anchor.input_ids)[masked], x0[masked])
        (grad,) = torch.autograd.grad(loss, [bias])
        self.memory.set([(bias - self.lr * grad).detach()])
        return InnerResult(loss.detach()[None], grad.norm()[None])

    def for_prompts(self, memory, settings) -> "OneStepSGD":
        return OneStepSGD(self.view, memory, self.lr)


class HalfMasked(OuterObjective):
    """Unweighted CE on a random half of the maskable tokens, normalised by the maskable count."""

    def __init__(self, view: ModelView) -> None:
        self.view = view

    def _anchor(self, x0, maskable, draws) -> Anchor:
        masked = maskable & (draws < 0.5)
        return Anchor(t=masked.sum(1) / maskable.sum(1).clamp_min(1), masked=masked,
                      input_ids=torch.where(masked, MASK_ID, x0))

    def sample_anchor(self, x0, maskable, generator=None) -> Anchor:
        return self._anchor(x0, maskable, uniform(x0.shape, generator, x0.device))

    def keyed_anchor(self, x0, maskable, attention_mask, seed) -> Anchor:
        rows = [torch.rand(x0.shape[1], generator=torch.Generator().manual_seed(seed + hash(tuple(row.tolist()))))
                for row in x0]
        return self._anchor(x0, maskable, torch.stack(rows))

    def loss_terms(self, x0, maskable, anchor, attention_mask=None):
        logits = self.view.model(anchor.input_ids)
        return F.cross_entropy(logits[anchor.masked], x0[anchor.masked], reduction="sum"), self.denominator(maskable)

    def denominator(self, maskable):
        return maskable.sum()


def counting_data(n: int, length: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows counting up from a random start (mod 20): learnable from context, 2 prompt tokens."""
    starts = torch.randint(0, 20, (n,), generator=torch.Generator().manual_seed(seed))
    rows = []
    for start in starts:
        ids = (start + torch.arange(length)) % 20 + 1
        labels = ids.clone()
        labels[:2] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def build(per_sample: bool = False, seed: int = 0) -> MemoryWrapper:
    model = ToyDLM(n_blocks=2, seed=seed)
    return MemoryWrapper(model, MemDLMConfig(outer=OuterConfig(lr=1e-2, warmup_ratio=0.0), seed=seed),
                         inner=lambda view, _: OneStepSGD(view, ResidualBias(view.model, per_sample)),
                         outer=HalfMasked)


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_method_written_against_the_contracts_trains_through_fit(per_sample: bool) -> None:
    torch.manual_seed(0)
    wrapper = build(per_sample)
    history = wrapper.fit(counting_data(64), eval_data=counting_data(16, seed=1), max_steps=60, batch_size=8,
                          eval_every=60, progress=False)
    assert history.variant == "one-step"
    first, last = sum(history.outer_loss[:5]) / 5, sum(history.outer_loss[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert all(norm[0] > 0 for norm in history.inner_grad_norms)  # the memory moved every step
    assert history.eval_loss_prompt_memory and history.eval_loss_prompt_memory[-1] != history.eval_loss[-1]
    assert all(prefix is None for prefix in wrapper.inner.prefixes)  # shares_anchor_prefix is False


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_step_is_inner_then_outer_with_the_adapted_memory_bound(per_sample: bool) -> None:
    batch = counting_data(4)
    wrapper = build(per_sample)
    prepared = wrapper.prepare({k: torch.stack([row[k] for row in batch]) for k in batch[0]})
    with wrapper.bilevel_context():
        loss, inner, _ = wrapper.compute_loss(prepared)
        loss.backward()
    got = {name: p.grad.clone() for name, p in wrapper.model.named_parameters()}

    model = ToyDLM(n_blocks=2, seed=0)  # the same computation written out, without the wrapper
    view = ModelView(wrapper.backbone, model, MASK_ID)
    method, objective = OneStepSGD(view, ResidualBias(model, per_sample)), HalfMasked(view)
    generator = torch.Generator().manual_seed(0)
    x0, maskable = prepared.x0, prepared.maskable
    anchor = objective.sample_anchor(x0, maskable, generator)
    expected_inner = method.run(x0, maskable, anchor, generator=generator)
    with method.memory.bind():
        expected = objective.loss(x0, maskable, anchor)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(inner.losses, expected_inner.losses, rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=0)
    with torch.no_grad():  # and the memory mattered: without it the outer loss differs
        assert float(objective.loss(x0, maskable, anchor)) != pytest.approx(float(expected), rel=1e-4)


def test_adapt_runs_the_methods_for_prompts_and_a_method_without_it_is_refused() -> None:
    wrapper = build()
    prompts = torch.stack([row["input_ids"][:4] for row in counting_data(3)])
    memory = wrapper.adapt(prompts)
    assert isinstance(memory, ResidualBias) and memory.per_sample and memory.values[0].shape == (3, 16)
    assert float(memory.values[0].abs().sum()) > 0

    class NoPrompts(OneStepSGD):
        for_prompts = InnerMethod.for_prompts

    plain = MemoryWrapper(ToyDLM(n_blocks=2), inner=lambda view, _: NoPrompts(view, ResidualBias(view.model)),
                          outer=HalfMasked)
    with pytest.raises(NotImplementedError, match="NoPrompts does not define for_prompts"):
        plain.adapt(prompts)


def test_inner_and_outer_arguments_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(TypeError, match="inner must be an InnerMethod"):
        MemoryWrapper(ToyDLM(n_blocks=2), inner=lambda view, memory: object())
    with pytest.raises(TypeError, match="outer must be an OuterObjective"):
        MemoryWrapper(ToyDLM(n_blocks=2), outer=lambda view: object())


def test_objects_for_the_default_inner_loop_are_refused_with_a_custom_one() -> None:
    from bilevel_dlm import AnchorConsistent

    with pytest.raises(ValueError, match="configure the default inner loop"):
        MemoryWrapper(ToyDLM(n_blocks=2), simulator=AnchorConsistent(),
                      inner=lambda view, _: OneStepSGD(view, ResidualBias(view.model)))


def test_a_finished_inner_method_brings_its_own_memory() -> None:
    model = ToyDLM(n_blocks=2)
    method = OneStepSGD(ModelView(ToyBackbone(), model, MASK_ID), ResidualBias(model))
    wrapper = MemoryWrapper(model, inner=method, outer=HalfMasked)
    assert wrapper.inner is method and wrapper.memory is method.memory


def test_fit_refuses_prompt_memory_evaluation_without_for_prompts_before_training() -> None:
    class NoPrompts(OneStepSGD):
        for_prompts = InnerMethod.for_prompts

    wrapper = MemoryWrapper(ToyDLM(n_blocks=2), inner=lambda view, _: NoPrompts(view, ResidualBias(view.model)),
                            outer=HalfMasked)
    before = [p.detach().clone() for p in wrapper.model.parameters()]
    with pytest.raises(NotImplementedError, match="eval_prompt_memory=False"):
        wrapper.fit(counting_data(8), eval_data=counting_data(4), max_steps=2, progress=False)
    assert all(torch.equal(p, b) for p, b in zip(wrapper.model.parameters(), before))
