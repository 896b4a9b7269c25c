"""Inner optimizers: per-tensor clipping, presets and MetaSGD against hand computations."""

import torch
import torchopt

from bilevel_dlm import MetaSGD, per_tensor_clip, sgd
from bilevel_dlm.config import InnerConfig
from bilevel_dlm.optim import build_inner_optimizer


def _grads():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 6, generator=g) * 3, torch.randn(5, 4, generator=g) * 0.01)


def test_per_tensor_clip_scales_each_tensor_separately():
    grads = _grads()
    clipped, _ = per_tensor_clip(1.0).update(grads, None)
    big, small = grads
    assert torch.allclose(clipped[0], big / big.norm())
    assert torch.equal(clipped[1], small)  # under the threshold: untouched
    assert abs(clipped[0].norm().item() - 1.0) < 1e-6


def test_per_sample_clip_clips_each_row_as_if_alone():
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(3, 4, 6, generator=g) * torch.tensor([0.01, 1.0, 10.0])[:, None, None]
    clipped, _ = per_tensor_clip(0.5).update((stacked,), None)
    for row in range(3):
        alone, _ = per_tensor_clip(0.5).update((stacked[row],), None)
        assert torch.allclose(clipped[0][row], alone[0])


def test_sgd_preset_is_clip_then_sgd():
    grads = _grads()
    params = tuple(torch.zeros_like(g) for g in grads)
    opt = sgd(0.1, 1.0)
    updates, _ = opt.update(grads, opt.init(params), params=params, inplace=False)
    expected = [-0.1 * g * min(1.0, 1.0 / g.norm().item()) for g in grads]
    for u, e in zip(updates, expected):
        assert torch.allclose(u, e)


def test_metasgd_uses_learned_rates_and_is_differentiable():
    meta = MetaSGD(["a", "b"], lr=0.1, clip=None)
    with torch.no_grad():
        meta.log_lr.copy_(torch.log(torch.tensor([0.1, 0.3])))
    grads = _grads()
    transformation = meta.transformation()
    updates, _ = transformation.update(grads, transformation.init(grads))
    assert torch.allclose(updates[0], -0.1 * grads[0]) and torch.allclose(updates[1], -0.3 * grads[1])
    updates[1].sum().backward()
    # d(-lr * sum g)/d log_lr = -lr * sum g
    assert torch.allclose(meta.log_lr.grad, torch.tensor([0.0, -0.3 * grads[1].sum().item()]), atol=1e-6)


def test_build_by_name():
    assert isinstance(build_inner_optimizer(InnerConfig(optimizer="metasgd", mode="unrolled"), ["x"]), MetaSGD)
    adam = build_inner_optimizer(InnerConfig(optimizer="adam", lr=0.01, clip=None), ["x"])
    p = (torch.zeros(2, 2),)
    g = (torch.ones(2, 2),)
    u, _ = adam.update(g, adam.init(p), params=p, inplace=False)
    reference = torchopt.adam(0.01)
    r, _ = reference.update(g, reference.init(p), params=p, inplace=False)
    assert torch.allclose(u[0], r[0])
