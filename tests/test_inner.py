"""InnerLoop: hand-written reference, first-order semantics, unrolled gradients, host syncs."""

import copy

import higher
import pytest
import torch
import torch.nn.functional as F

from bilevel_dlm import (InnerConfig, InnerLoop, MemDLMConfig, MemoryConfig, MemoryParams,
                         MemoryWrapper, MetaSGD, ModelView, OuterConfig, OuterLoop, Stage, TrajectorySimulator)
from bilevel_dlm.trajectory import masked_fraction
from bilevel_dlm.diagnostics import HostSyncCounter
from toy import MASK_ID, ToyBackbone, ToyDLM, toy_batch

TARGETS = ("ff_proj", "up_proj", "ff_out")


class FixedStages(TrajectorySimulator):
    """Deterministic stages from given masks (for hand-written references)."""

    def __init__(self, masks):
        self.masks = masks

    def __call__(self, x0, maskable, anchor, steps, mask_token_id, generator=None):
        return [Stage(torch.where(m, mask_token_id, x0), m, m, masked_fraction(m, maskable),
                      is_anchor=torch.equal(m, anchor.masked)) for m in self.masks]


def _prepared(batch=3, length=10, seed=0):
    raw = toy_batch(batch, length, seed=seed)
    maskable = raw["labels"] != -100
    return raw["input_ids"], maskable, raw["attention_mask"]


def _masks(maskable, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = maskable & (torch.rand(maskable.shape, generator=g) < 0.7)
    anchor = pre & (torch.rand(maskable.shape, generator=g) < 0.6)
    return [pre, anchor]


def manual_logits(model, ids, lora, scale):
    """The toy model's forward written out, with LoRA deltas added explicitly (independent of hooks)."""
    x = model.embed(ids)
    for index, block in enumerate(model.blocks):
        scores = block.q_proj(x) @ block.k_proj(x).mT / x.shape[-1] ** 0.5
        x = x + block.attn_out(scores.softmax(-1) @ block.v_proj(x))

        def lin(name, h):
            out = F.linear(h, getattr(block, name).weight)
            key = f"blocks.{index}.{name}"
            if key in lora:
                a, b = lora[key]
                out = out + scale * (h @ a.mT) @ b.mT
            return out

        x = x + lin("ff_out", F.silu(lin("ff_proj", x)) * lin("up_proj", x))
    return model.lm_head(torch.tanh(x))


def manual_stage_loss(logits, x0, mask, maskable):
    t = (mask.sum(1) / maskable.sum(1)).clamp_min(1e-3)
    ce = F.cross_entropy(logits[mask], x0[mask], reduction="none")
    rows = torch.arange(x0.shape[0])[:, None].expand_as(mask)[mask]
    return (ce / t[rows]).sum() / mask.sum()


def _lora_dict(memory, values):
    return {path: (values[2 * i], values[2 * i + 1]) for i, path in enumerate(memory.targets)}


def _loop(model, masks, config, memory_config=None, dtype=torch.float32, optimizer=None):
    memory = MemoryParams(model, memory_config or MemoryConfig(rank=3, alpha=6.0, layer_fraction=1.0),
                          backbone=ToyBackbone(), dtype=dtype)
    view = ModelView(ToyBackbone(), model, MASK_ID)
    return InnerLoop(view, memory, FixedStages(masks), optimizer, config), memory, view


def _anchor(x0, mask):
    from bilevel_dlm.noise import Anchor
    return Anchor(t=torch.full((x0.shape[0],), 0.5), masked=mask, input_ids=torch.where(mask, MASK_ID, x0))


def test_inner_loop_equals_hand_written_two_stage_sgd_with_per_tensor_clipping():
    model = ToyDLM(n_blocks=1)
    x0, maskable, attention = _prepared()
    masks = _masks(maskable)
    loop, memory, _ = _loop(model, masks, InnerConfig(lr=0.1, clip=1.0))
    result = loop.run(x0, maskable, _anchor(x0, masks[1]), generator=torch.Generator().manual_seed(7))

    reference = MemoryParams(model, memory.config, backbone=ToyBackbone())
    reference.reset(generator=torch.Generator().manual_seed(7))
    values = [v.clone().requires_grad_() for v in reference.values]
    for param in model.parameters():
        param.requires_grad_(False)
    hand_losses = []
    for mask in masks:
        logits = manual_logits(model, torch.where(mask, MASK_ID, x0), _lora_dict(memory, values), scale=2.0)
        loss = manual_stage_loss(logits, x0, mask, maskable)
        grads = torch.autograd.grad(loss, values)
        values = [(v - 0.1 * g * min(1.0, 1.0 / max(g.norm().item(), 1e-12))).detach().requires_grad_() for v, g in zip(values, grads)]
        hand_losses.append(loss.item())
    for ours, hand in zip(memory.values, values):
        assert torch.allclose(ours, hand, atol=1e-6)
    assert torch.allclose(result.losses, torch.tensor(hand_losses), atol=1e-6)
    assert all(not v.requires_grad for v in memory.values), "first order: phi_K is a constant"


def _wrapper(model, **inner):
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.34),
                          inner=InnerConfig(**inner),
                          outer=OuterConfig(lr=1e-2, warmup_ratio=0.0, lr_schedule="constant"), seed=3)
    return MemoryWrapper(model, config)


