"""One bilevel step under every combination of the options a user can switch.

Factors: backbone family x inner loss x trajectory x {first_order, unrolled} x {shared, per-sample
memory} x {no, right, left padding, packed documents kept apart} x {activation checkpointing off, on} x {MDLM,
CART outer objective; CART refuses packed documents} x {fresh, meta-learned fast-weight initialisation (FOMAML
in first-order mode, MAML unrolled)}. For each combination:

- every inner loss and the outer loss are finite;
- every inner stage moves the fast weights (gradient norm > 0);
- prefix sharing gives the same outer loss and the same gradient of every theta tensor (and of phi_0) as
  recomputing the prefix (float64 models and fast weights, relative 1e-10);
- ``adapt`` on the prompts (same padding layout) leaves every base weight bitwise unchanged and moves
  the fast weights.

The default run covers every pair of option values (a greedy all-pairs design) plus the full product
family x inner loss x trajectory for the sharing check; ``-m slow`` runs the whole cross product.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from bilevel_dlm import (AdaptConfig, InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig,
                         TrajectoryConfig)
from bilevel_dlm.losses import INNER_LOSSES
from test_backbones_bilevel import FAMILIES, bitwise_equal, make_batch, snapshot
from toy import ToyDLM, toy_batch

PAD = 1
FACTORS = {
    "family": ("llada", "llada_moe", "llada_moe_shared", "dream", "mdlm", "llada2"),
    "loss": INNER_LOSSES,
    "trajectory": ("anchor_consistent", "pre_only", "anchor_only", "progressive"),
    "mode": ("first_order", "unrolled"),
    "memory": ("shared", "per_sample"),
    "padding": ("none", "right", "left", "documents"),
    "checkpointing": ("off", "on"),
    "objective": ("mdlm", "cart"),
    "init": ("fresh", "meta"),
}
LENGTH, PROMPT, REAL_LENGTHS = 12, 4, (12, 9, 7)
GRADIENT_TOLERANCE = {"first_order": 1e-10, "unrolled": 1e-6}


def all_pairs(factors: dict[str, tuple], valid: Callable[[tuple], bool] = lambda row: True) -> list[tuple]:
    """A small set of ``valid`` combinations in which every pair of values of two factors that some valid
    combination holds occurs (greedy, deterministic)."""
    names = list(factors)
    product = [row for row in itertools.product(*factors.values()) if valid(row)]

    def pairs(row: tuple) -> set:
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(names)), 2)}

    uncovered = set().union(*(pairs(row) for row in product))
    chosen = []
    while uncovered:
        best = max(product, key=lambda row: len(pairs(row) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def valid(row: tuple) -> bool:
    """CART weights tokens by their context along the row, which packed documents kept apart would cross
    (refused with an error, checked in tests/test_finetune_data.py)."""
    options = dict(zip(FACTORS, row))
    return not (options["padding"] == "documents" and options["objective"] == "cart")


PAIRWISE = all_pairs(FACTORS, valid)
SHARING = [(f, l, t, "first_order", "shared", "none", "off", "mdlm", "fresh")
           for f in FACTORS["family"] for l in FACTORS["loss"] for t in FACTORS["trajectory"]]
DEFAULT = sorted(set(PAIRWISE) | set(SHARING))
REST = [row for row in itertools.product(*FACTORS.values()) if valid(row) and row not in set(DEFAULT)]


def padded(batch: dict, padding: str) -> dict:
    """Rows of ``REAL_LENGTHS`` real tokens, padded on the right or the left (labels -100, attention 0); or
    full rows that pack two documents kept apart in attention (``document_ids``: the first 5 tokens, the rest)."""
    if padding == "none":
        return batch
    if padding == "documents":
        return {**batch, "document_ids": (torch.arange(LENGTH) >= 5).long().expand(len(REAL_LENGTHS), -1)}
    out = {key: value.clone() for key, value in batch.items()}
    out["input_ids"].fill_(PAD)
    out["labels"].fill_(-100)
    out["attention_mask"].zero_()
    for row, n in enumerate(REAL_LENGTHS):
        place = slice(0, n) if padding == "right" else slice(LENGTH - n, LENGTH)
        for key in out:
            out[key][row, place] = batch[key][row, :n]
    return out


def prompts(batch: dict, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part of each row (its first ``PROMPT`` real tokens), in the same padding layout."""
    ids, mask = batch["input_ids"][:, :PROMPT].clone(), torch.ones(len(REAL_LENGTHS), PROMPT, dtype=torch.long)
    if padding in ("right", "left"):
        lengths = (PROMPT, PROMPT - 1, PROMPT - 2)
        for row, n in enumerate(lengths):
            place = slice(0, n) if padding == "right" else slice(PROMPT - n, PROMPT)
            real = batch["input_ids"][row, :n].clone()
            ids[row], mask[row] = PAD, 0
            ids[row, place], mask[row, place] = real, 1
    return ids, mask


