"""Samplers on tiny random models: LLaDA against an independent greedy loop, reveal schedules, batching and
left padding, Dream's algorithms, MDLM's cached denoiser, guidance, seeded randomness, bound memory."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bilevel_dlm.config import MemoryConfig
from bilevel_dlm.forward import ModelView
from bilevel_dlm.integrations import dream, llada, mdlm
from bilevel_dlm.memory import MemoryParams
from bilevel_dlm.sampling import BlockDiffusionSampler, DreamSampler, LLaDASampler, MDLMSampler, default_sampler, make_sampler
from bilevel_dlm.sampling.base import factor_count, reveal_confident
from test_backbones_bilevel import confident

MASK = 127  # the mask id of every tiny config
PAD = 1


# Larger init scales than the defaults give peaked predictions: the default 0.02 makes all masked positions
# near-tied, so confidence orders would hinge on float rounding.
def llada_view(seed: int = 0) -> ModelView:
    torch.manual_seed(seed)
    return ModelView(llada.LLaDABackbone(), llada.LLaDAModelLM(llada.tiny_config(init_std=0.3)).eval(), MASK)


def dream_view(seed: int = 0) -> ModelView:
    torch.manual_seed(seed)
    model = dream.DreamModel(dream.tiny_config(initializer_range=0.3)).eval()
    return ModelView(dream.DreamBackbone(), model, MASK)


def mdlm_view(seed: int = 0) -> ModelView:
    return ModelView(mdlm.MDLMBackbone(), mdlm.build_tiny_model(seed, std=0.3), MASK)


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def steps_of(prompt: torch.Tensor, new_tokens: int, history: list[torch.Tensor]) -> Pairs:
    """(before, after) canvas pairs of every recorded step, starting from prompt + masks."""
    start = torch.cat([prompt, torch.full((prompt.shape[0], new_tokens), MASK)], dim=1)
    canvases = [start, *history]
    return list(zip(canvases, canvases[1:]))


def assert_never_rewritten(pairs: Pairs) -> None:
    for before, after in pairs:
        kept = before != MASK
        assert torch.equal(after[kept], before[kept]), "a revealed (or prompt) token changed"


@torch.no_grad()
def reference_llada_greedy(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, block_length: int, cfg_scale: float = 0.0
) -> torch.Tensor:
    """One row, one token per step: the most confident masked position of the current block gets its argmax."""
    x = torch.cat([prompt, torch.full((new_tokens,), MASK)])
    for start in range(len(prompt), len(x), block_length):
        for _ in range(block_length):
            logits = model(input_ids=x[None]).logits[0]
            if cfg_scale:
                unconditional = x.clone()
                unconditional[: len(prompt)] = MASK
                plain = model(input_ids=unconditional[None]).logits[0]
                logits = plain + (cfg_scale + 1) * (logits - plain)
            logits[:, MASK] = float("-inf")
            confidence, token = logits.softmax(-1).max(-1)
            candidates = [i for i in range(start, start + block_length) if x[i] == MASK]
            best = max(candidates, key=lambda i: confidence[i].item())
            x[best] = token[best]
    return x


# ----- LLaDA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_length,cfg_scale", [(8, 0.0), (4, 0.0), (4, 1.5)])
def test_llada_greedy_one_token_per_step_matches_reference_loop(block_length, cfg_scale):
    view, prompt = llada_view(), prompts(2, 5)
    sampler = LLaDASampler(steps=8, block_length=block_length, cfg_scale=cfg_scale)
    out = sampler.sample(view, prompt, max_new_tokens=8)
    for row in range(2):
        expected = reference_llada_greedy(view.model, prompt[row], 8, block_length, cfg_scale)
        assert torch.equal(out.sequences[row], expected)
    assert out.model_calls == (16 if cfg_scale else 8)  # guidance costs one extra forward per step


@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("random", 1.0)])
def test_llada_reveals_on_schedule_inside_the_block_and_never_remasks(remasking, temperature):
    prompt = prompts(3, 4)
    sampler = LLaDASampler(steps=6, block_length=4, remasking=remasking, temperature=temperature)
    out = sampler.sample(llada_view(), prompt, max_new_tokens=8, generator=seeded(0), return_history=True)
    per_block = [len(chunk) for chunk in np.array_split(np.arange(4), 3)]  # 4 masks over 3 steps: 2, 1, 1
    pairs = steps_of(prompt, 8, out.history)
    assert len(pairs) == 6 and out.model_calls == 6
    for step, (before, after) in enumerate(pairs):
        revealed = (before == MASK) & (after != MASK)
        assert revealed.sum(1).tolist() == [per_block[step % 3]] * 3
        block_start = 4 + 4 * (step // 3)
        outside = torch.ones(12, dtype=torch.bool)
        outside[block_start : block_start + 4] = False
        assert not revealed[:, outside].any()
    assert_never_rewritten(pairs)
    assert not (out.sequences == MASK).any()
    assert torch.equal(out.sequences[:, :4], prompt)


def test_llada_suppressed_token_is_never_generated():
    view, prompt = llada_view(), prompts(2, 4)
    plain = LLaDASampler(steps=8, block_length=4).sample(view, prompt, max_new_tokens=8).sequences
    frequent = int(plain[:, 4:].flatten().mode().values)
    suppressed = LLaDASampler(steps=8, block_length=4, suppress_tokens=(frequent,)).sample(
        view, prompt, max_new_tokens=8
    )
    assert not (suppressed.sequences[:, 4:] == frequent).any()


# ----- batching and padding ----------------------------------------------------------------------
BATCHING_CASES = [
    (llada_view, LLaDASampler(steps=8, block_length=4)),
    (dream_view, DreamSampler(steps=4, alg="entropy")),
    (dream_view, DreamSampler(steps=8, alg="topk_margin")),
    (llada_view, LLaDASampler(steps=8, block_length=4, cache="dual")),
    (dream_view, DreamSampler(steps=4, alg="entropy", cache="prefix", cache_refresh=2)),
]


@pytest.mark.parametrize("make_view,sampler", BATCHING_CASES)
def test_batched_greedy_generation_equals_each_row_alone(make_view, sampler):
    view, prompt = make_view(), prompts(3, 5)
    batched = sampler.sample(view, prompt, max_new_tokens=8).sequences
    for row in range(3):
        alone = sampler.sample(view, prompt[row : row + 1], max_new_tokens=8).sequences
        assert torch.equal(batched[row], alone[0])


@pytest.mark.parametrize("make_view,sampler", BATCHING_CASES)
def test_left_padded_batch_equals_each_unpadded_prompt(make_view, sampler):
    view, full = make_view(), prompts(3, 6)
    lengths = [2, 6, 4]
    input_ids = torch.full((3, 6), PAD)
    attention_mask = torch.zeros(3, 6, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 6 - length :] = full[row, :length]
        attention_mask[row, 6 - length :] = 1
    batched = sampler.sample(view, input_ids, attention_mask, max_new_tokens=8).sequences
    assert torch.equal(batched[:, :6], input_ids)
    for row, length in enumerate(lengths):
        alone = sampler.sample(view, full[row : row + 1, :length], max_new_tokens=8).sequences
        assert torch.equal(batched[row, 6:], alone[0, length:])


# ----- Dream -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        dict(alg="origin", temperature=0.7),
        dict(alg="maskgit_plus", temperature=0.5, top_p=0.9),
        dict(alg="topk_margin", top_k=10),
        dict(alg="entropy", temperature=0.3, top_p=0.95, top_k=20, alg_temp=0.5),
    ],
)
def test_dream_each_alg_fills_every_mask_and_keeps_the_prompt(settings):
    prompt = prompts(2, 5)
    out = DreamSampler(steps=4, **settings).sample(
        dream_view(), prompt, max_new_tokens=8, generator=seeded(0), return_history=True
    )
    assert not (out.sequences == MASK).any()
    assert torch.equal(out.sequences[:, :5], prompt)
    assert len(out.history) == 4 and out.model_calls == 4
    assert_never_rewritten(steps_of(prompt, 8, out.history))


@pytest.mark.parametrize("steps", [1, 6])
def test_dream_origin_finishes_with_at_most_one_step_per_token(steps):
    sampler = DreamSampler(steps=steps, alg="origin")
    out = sampler.sample(dream_view(), prompts(2, 3), max_new_tokens=6, generator=seeded(2))
    assert not (out.sequences == MASK).any()


@pytest.mark.parametrize("filtering", [dict(top_p=0.5), dict(top_k=3), dict(top_p=0.8, top_k=2)])
def test_dream_draws_tokens_only_from_the_filtered_set(filtering):
    view, prompt = dream_view(), prompts(4, 3)
    out = DreamSampler(steps=1, alg="origin", temperature=1.0, **filtering).sample(
        view, prompt, max_new_tokens=16, generator=seeded(8)
    )
    with torch.no_grad():  # one step: every token is drawn from the logits of prompt + masks
        logits = view.logits(torch.cat([prompt, torch.full((4, 16), MASK)], dim=1))[:, 3:]
    logits[..., MASK] = float("-inf")
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    allowed = torch.ones_like(probs, dtype=torch.bool)
    if "top_p" in filtering:  # the smallest prefix of the sorted tokens reaching top_p
        allowed &= probs.cumsum(-1) - probs < filtering["top_p"]
    if "top_k" in filtering:
        allowed[..., filtering["top_k"] :] = False
    rank = (order == out.sequences[:, 3:, None]).float().argmax(-1)
    assert allowed.gather(-1, rank[..., None]).all()


@pytest.mark.parametrize("alg_temp", [0.0, 1.0])
def test_dream_confidence_algs_reveal_floor_of_the_time_fraction(alg_temp):
    steps, new_tokens, eps = 5, 12, 1e-3
    prompt = prompts(2, 3)
    out = DreamSampler(steps=steps, alg="maskgit_plus", alg_temp=alg_temp, eps=eps).sample(
        dream_view(), prompt, max_new_tokens=new_tokens, generator=seeded(4), return_history=True
    )
    times, masked, expected = np.linspace(1.0, eps, steps + 1), new_tokens, []
    for i in range(steps):
        count = masked if i == steps - 1 else int(np.floor(masked * (1 - times[i + 1] / times[i])))
        expected.append(count)
        masked -= count
    pairs = steps_of(prompt, new_tokens, out.history)
    revealed = [((before == MASK) & (after != MASK)).sum(1).tolist() for before, after in pairs]
    assert revealed == [[count, count] for count in expected]


def plain_block_dream(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, block_length: int, steps: int,
                      eps: float = 1e-3) -> torch.Tensor:
    """Block-wise Dream written out plainly for one unpadded row (maskgit_plus, argmax, full forwards):
    each block gets steps / blocks steps of its own time schedule and reveals its most confident tokens."""
    canvas = torch.cat([prompt, torch.full((1, new_tokens), MASK)], 1)
    per_block = steps // (new_tokens // block_length)
    times = np.linspace(1.0, eps, per_block + 1)
    for start in range(prompt.shape[1], canvas.shape[1], block_length):
        for step in range(per_block):
            logits = model(canvas).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)[0]  # Dream: column i - 1 predicts token i
            logits[:, MASK] = float("-inf")
            confidence, token = logits.softmax(-1).max(-1)
            masked = [p for p in range(start, start + block_length) if canvas[0, p] == MASK]
            count = len(masked) if step == per_block - 1 else int(len(masked) * (1 - times[step + 1] / times[step]))
            for p in sorted(masked, key=lambda p: -float(confidence[p]))[:count]:
                canvas[0, p] = token[p]
    return canvas


@pytest.mark.parametrize("seed", range(3))
def test_block_wise_dream_equals_the_plain_computation(seed: int) -> None:
    """``block_length`` fills the blocks left to right with steps / blocks steps each (float64: no near-ties
    flip); one block of every new token is the reference sampler."""
    view = dream_view(seed)
    view.model.double()
    prompt = prompts(1, 5, seed)
    sampler = DreamSampler(steps=9, alg="maskgit_plus", block_length=4)
    with torch.no_grad():
        out = sampler.sample(view, prompt, max_new_tokens=12, return_history=True)
        assert torch.equal(out.sequences, plain_block_dream(view.model, prompt, 12, 4, 9))
        whole = DreamSampler(steps=9, alg="maskgit_plus")
        assert torch.equal(sampler.model_copy(update={"block_length": 12}).sample(view, prompt, max_new_tokens=12).sequences,
                           whole.sample(view, prompt, max_new_tokens=12).sequences)
    assert out.model_calls == 9
    for canvas in out.history:  # a block starts only once the blocks before it are full
        open_blocks = [bool((canvas[0, 5 + 4 * b: 9 + 4 * b] == MASK).any()) for b in range(3)]
        assert open_blocks == sorted(open_blocks)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 blocks"):
        sampler.model_copy(update={"steps": 8}).sample(view, prompt, max_new_tokens=12)


# ----- MDLM --------------------------------------------------------------------------------------
def test_mdlm_fills_every_mask_and_keeps_the_prompt():
    prompt = prompts(2, 4)
    sampler = MDLMSampler(steps=5)
    out = sampler.sample(mdlm_view(), prompt, max_new_tokens=8, generator=seeded(0), return_history=True)
    assert not (out.sequences == MASK).any()
    assert torch.equal(out.sequences[:, :4], prompt)
    assert_never_rewritten(steps_of(prompt, 8, out.history))


def test_mdlm_cache_skips_forwards_while_the_canvas_is_unchanged():
    view, prompt, steps = mdlm_view(), prompts(2, 4), 40
    calls = []
    handle = view.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        cached = MDLMSampler(steps=steps).sample(
            view, prompt, max_new_tokens=6, generator=seeded(3), return_history=True
        )
        cached_calls = len(calls)
        plain = MDLMSampler(steps=steps, use_cache=False).sample(
            view, prompt, max_new_tokens=6, generator=seeded(3)
        )
    finally:
        handle.remove()
    # The tiny MDLM ignores t (time_conditioning=False), so the cache changes the cost, not the samples.
    assert torch.equal(cached.sequences, plain.sequences)
    assert cached.model_calls == cached_calls < steps
    assert plain.model_calls == len(calls) - cached_calls >= steps
    # A forward at the first step, after each step that changed the canvas, and for the final argmax when
    # masks remain after a changing last step.
    changed = [not torch.equal(a, b) for a, b in steps_of(prompt, 6, cached.history[:steps])]
    final_forward = len(cached.history) > steps and changed[-1]
    assert cached_calls == 1 + sum(changed[:-1]) + final_forward


# ----- randomness, registry, memory ------------------------------------------------------------
@pytest.mark.parametrize(
    "make_view,sampler",
    [
        (llada_view, LLaDASampler(steps=4, block_length=4, temperature=1.0, remasking="random")),
        (dream_view, DreamSampler(steps=4, alg="maskgit_plus", temperature=1.0, alg_temp=0.5)),
        (mdlm_view, MDLMSampler(steps=6)),
    ],
)
def test_sampling_with_a_seeded_generator_is_reproducible(make_view, sampler):
    view, prompt = make_view(), prompts(2, 4)
    first, again, other = (
        sampler.sample(view, prompt, max_new_tokens=8, generator=seeded(seed)).sequences for seed in (5, 5, 6)
    )
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_bound_memory_generates_like_the_weights_edited_by_its_deltas():
    view, prompt = llada_view(), prompts(2, 4)
    memory = MemoryParams(view.model, MemoryConfig(kind="full", layer_fraction=0.5), backbone=view.backbone)
    memory.reset()
    draws = seeded(9)
    memory.set([torch.randn(value.shape, generator=draws) * 0.3 for value in memory.values])
    sampler = LLaDASampler(steps=8, block_length=4)
    with memory.bind():
        bound = sampler.sample(view, prompt, max_new_tokens=8).sequences
    edited = copy.deepcopy(view.model)
    modules = dict(edited.named_modules())
    with torch.no_grad():
        for path, delta in zip(memory.targets, memory.values):
            modules[path].weight += delta
    edited_view = ModelView(view.backbone, edited, MASK)
    assert torch.equal(bound, sampler.sample(edited_view, prompt, max_new_tokens=8).sequences)
    assert not torch.equal(bound, sampler.sample(view, prompt, max_new_tokens=8).sequences)


def test_invalid_settings_fail_with_clear_errors():
    view, prompt = llada_view(), prompts(1, 3)
    with pytest.raises(ValueError, match="multiple of block_length"):
        LLaDASampler(steps=4, block_length=3).sample(view, prompt, max_new_tokens=8)
    with pytest.raises(ValueError, match="split evenly over 2 blocks"):
        LLaDASampler(steps=3, block_length=4).sample(view, prompt, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        LLaDASampler().sample(view, prompt, max_new_tokens=0)
    with pytest.raises(ValidationError):
        LLaDASampler(step=4)
    with pytest.raises(ValidationError):
        DreamSampler(alg="greedy")
    with pytest.raises(KeyError, match="unknown sampler"):
        make_sampler("autoregressive")


def test_registry_and_backbone_defaults():
    sampler = make_sampler("llada", steps=4, block_length=2)
    assert isinstance(sampler, LLaDASampler) and (sampler.steps, sampler.block_length) == (4, 2)
    for make_view, kind in [(llada_view, LLaDASampler), (dream_view, DreamSampler), (mdlm_view, MDLMSampler)]:
        view = make_view()
        sampler = default_sampler(view.backbone)
        assert type(sampler) is kind
        out = sampler.sample(view, prompts(1, 3), max_new_tokens=4)  # defaults: one step per new token
        assert out.sequences.shape == (1, 7) and not (out.sequences == MASK).any()
        assert out.model_calls >= (4 if kind is not MDLMSampler else 1)


def test_the_mdlm_sampler_default_is_exact_for_a_time_conditioned_model():
    """p_x0 depends on t when the model is time-conditioned, so the default recomputes every step."""
    from bilevel_dlm.integrations.mdlm import MDLMBackbone, build_tiny_model

    model = build_tiny_model(std=0.5, time_conditioning=True)
    view = ModelView(MDLMBackbone(), model, MASK)
    prompt, steps = prompts(2, 4), 30
    default = MDLMSampler(steps=steps).sample(view, prompt, max_new_tokens=6, generator=seeded(5))
    plain = MDLMSampler(steps=steps, use_cache=False).sample(view, prompt, max_new_tokens=6, generator=seeded(5))
    cached = MDLMSampler(steps=steps, use_cache=True).sample(view, prompt, max_new_tokens=6, generator=seeded(5))
    assert torch.equal(default.sequences, plain.sequences) and default.model_calls == plain.model_calls >= steps
    assert cached.model_calls < plain.model_calls, "forcing the cache skips forwards (inexactly here)"


def _llada2_view() -> ModelView:
    from bilevel_dlm.integrations.llada2 import LLaDA2Backbone, LLaDA2MoeModelLM, tiny_config

    torch.manual_seed(0)
    return ModelView(LLaDA2Backbone(), LLaDA2MoeModelLM(tiny_config()).eval(), MASK)


@pytest.mark.parametrize("make_view, sampler", [
    (llada_view, LLaDASampler(block_length=4)),
    (llada_view, LLaDASampler(block_length=4, cfg_scale=1.0)),
    (dream_view, DreamSampler()),
    (mdlm_view, MDLMSampler(steps=10)),
    (_llada2_view, BlockDiffusionSampler(block_length=4, steps=2, threshold=0.5)),
    (llada_view, LLaDASampler(block_length=4, cache="prefix")),
    (dream_view, DreamSampler(cache="prefix")),
    (_llada2_view, BlockDiffusionSampler(block_length=4, steps=2, threshold=0.5, cache="prefix")),
])
def test_logits_only_where_needed_gives_the_tokens_of_the_full_head(make_view, sampler):
    """The head runs on the positions that can be revealed; the plain path (full_logits) on all of them."""
    view = make_view()
    prompt = prompts(2, 6)
    rows = []
    handle = view.backbone.output_head(view.model).register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].shape[:-1].numel()) if args[0].dim() == 3 else None)
    outputs = []
    try:
        for full in (False, True):
            rows.clear()
            plain = sampler.model_copy(update={"full_logits": full})
            outputs.append((plain.sample(view, prompt, max_new_tokens=8, generator=seeded(2)).sequences, sum(rows)))
    finally:
        handle.remove()
    (needed, needed_rows), (everything, all_rows) = outputs
    assert torch.equal(needed, everything)
    assert needed_rows < all_rows


def test_threshold_decoding_bounds_and_batch_equality():
    view, prompt = llada_view(), prompts(3, 5)
    base = LLaDASampler(block_length=4)
    plain = base.sample(view, prompt, max_new_tokens=8, return_history=True)
    never = base.model_copy(update={"threshold": 1.0}).sample(view, prompt, max_new_tokens=8)
    assert torch.equal(never.sequences, plain.sequences) and never.model_calls == plain.model_calls == 8
    eager = base.model_copy(update={"threshold": 1e-9}).sample(view, prompt, max_new_tokens=8)
    assert eager.model_calls == 2, "every masked token is above the threshold: one step per block"
    middle = base.model_copy(update={"threshold": 0.02}).sample(view, prompt, max_new_tokens=8, return_history=True)
    assert 2 <= middle.model_calls <= 8 and not bool((middle.sequences == MASK).any())
    for row in range(3):  # rows reveal different counts per step, each exactly as alone
        alone = base.model_copy(update={"threshold": 0.02}).sample(view, prompt[row:row + 1], max_new_tokens=8)
        assert torch.equal(alone.sequences[0], middle.sequences[row])


def test_dream_threshold_decoding_needs_a_probability_confidence():
    with pytest.raises(ValueError, match="threshold / factor decoding"):
        DreamSampler(alg="entropy", threshold=0.9)
    view, prompt = dream_view(), prompts(2, 5)
    eager = DreamSampler(alg="maskgit_plus", threshold=1e-9, steps=8).sample(view, prompt, max_new_tokens=8)
    assert eager.model_calls == 1 and not bool((eager.sequences == MASK).any())
    never = DreamSampler(alg="maskgit_plus", threshold=1.0).sample(view, prompt, max_new_tokens=8, return_history=True)
    assert never.model_calls == 8, "Fast-dLLM's rule with nothing above the threshold: the top token, one a step"
    assert revealed_per_step(never.history, prompt.shape[1]) == [[1] * 8] * 2


def revealed_per_step(history: list[torch.Tensor], prompt_length: int) -> list[list[int]]:
    """Tokens each row revealed at each step of a sampler's history."""
    masked = torch.stack([(canvas[:, prompt_length:] == MASK).sum(1) for canvas in history], 1)
    before = torch.cat([torch.full_like(masked[:, :1], history[0].shape[1] - prompt_length), masked[:, :-1]], 1)
    return (before - masked).tolist()