def test_first_order_gradient_holds_the_adapted_memory_constant():
    model = ToyDLM(n_blocks=3)
    wrapper = _wrapper(model)
    batch = wrapper.prepare(toy_batch(4, 12, seed=1))
    loss, _, anchor = wrapper.compute_loss(batch)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    constant = MemoryParams(model, wrapper.config.memory, backbone=ToyBackbone())
    constant.load_state(wrapper.memory.state())
    with constant.bind():
        wrapper.outer.loss(batch.x0, batch.maskable, anchor, batch.attention_mask).backward()
    for a, b in zip(ours, model.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6)
    assert wrapper.memory.first_block == 1, "the prefix replay path must be exercised"


def test_inner_lr_zero_step_equals_plain_mdlm_step():
    model = ToyDLM(n_blocks=3)
    plain = copy.deepcopy(model)
    wrapper = _wrapper(model, lr=0.0)
    raw = toy_batch(4, 12, seed=2)
    wrapper.step(raw)

    batch = wrapper.prepare(raw)
    outer = OuterLoop(ModelView(ToyBackbone(), plain, MASK_ID), wrapper.config.outer)
    anchor = outer.sample_anchor(batch.x0, batch.maskable, torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    outer.loss(batch.x0, batch.maskable, anchor, batch.attention_mask).backward()
    torch.nn.utils.clip_grad_norm_(list(plain.parameters()), 1.0)
    optimizer.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def _unrolled_objective(model, meta, x0, maskable, attention, masks, memory_config):
    loop, memory, view = _loop(model, masks, InnerConfig(mode="unrolled", optimizer="metasgd", lr=0.3),
                               memory_config, dtype=torch.float64, optimizer=meta)
    anchor = _anchor(x0, masks[-1])
    loop.run(x0, maskable, anchor, attention, generator=torch.Generator().manual_seed(11))
    with memory.bind():
        return OuterLoop(view).loss(x0, maskable, anchor, attention)


def test_unrolled_gradients_match_central_finite_differences_in_float64():
    model = ToyDLM(n_blocks=2, d=8, f=12).double()
    memory_config = MemoryConfig(rank=2, alpha=4.0, layer_fraction=0.5)
    x0, maskable, attention = _prepared(2, 8)
    masks = _masks(maskable, seed=3)
    names = MemoryParams(model, memory_config, backbone=ToyBackbone()).names
    meta = MetaSGD(names, lr=0.3, clip=1.0).double()
    with torch.no_grad():
        meta.log_lr.add_(torch.linspace(-0.2, 0.2, len(names), dtype=torch.float64))
    params = list(model.parameters()) + [meta.log_lr]
    loss = _unrolled_objective(model, meta, x0, maskable, attention, masks, memory_config)
    grads = torch.autograd.grad(loss, params)
    assert grads[-1].abs().sum() > 0, "MetaSGD rates must receive gradient"
    g = torch.Generator().manual_seed(0)
    for trial in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        if trial == 2:  # rates only
            direction = [torch.zeros_like(p) for p in params[:-1]] + [direction[-1]]
        analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()
        eps = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
            values.append(_unrolled_objective(model, meta, x0, maskable, attention, masks, memory_config).item())
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(analytic - numeric) / max(abs(numeric), 1e-8) < 1e-4, (trial, analytic, numeric)


class ExplicitLoRAToy(torch.nn.Module):
    """Reference for ``higher``: the toy model with its LoRA pairs as ordinary parameters."""

    def __init__(self, base, init, paths, scale):
        super().__init__()
        self.base, self.paths, self.scale = base, paths, scale
        self.lora = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in init])

    def forward(self, ids):
        lora = {p: (self.lora[2 * i], self.lora[2 * i + 1]) for i, p in enumerate(self.paths)}
        return manual_logits(self.base, ids, lora, self.scale)