def recipe(loss: str, trajectory: str, mode: str, memory: str, objective: str = "mdlm", init: str = "fresh") -> MemDLMConfig:
    meta_init = "none" if init == "fresh" else {"first_order": "fomaml", "unrolled": "maml"}[mode]
    return MemDLMConfig(
        memory=MemoryConfig(rank=4, layer_fraction=0.5, dtype="float64", per_sample=memory == "per_sample"),
        inner=InnerConfig(loss=loss, mode=mode, lr=0.5, meta_init=meta_init),
        trajectory=TrajectoryConfig(kind=trajectory),
        outer=OuterConfig(objective=objective),
    )


def one_step(family: str, config: MemDLMConfig, batch: dict, checkpointing: str, share: bool,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
    """Outer loss, inner result and theta's gradient of one bilevel step on a tiny model (float64 by default)."""
    model = FAMILIES[family].build(0).to(device, dtype).train()
    if checkpointing == "on":
        model.gradient_checkpointing_enable()
    wrapper = MemoryWrapper(model, config)
    wrapper.share_prefix = share
    with wrapper.bilevel_context():
        loss, inner, _ = wrapper.compute_loss(wrapper.prepare(batch))
        loss.backward()
    wrapper.inner.after_backward()  # FOMAML's phi_0 gradient
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads.update({f"phi_0.{i}": p.grad.clone() for i, p in enumerate(wrapper.inner.meta_parameters())
                  if p.grad is not None})  # None: an MoE expert that received no token
    return wrapper, loss.detach(), inner, grads


def check(family: str, loss: str, trajectory: str, mode: str, memory: str, padding: str, checkpointing: str,
          objective: str, init: str, device: torch.device | str = "cpu") -> None:
    config = recipe(loss, trajectory, mode, memory, objective, init)
    batch = padded(make_batch(FAMILIES[family].bos, n=len(REAL_LENGTHS), length=LENGTH, prompt=PROMPT, seed=1), padding)
    wrapper, shared_loss, inner, shared_grads = one_step(family, config, batch, checkpointing, True, device)
    _, plain_loss, plain_inner, plain_grads = one_step(family, config, batch, checkpointing, False, device)

    assert torch.isfinite(inner.losses).all() and math.isfinite(float(shared_loss))
    assert (inner.grad_norms > 0).all(), f"a stage did not move the fast weights: {inner.grad_norms}"
    torch.testing.assert_close(inner.losses, plain_inner.losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-10, atol=1e-12)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    # Unrolled: the shared prefix node sums the outer and the unrolled path's gradients in another order,
    # and the models compute their norms / rotary tables in float32 as the releases do, so agreement is at
    # float32 rounding (the all-float64 toy model below agrees to 1e-12).
    tolerance = GRADIENT_TOLERANCE[mode]
    for name, grad in shared_grads.items():
        error = float((grad - plain_grads[name]).norm() / plain_grads[name].norm().clamp_min(1e-30))
        assert error <= tolerance, f"{name}: relative gradient difference {error:.2e} > {tolerance:.0e}"

    model = wrapper.model
    before = snapshot(model)
    memory_state = wrapper.adapt(*prompts(batch, padding))
    changed = [k for k, v in snapshot(model).items() if not bitwise_equal(before[k], v)]
    assert not changed, f"adapt changed base weights {changed[:3]}"
    assert any(bool(v.abs().sum() > 0) for n, v in zip(memory_state.names, memory_state.values) if "lora_B" in n)


def test_the_default_design_covers_every_pair_of_option_values() -> None:
    names = list(FACTORS)
    product = [row for row in itertools.product(*FACTORS.values()) if valid(row)]
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        for u, v in itertools.product(FACTORS[a], FACTORS[b]):
            if any(row[i] == u and row[j] == v for row in product):
                assert any(row[i] == u and row[j] == v for row in DEFAULT), (a, u, b, v)


@pytest.mark.device
@pytest.mark.parametrize("combination", DEFAULT, ids="-".join)
def test_one_step_under_the_option_combination(combination: tuple, device: torch.device) -> None:
    check(*combination, device=device)


@pytest.mark.device
@pytest.mark.parametrize("family", FACTORS["family"])
def test_one_step_with_a_bfloat16_base_and_float32_fast_weights(family: str, device: torch.device) -> None:
    """The mixed precision users train in: finite losses, every stage moves the fast weights (float32, whatever
    the base dtype), prefix sharing equals recomputation to bfloat16 rounding, adapt leaves the base bitwise."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5), inner=InnerConfig(lr=0.5))
    batch = padded(make_batch(FAMILIES[family].bos, n=len(REAL_LENGTHS), length=LENGTH, prompt=PROMPT, seed=1), "right")
    wrapper, shared_loss, inner, shared_grads = one_step(family, config, batch, "off", True, device, torch.bfloat16)
    _, plain_loss, _, plain_grads = one_step(family, config, batch, "off", False, device, torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in wrapper.memory.values) or not wrapper.memory.values
    assert torch.isfinite(inner.losses).all() and math.isfinite(float(shared_loss))
    assert (inner.grad_norms > 0).all()
    torch.testing.assert_close(shared_loss.float(), plain_loss.float(), rtol=2e-2, atol=1e-3)
    for name, grad in shared_grads.items():
        error = float((grad.float() - plain_grads[name].float()).norm() / plain_grads[name].float().norm().clamp_min(1e-30))
        assert error <= 5e-2, f"{name}: relative gradient difference {error:.2e} in bfloat16"
    before = snapshot(wrapper.model)
    wrapper.adapt(*prompts(batch, "right"))
    assert all(bitwise_equal(before[k], v) for k, v in snapshot(wrapper.model).items())


@pytest.mark.slow
@pytest.mark.parametrize("combination", REST, ids="-".join)
def test_one_step_under_the_rest_of_the_cross_product(combination: tuple) -> None:
    check(*combination)


@pytest.mark.parametrize("loss", INNER_LOSSES)
@pytest.mark.parametrize("mode", FACTORS["mode"])
def test_prefix_sharing_is_exact_on_an_all_float64_model(mode: str, loss: str) -> None:
    grads = []
    for share in (True, False):
        model = ToyDLM(n_blocks=4).double()
        config = MemDLMConfig(memory=MemoryConfig(rank=3, layer_fraction=0.5, dtype="float64"),
                              inner=InnerConfig(mode=mode, loss=loss, lr=0.5))
        wrapper = MemoryWrapper(model, config)
        wrapper.share_prefix = share
        with wrapper.bilevel_context():
            outer, _, _ = wrapper.compute_loss(wrapper.prepare(toy_batch(4, 12)))
            outer.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for shared, plain in zip(*grads):
        assert float((shared - plain).norm() / plain.norm()) <= 1e-12


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_adaptation_learning_rate_equals_adapting_with_that_inner_rate(optimizer: str) -> None:
    """adapt.lr = x must adapt exactly as a wrapper whose inner optimizer runs at x."""
    prompts_ = make_batch(None, n=3, length=8, seed=2)["input_ids"]
    states = []
    for inner_lr, adapt_lr in ((0.1, 0.02), (0.02, None)):
        config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5),
                              inner=InnerConfig(optimizer=optimizer, lr=inner_lr),
                              adapt=AdaptConfig(lr=adapt_lr))
        states.append(MemoryWrapper(FAMILIES["llada"].build(0), config).adapt(prompts_, seed=1).state())
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=0, atol=0)


@pytest.mark.parametrize("family", FACTORS["family"])
def test_accumulated_micro_batches_equal_the_whole_batch_with_per_sample_memory(family: str) -> None:
    """Gradient accumulation (``step`` on a list of micro-batches, each adapting its own memory, the loss
    normalised over all of them) against the plain step on the whole batch: with per-sample memory and draws
    keyed by example, the same loss and the same updated weights (float64)."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5, dtype="float64", per_sample=True),
                          inner=InnerConfig(lr=0.5))
    batch = padded(make_batch(FAMILIES[family].bos, n=len(REAL_LENGTHS), length=LENGTH, prompt=PROMPT, seed=1), "right")
    batch["example_index"] = torch.arange(len(REAL_LENGTHS))
    parts = [{key: value[rows] for key, value in batch.items()} for rows in (slice(0, 2), slice(2, 3))]
    results = []
    for step_input in (batch, parts):
        wrapper = MemoryWrapper(FAMILIES[family].build(0).double(), config)
        metrics = wrapper.step(step_input)
        results.append((metrics, [p.detach().clone() for p in wrapper.model.parameters()]))
    (whole, whole_weights), (accumulated, accumulated_weights) = results
    assert accumulated["outer_loss"] == pytest.approx(whole["outer_loss"], rel=1e-9)
    for a, b in zip(accumulated_weights, whole_weights):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