@pytest.mark.parametrize("sampler", [DreamSampler(alg="maskgit_plus", steps=8, threshold=0.99, threshold_rule="share"),
                                     LLaDASampler(steps=16, block_length=8, threshold=0.99, threshold_rule="share")])
def test_the_share_rule_reveals_at_least_one_token_a_step(sampler) -> None:
    """Dream's schedule gives shares of 0 (floor(masked x fraction)) and LLaDA's gives 0 when a block has more
    steps than tokens; with a threshold that fires nowhere the share rule still reveals one token a step."""
    view = dream_view() if isinstance(sampler, DreamSampler) else llada_view()
    prompt = prompts(2, 5)
    plain = sampler.model_copy(update={"threshold": None}).sample(view, prompt, max_new_tokens=8, return_history=True)
    assert any(0 in row for row in revealed_per_step(plain.history, 5)), "the schedule no longer has an empty step"
    out = sampler.sample(view, prompt, max_new_tokens=8, return_history=True)
    assert all(min(row) >= 1 for row in revealed_per_step(out.history, 5)) and out.model_calls == 8


# ----- factor-based parallel decoding --------------------------------------------------------------
def reference_factor_count(confidences: list[float], factor: float) -> int:
    """Fast-dLLM's rule, one row, written as a loop: the most confident always, then the i-th most
    confident while (i + 1)(1 - c_i) <= factor."""
    ranked = sorted(confidences, reverse=True)
    n = 1 if ranked else 0
    for i in range(2, len(ranked) + 1):
        if (i + 1) * (1 - ranked[i - 1]) > factor:
            break
        n = i
    return n


