"""KV cache (prefix / dual): the windowed forward against the full one, the cached sampler against the
plain one, batch rows against rows alone, and refusals."""

from __future__ import annotations

import pytest
import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.integrations.dream import DreamModel, tiny_config as dream_tiny_config
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.integrations.llada_moe import LLaDAMoEModelLM, tiny_config as moe_tiny_config
from bilevel_dlm.kv_cache import KVCache, supports_kv_cache
from bilevel_dlm.sampling import LLaDASampler
from test_backbones_bilevel import FAMILIES

CACHED_FAMILIES = ("llada", "llada_moe", "llada_moe_shared")  # the native models whose forward takes kv_cache


def wrapper(family: str = "llada") -> MemoryWrapper:
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5), inner=InnerConfig(lr=20.0, clip=None))
    return MemoryWrapper(FAMILIES[family].build(0).eval(), config)


def left_padded(batch: int = 3, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 120, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", CACHED_FAMILIES)
@pytest.mark.parametrize("window", [(10, 24), (10, 16), (0, 24), (23, 24)])
def test_a_windowed_forward_on_the_stored_canvas_equals_the_full_forward(window, family: str) -> None:
    """With per-sample memory bound (MoE experts included) and left padding, the window's logits after a
    full forward on the same canvas equal the full forward's there (prefix window: to the end; dual: a block)."""
    w = wrapper(family)
    ids, mask = left_padded()
    memory = w.adapt(ids, mask)
    canvas = torch.cat([ids, torch.randint(2, 120, (3, 14), generator=torch.Generator().manual_seed(2))], 1)
    attention = torch.cat([mask, torch.ones(3, 14, dtype=mask.dtype)], 1)
    cache = KVCache()
    with torch.no_grad(), memory.bind():
        full = w.model(canvas, attention_mask=attention).logits
        stored = w.model(canvas, attention_mask=attention, kv_cache=cache).logits
        cache.window = window
        windowed = w.model(canvas, attention_mask=attention, kv_cache=cache).logits
    assert torch.equal(stored, full)
    torch.testing.assert_close(windowed, full[:, slice(*window)], rtol=1e-5, atol=1e-5)


def test_stored_entries_outside_the_window_are_those_of_the_last_full_forward() -> None:
    """A changed token outside the window changes nothing until the next full forward (the approximation)."""
    w = wrapper()
    canvas = torch.randint(2, 120, (1, 16), generator=torch.Generator().manual_seed(3))
    cache = KVCache()
    with torch.no_grad():
        w.model(canvas, kv_cache=cache)
        cache.window = (8, 12)
        before = w.model(canvas, kv_cache=cache).logits
        changed = canvas.clone()
        changed[0, 2] = 5 if canvas[0, 2] != 5 else 6
        assert torch.equal(w.model(changed, kv_cache=cache).logits, before)
        assert not torch.allclose(w.model(changed).logits[:, 8:12], before)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_with_one_step_per_block_the_cached_sampler_is_the_plain_one(cache: str) -> None:
    w = wrapper()
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, block_length=2, steps=4, seed=0)
    assert torch.equal(w.generate(ids, mask, cache=cache, **settings), w.generate(ids, mask, **settings))


@pytest.mark.parametrize("family", CACHED_FAMILIES)
@pytest.mark.parametrize("adapt", [True, "blocks"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_generation_of_a_batch_row_equals_the_row_alone(cache: str, adapt, family: str) -> None:
    """Per-sample prompt memory (re-adapted after each block with 'blocks') is bound while the cache is built."""
    w = wrapper(family)
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, block_length=4, steps=8, seed=3, cache=cache, adapt=adapt)
    batched = w.generate(ids, mask, **settings)
    for row in range(3):
        alone = w.generate(ids[row:row + 1, mask[row].bool()], **settings)
        assert torch.equal(batched[row, -8:], alone[0, -8:])
    assert not torch.equal(batched, w.generate(ids, mask, **{**settings, "adapt": False}))


def test_the_cache_is_refused_where_it_cannot_work() -> None:
    assert supports_kv_cache(LLaDAModelLM(tiny_config())) and supports_kv_cache(LLaDAMoEModelLM(moe_tiny_config()))
    assert not supports_kv_cache(DreamModel(dream_tiny_config()))
    w = wrapper()
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="classifier-free guidance"):
        w.generate(ids, mask, max_new_tokens=4, cache="prefix", cfg_scale=1.0)
    dream = MemoryWrapper(DreamModel(dream_tiny_config()).eval())
    with pytest.raises(ValueError, match="takes no kv_cache parameter"):
        LLaDASampler(cache="dual").sample(dream.view, ids, max_new_tokens=4)