def test_unrolled_gradients_equal_higher_on_a_model_higher_can_run():
    model = ToyDLM(n_blocks=2)
    x0, maskable, attention = _prepared()
    masks = _masks(maskable, seed=4)
    config = MemoryConfig(rank=3, alpha=6.0, layer_fraction=0.5)
    loop, memory, view = _loop(model, masks, InnerConfig(mode="unrolled", lr=0.5, clip=1.0), config)
    anchor = _anchor(x0, masks[-1])
    loop.run(x0, maskable, anchor, generator=torch.Generator().manual_seed(5))
    with memory.bind():
        OuterLoop(view).loss(x0, maskable, anchor, attention).backward()

    base = copy.deepcopy(model)
    base.zero_grad(set_to_none=True)
    init = MemoryParams(base, config, backbone=ToyBackbone())
    init.reset(generator=torch.Generator().manual_seed(5))
    reference = ExplicitLoRAToy(base, init.values, list(init.targets), scale=2.0)
    inner_opt = torch.optim.SGD(reference.lora.parameters(), lr=0.5)
    clip = lambda grads: [g * torch.clamp(1.0 / g.norm().clamp_min(1e-12), max=1.0) for g in grads]  # noqa: E731
    with higher.innerloop_ctx(reference, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for mask in masks:
            loss = manual_stage_loss(fmodel(torch.where(mask, MASK_ID, x0)), x0, mask, maskable)
            diffopt.step(loss, grad_callback=clip)
        logits = fmodel(anchor.input_ids)
        ce = F.cross_entropy(logits[anchor.masked], x0[anchor.masked], reduction="none")
        rows = torch.arange(x0.shape[0])[:, None].expand_as(anchor.masked)[anchor.masked]
        ((ce / anchor.t[rows]).sum() / maskable.sum()).backward()
    for ours, theirs in zip(model.parameters(), base.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["first_order", "unrolled"])
def test_higher_backend_equals_torchopt_backend(mode):
    x0, maskable, attention = _prepared()
    masks = _masks(maskable, seed=6)
    results = []
    for backend in ("torchopt", "higher"):
        model = ToyDLM(n_blocks=2)
        loop, memory, view = _loop(model, masks, InnerConfig(mode=mode, backend=backend, lr=0.2),
                                   MemoryConfig(rank=2, layer_fraction=0.5))
        anchor = _anchor(x0, masks[-1])
        inner = loop.run(x0, maskable, anchor, generator=torch.Generator().manual_seed(1))
        with memory.bind():
            OuterLoop(view).loss(x0, maskable, anchor, attention).backward()
        results.append((inner.losses, inner.grad_norms, memory.state(), [p.grad for p in model.parameters()]))
    (l1, n1, s1, g1), (l2, n2, s2, g2) = results
    assert torch.allclose(l1, l2) and torch.allclose(n1, n2, atol=1e-6)
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) for k in s1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_the_bilevel_forward_syncs_once_per_stage_and_once_for_the_outer_loss():
    model = ToyDLM(n_blocks=3)
    wrapper = _wrapper(model)
    batch = wrapper.prepare(toy_batch(4, 12, seed=1))
    with HostSyncCounter() as counter:
        loss, _, _ = wrapper.compute_loss(batch)
        loss.backward()
    assert dict(counter.events) == {"nonzero": wrapper.config.inner.steps + 1}


@pytest.mark.parametrize("kind", ["ce", "kl", "reverse_kl", "hidden_mse", "hidden_cosine"])
def test_every_inner_loss_adapts_the_memory(kind):
    model = ToyDLM(n_blocks=2)
    x0, maskable, _ = _prepared()
    masks = _masks(maskable, seed=2)
    loop, memory, _ = _loop(model, masks, InnerConfig(loss=kind, lr=0.5), MemoryConfig(rank=2, layer_fraction=0.5))
    result = loop.run(x0, maskable, _anchor(x0, masks[-1]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.losses).all() and (result.losses >= 0).all()
    assert (result.grad_norms > 0).all()
    assert any(torch.count_nonzero(v) > 0 for v in memory.values[1::2]), "B must move away from zero"


def test_zero_inner_steps_is_the_plain_mdlm_baseline():
    model = ToyDLM(n_blocks=3)
    plain = copy.deepcopy(model)
    wrapper = _wrapper(model, steps=0)
    raw = toy_batch(4, 12, seed=2)
    metrics = wrapper.step(raw)
    assert not any(name.startswith("inner_") for name in metrics)
    lr_zero = _wrapper(plain, lr=0.0)
    lr_zero.step(raw)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