def test_factor_count_by_hand():
    confidence = torch.tensor([[0.5, 0.99, 0.8, 0.9]])
    masked = torch.ones(1, 4, dtype=torch.bool)
    # i=2: 3 * 0.1 = 0.3, i=3: 4 * 0.2 = 0.8 (<= 1), i=4: 5 * 0.5 = 2.5 (> 1)
    assert factor_count(confidence, masked, 1.0).tolist() == [3]
    assert factor_count(confidence, masked, 0.1).tolist() == [1]  # the most confident always
    masked[0, 1] = False  # 0.99 is not masked: 0.9 first, then 3 * 0.2 = 0.6, then 4 * 0.5 = 2.0
    assert factor_count(confidence, masked, 1.0).tolist() == [2]
    assert factor_count(confidence, torch.zeros_like(masked), 1.0).tolist() == [0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=6, max_size=6), min_size=1, max_size=4),
       st.floats(0.01, 8.0))
def test_factor_count_equals_the_loop_over_random_rows(rows, factor):
    confidence = torch.tensor([[c for c, _ in row] for row in rows], dtype=torch.float64)
    masked = torch.tensor([[m for _, m in row] for row in rows])
    expected = [reference_factor_count([c for c, m in row if m], factor) for row in rows]
    assert factor_count(confidence, masked, factor).tolist() == expected
    minimum = torch.ones(len(rows), dtype=torch.long)
    revealed = reveal_confident(confidence, masked, minimum, factor=factor)
    assert not bool((revealed & ~masked).any())
    assert revealed.sum(1).tolist() == [max(n, 1) if bool(m.any()) else 0 for n, m in zip(expected, masked)]


