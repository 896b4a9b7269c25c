"""KV cache (prefix / dual): the windowed forward against the full one, the cached samplers (LLaDA, Dream,
block diffusion) against the plain ones, batch rows against rows alone, the columns computed, refusals."""

from __future__ import annotations

import sys

import pytest
import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.integrations.dream import DreamModel, tiny_config as dream_tiny_config
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.integrations.llada_moe import LLaDAMoEModelLM, tiny_config as moe_tiny_config
from bilevel_dlm.kv_cache import KVCache, supports_kv_cache
from bilevel_dlm.integrations.mdlm import build_tiny_model
from bilevel_dlm.sampling import DreamSampler, LLaDASampler
from test_backbones_bilevel import FAMILIES, confident

CACHED_FAMILIES = ("llada", "llada_moe", "llada_moe_shared")  # decoded by the LLaDA sampler, with kv_cache
WINDOWED_FAMILIES = (*CACHED_FAMILIES, "dream", "llada2")  # every native model whose forward takes kv_cache


def wrapper(family: str = "llada", sharp: bool = False, device: torch.device | str = "cpu") -> MemoryWrapper:
    """A tiny model with memory; ``sharp``: its head scaled so that thresholds have confidences to act on."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5), inner=InnerConfig(lr=20.0, clip=None))
    model = FAMILIES[family].build(0).to(device).eval()
    return MemoryWrapper(confident(model) if sharp else model, config)


def left_padded(batch: int = 3, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 120, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", WINDOWED_FAMILIES)
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


def test_stored_entries_outside_the_window_are_those_of_the_last_forward_that_computed_them() -> None:
    """A changed token outside the window changes nothing until a forward computes its column again (the
    approximation); a growing block-causal canvas reuses what windowed forwards stored (the next test)."""
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


def test_a_growing_block_causal_canvas_is_computed_exactly_from_the_stored_blocks() -> None:
    """Each forward stores what it computed: under block-causal attention (blocks of 4) a canvas grown by a
    block, or changed in its last stored block, needs only the columns from that block on."""
    w = wrapper("llada2")
    canvas = torch.randint(2, 120, (2, 16), generator=torch.Generator().manual_seed(4))
    blocks = torch.arange(16) // 4
    attention = (blocks[None, :] <= blocks[:, None])[None, None].expand(2, 1, 16, 16)
    cache = KVCache()

    def forward(length: int, window: tuple[int, int] | None) -> torch.Tensor:
        cache.window = window
        return w.model(canvas[:, :length], attention_mask=attention[:, :, :length, :length], kv_cache=cache).logits

    def full(length: int) -> torch.Tensor:
        return w.model(canvas[:, :length], attention_mask=attention[:, :, :length, :length]).logits

    with torch.no_grad():
        forward(8, None)
        torch.testing.assert_close(forward(12, (4, 12)), full(12)[:, 4:], rtol=1e-5, atol=1e-5)
        canvas[:, 9] = 3
        torch.testing.assert_close(forward(16, (8, 16)), full(16)[:, 8:], rtol=1e-5, atol=1e-5)
        for length, window in ((16, (3, 17)), (20, (8, 12)), (12, (4, 12))):
            with pytest.raises(ValueError, match="does not fit a canvas"):
                cache.window = window
                cache.columns(length)
    fresh = KVCache()
    fresh.window = (0, 4)
    with pytest.raises(RuntimeError, match="needs a full forward first"):
        fresh.columns(8)


@pytest.mark.device
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_with_one_step_per_block_the_cached_sampler_is_the_plain_one(cache: str, device: torch.device) -> None:
    w = wrapper(device=device)
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, block_length=2, steps=4, seed=0)
    assert torch.equal(w.generate(ids, mask, cache=cache, **settings), w.generate(ids, mask, **settings))


@pytest.mark.device
@pytest.mark.parametrize("family", CACHED_FAMILIES)
@pytest.mark.parametrize("adapt", [True, "blocks"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_generation_of_a_batch_row_equals_the_row_alone(cache: str, adapt, family: str,
                                                              device: torch.device) -> None:
    """Per-sample prompt memory (re-adapted after each block with 'blocks') is bound while the cache is built."""
    w = wrapper(family, device=device)
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, block_length=4, steps=8, seed=3, cache=cache, adapt=adapt)
    batched = w.generate(ids, mask, **settings)
    for row in range(3):
        alone = w.generate(ids[row:row + 1, mask[row].bool()], **settings)
        assert torch.equal(batched[row, -8:], alone[0, -8:])
    assert not torch.equal(batched, w.generate(ids, mask, **{**settings, "adapt": False}))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.7])
def test_with_a_full_forward_every_step_the_cached_sampler_is_the_plain_one(cache: str, threshold) -> None:
    """cache_refresh=1: every step refreshes, so the tokens are exactly those of uncached decoding (also
    when the threshold ends blocks early); a refresh interval of a whole block is the default (once per block)."""
    w = wrapper(sharp=True)
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, block_length=4, steps=8, seed=0, threshold=threshold, adapt=False)
    plain = w.generate(ids, mask, **settings)
    calls = w.generate(ids, mask, return_history=True, **settings).model_calls
    assert calls == 8 if threshold is None else calls < 8
    assert torch.equal(w.generate(ids, mask, cache=cache, cache_refresh=1, **settings), plain)
    assert torch.equal(w.generate(ids, mask, cache=cache, cache_refresh=4, **settings),
                       w.generate(ids, mask, cache=cache, **settings))


@torch.no_grad()
def stale_key_value_logits(model: LLaDAModelLM, canvas: torch.Tensor, stored: dict | None, window: slice) -> tuple:
    """Logits of ``canvas`` as Fast-dLLM's cache computes them, from the model's own full forward: every
    block's key and value projections outside ``window`` are replaced by those ``stored`` at the last full
    forward (None: this is one; the projections are returned to be stored)."""
    recorded, handles = {}, []
    for index, block in enumerate(model.model.transformer.blocks):
        for name in ("k_proj", "v_proj"):
            def patch(module, args, output, key=(index, name)):
                if stored is None:
                    recorded[key] = output.clone()
                    return output
                patched = stored[key].clone()
                patched[:, window] = output[:, window]
                return patched
            handles.append(getattr(block, name).register_forward_hook(patch))
    try:
        logits = model(canvas).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, recorded if stored is None else stored


@torch.no_grad()
def stale_cache_decoding(model: LLaDAModelLM, prompt: torch.Tensor, new_tokens: int, block_length: int, steps: int,
                         refresh: int, cache: str) -> torch.Tensor:
    """LLaDA's low-confidence schedule (one row) on Fast-dLLM's prefix / dual cache, refreshed by a full forward
    at every ``refresh``-th step of a block: the window is the block and what follows it (prefix) or the
    block alone (dual)."""
    mask_id = model.config.mask_token_id
    canvas = torch.cat([prompt, torch.full((1, new_tokens), mask_id)], 1)
    per_block = steps // (new_tokens // block_length)
    for start in range(prompt.shape[1], canvas.shape[1], block_length):
        block = slice(start, start + block_length)
        window = slice(start, canvas.shape[1] if cache == "prefix" else start + block_length)
        masked = int((canvas[0, block] == mask_id).sum())
        counts = [masked // per_block + (i < masked % per_block) for i in range(per_block)]
        stored = None
        for step in range(per_block):
            logits, stored = stale_key_value_logits(model, canvas, None if step % refresh == 0 else stored, window)
            logits = logits[0, block].double()
            logits[:, mask_id] = float("-inf")
            confidence, token = logits.softmax(-1).max(-1)
            confidence[canvas[0, block] != mask_id] = float("-inf")
            for position in confidence.argsort(descending=True, stable=True)[:counts[step]]:
                canvas[0, start + int(position)] = token[position]
    return canvas


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("refresh", [None, 2, 3])
def test_the_windowed_path_is_fast_dllm_s_stale_key_value_decoding(cache: str, refresh) -> None:
    """Four steps a block, refreshed at the block's first step only or every 2 / 3 steps: the windowed
    forwards in between give the tokens of an independent reference that runs the model's full forward
    with the keys and values outside the window taken from the last full forward (float64)."""
    torch.manual_seed(5)
    model = confident(LLaDAModelLM(tiny_config(init_std=0.3)), 4.0).double().eval()
    w = MemoryWrapper(model, MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5)))
    for seed in range(3):
        prompt = torch.randint(2, 120, (1, 6), generator=torch.Generator().manual_seed(seed))
        expected = stale_cache_decoding(model, prompt, 12, 4, 12, refresh or 4, cache)
        out = w.generate(prompt, max_new_tokens=12, block_length=4, steps=12, adapt=False, cache=cache,
                         cache_refresh=refresh)
        assert torch.equal(out, expected), seed
    plain = w.generate(prompt, max_new_tokens=12, block_length=4, steps=12, adapt=False)
    assert not torch.equal(out, plain) or refresh == 2, "the stale keys and values changed nothing: a weak case"


def decoding_columns(model: torch.nn.Module, run) -> list[int]:
    """The number of canvas columns each decoding forward of ``run()`` embeds (adaptation forwards, which
    run with gradients, are left out)."""
    widths: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: None if torch.is_grad_enabled() else widths.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return widths


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("refresh", [None, 1])
def test_block_wise_dream_caches_compute_the_block_and_the_column_before_it(refresh, cache: str) -> None:
    """Dream in blocks of 4 (prompt 10, 8 new tokens, 6 steps: 3 per block): a block's first step (every
    step with cache_refresh=1) runs all 18 columns; the others compute from the column before the block
    (Dream's shifted logits) to the canvas end (prefix) or to the block's end (dual). With refresh=1 the
    tokens equal uncached decoding; a left-padded batch decodes each row as alone, with the memory
    re-adapted after every block (the cache is rebuilt at each block start, under the new memory)."""
    w = wrapper("dream")
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, steps=6, block_length=4, seed=0, cache=cache, cache_refresh=refresh,
                    adapt="blocks")
    widths = decoding_columns(w.model, lambda: w.generate(ids, mask, **settings))
    first, second = (9, 5) if cache == "prefix" else (5, 5)  # windows (9, 18), (13, 18) or (9, 14), (13, 18)
    assert widths == ([18] * 6 if refresh == 1 else [18, first, first, 18, second, second])
    batched = w.generate(ids, mask, **settings)
    for row in range(3):
        assert torch.equal(batched[row, -8:], w.generate(ids[row:row + 1, mask[row].bool()], **settings)[0, -8:])
    if refresh == 1:
        assert torch.equal(batched, w.generate(ids, mask, **{**settings, "cache": "none", "cache_refresh": None}))


@pytest.mark.parametrize("refresh", [None, 1, 3])
def test_the_dream_prefix_cache_recomputes_the_new_tokens_and_the_last_prompt_column(refresh) -> None:
    """Dream's logits are shifted: the window starts one column before the first new token. Full forwards
    come every ``cache_refresh`` steps; every forward's tokens equal uncached decoding when refresh=1, and
    a left-padded batch decodes each row as alone."""
    w = wrapper("dream")
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, steps=6, seed=0, cache="prefix", cache_refresh=refresh, adapt=True)
    widths = decoding_columns(w.model, lambda: w.generate(ids, mask, **settings))
    full_steps = {step for step in range(6) if (step % refresh == 0 if refresh else step == 0)}
    assert widths[-6:] == [18 if step in full_steps else 9 for step in range(6)]
    batched = w.generate(ids, mask, **settings)
    for row in range(3):
        assert torch.equal(batched[row, -8:], w.generate(ids[row:row + 1, mask[row].bool()], **settings)[0, -8:])
    if refresh == 1:
        assert torch.equal(batched, w.generate(ids, mask, **{**settings, "cache": "none", "cache_refresh": None}))


@pytest.mark.parametrize("adapt", [False, True, "blocks"])
@pytest.mark.parametrize("threshold", [0.7, 0.95])
@pytest.mark.parametrize("seed", range(3))
def test_the_block_diffusion_cache_is_exact(adapt, threshold: float, seed: int) -> None:
    """Under block-causal attention no earlier block sees the current one: cached decoding equals the
    uncached one, with left padding, blocks that straddle the prompt's end, memory bound, and thresholds
    that end blocks early."""
    w = wrapper("llada2", sharp=True)
    ids = torch.randint(2, 120, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    settings = dict(max_new_tokens=12, block_length=4, seed=seed, adapt=adapt, threshold=threshold)
    cached = w.generate(ids, mask, cache="prefix", **settings)
    assert torch.equal(cached, w.generate(ids, mask, **settings))


@pytest.mark.parametrize("adapt", [False, "blocks"])
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_block_diffusion_computes_the_canvas_to_the_current_block_end(cache: str, adapt) -> None:
    """Prompt 10 (rows padded by 0 / 3 / 5), 12 new tokens, blocks of 4 from each row's first real token:
    the rows' blocks holding new tokens span columns [7, 13), [11, 17), [15, 21), [19, 22). Uncached, every
    forward runs the canvas to the span's end; cached, the first forward does, a later block's first step
    computes from the previous block's start, its other steps from its own start; with the memory
    re-adapted after every block, every block's first step is a full forward again."""
    w = wrapper("llada2")
    ids = torch.randint(2, 120, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    settings = dict(max_new_tokens=12, block_length=4, threshold=1.0, cache=cache, adapt=adapt,  # one reveal a step
                    schedule="masked", whole_blocks=False, stop_at_eos=False)
    widths = decoding_columns(w.model, lambda: w.generate(ids, mask, **settings))
    # Steps per block: the most new tokens any row has in it (rows' counts: [2, 1, 3], [4, 4, 4], [4, 4, 4], [2, 3, 1]).
    uncached = [13] * 3 + [17] * 4 + [21] * 4 + [22] * 3
    cached = [13, 6, 6] + [10, 6, 6, 6] + [10, 6, 6, 6] + [7, 3, 3]
    refreshed = [13, 6, 6] + [17, 6, 6, 6] + [21, 6, 6, 6] + [22, 3, 3]
    assert widths == (uncached if cache == "none" else cached if not adapt else refreshed)


def test_dream_refuses_a_cache_when_transformers_names_the_layer_argument_otherwise(monkeypatch) -> None:
    """A transformers release whose decoder layers take neither ``cache`` nor ``past_key_values`` would
    swallow the cache in ``**kwargs`` (windowed queries seeing the window's keys only): refused instead."""
    model = DreamModel(dream_tiny_config()).eval()
    monkeypatch.setattr(sys.modules[type(model).__module__], "_CACHE_KEYWORD", None)
    canvas = torch.randint(2, 120, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(RuntimeError, match="neither `cache` nor `past_key_values`"):
        model(canvas, kv_cache=KVCache())
    assert model(canvas).logits.shape == (1, 8, 128), "uncached forwards are unaffected"


def test_logit_columns_are_canvas_columns_of_a_contiguous_slice() -> None:
    """``ModelView.logits(columns=)``: negative ends count from the canvas end (with a window too), a step
    is refused; with a windowed cache, no columns means every column the window gives logits for (Dream:
    from the window's second column, its first one's aligned hidden state comes from before the window)."""
    dream = MemoryWrapper(DreamModel(dream_tiny_config()).eval())
    canvas = torch.randint(2, 120, (2, 12), generator=torch.Generator().manual_seed(5))
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        full = dream.view.logits(canvas)
        assert torch.equal(dream.view.logits(canvas, columns=slice(-4, -1)), full[:, 8:11])
        assert torch.equal(dream.view.logits(canvas, columns=slice(-4, -1), head_everywhere=True), full[:, 8:11])
        with pytest.raises(ValueError, match="contiguous slice"):
            dream.view.logits(canvas, columns=slice(0, 6, 2))
        cache = KVCache()
        dream.view.logits(canvas, kv_cache=cache)
        cache.window = (6, 12)
        torch.testing.assert_close(dream.view.logits(canvas, kv_cache=cache), full[:, 7:], **close)
        torch.testing.assert_close(dream.view.logits(canvas, columns=slice(8, -1), kv_cache=cache), full[:, 8:11], **close)


def test_the_cache_is_refused_where_it_cannot_work() -> None:
    assert supports_kv_cache(LLaDAModelLM(tiny_config())) and supports_kv_cache(LLaDAMoEModelLM(moe_tiny_config()))
    assert supports_kv_cache(DreamModel(dream_tiny_config()))
    assert not supports_kv_cache(build_tiny_model(0))
    w = wrapper()
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="classifier-free guidance"):
        w.generate(ids, mask, max_new_tokens=4, cache="prefix", cfg_scale=1.0)
    with pytest.raises(ValueError, match="cache_refresh"):
        LLaDASampler(cache_refresh=2)
    with pytest.raises(ValueError, match="cache_refresh"):
        DreamSampler(cache_refresh=2)
    mdlm = MemoryWrapper(build_tiny_model(0).eval())
    with pytest.raises(ValueError, match="takes no kv_cache parameter"):
        LLaDASampler(cache="dual").sample(mdlm.view, ids, max_new_tokens=4)
    cache = KVCache()
    canvas = torch.randint(2, 120, (1, 12), generator=torch.Generator().manual_seed(0))
    dream = MemoryWrapper(DreamModel(dream_tiny_config()).eval())
    with torch.no_grad():
        dream.view.logits(canvas, kv_cache=cache)
        cache.window = (6, 12)
        assert dream.view.logits(canvas, columns=slice(7, 12), kv_cache=cache).shape[1] == 5
        with pytest.raises(ValueError, match="widen the KVCache window"):
            dream.view.logits(canvas, columns=slice(6, 12), kv_cache=cache)  # column 6's hidden state is column 5's