def test_factor_decoding_bounds_and_batch_equality():
    view, prompt = llada_view(), prompts(3, 5)
    base = LLaDASampler(block_length=4)
    plain = base.sample(view, prompt, max_new_tokens=8)
    cautious = base.model_copy(update={"factor": 1e-9, "threshold_rule": "share"}).sample(view, prompt,
                                                                                      max_new_tokens=8)
    assert torch.equal(cautious.sequences, plain.sequences) and cautious.model_calls == 8
    fast = base.model_copy(update={"factor": 1e-9}).sample(view, prompt, max_new_tokens=8)
    assert fast.model_calls == 6, "Fast-dLLM's rule reveals the last two tokens of a block together"
    eager = base.model_copy(update={"factor": 1e9}).sample(view, prompt, max_new_tokens=8)
    assert eager.model_calls == 2, "every bound holds: one step per block"
    confident(view.model, 2.0)  # confidences where factor 2 reveals more than one token in some steps only
    middle = base.model_copy(update={"factor": 2.0}).sample(view, prompt, max_new_tokens=8)
    assert 2 < middle.model_calls < 8 and not bool((middle.sequences == MASK).any())
    for row in range(3):
        alone = base.model_copy(update={"factor": 2.0}).sample(view, prompt[row:row + 1], max_new_tokens=8)
        assert torch.equal(alone.sequences[0], middle.sequences[row])
    with pytest.raises(ValidationError, match="set one of them"):
        LLaDASampler(threshold=0.9, factor=1.0)
    for parallel in (dict(threshold=0.9), dict(factor=1.0)):
        with pytest.raises(ValidationError, match="remasking='random' ranks positions by random numbers"):
            LLaDASampler(remasking="random", **parallel)
    with pytest.raises(ValidationError, match="classifier-free guidance"):
        LLaDASampler(cache="prefix", cfg_scale=1.0)
    with pytest.raises(ValidationError, match="threshold / factor"):
        DreamSampler(alg="entropy", factor=1.0)
    dream_eager = DreamSampler(alg="maskgit_plus", factor=1e9, steps=8).sample(dream_view(), prompts(2, 5),
                                                                                 max_new_tokens=8)
    assert dream_eager.model_calls == 1 and not bool((dream_eager.sequences == MASK).any())
