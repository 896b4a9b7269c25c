"""Samplers against their references, each written here from the reference's published code (not from our
samplers): Fast-dLLM's threshold rule (``get_transfer_index``) and its threshold ``generate``; the LLaDA2.0
release's ``generate`` (whole-block canvas, its step schedule, its softmax over the whole vocabulary, the
stop and cut at EOS); the LLaDA2.1 release's ``generate`` with token editing. Float64 tiny models whose heads
are scaled so that thresholds fire; several prompt / generation / block lengths, ragged ones included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.forward import ModelView
from bilevel_dlm.integrations.llada import LLaDABackbone, LLaDAModelLM
from bilevel_dlm.integrations.llada import tiny_config as llada_tiny_config
from bilevel_dlm.integrations.llada2 import LLaDA2Backbone
from bilevel_dlm.sampling import BlockDiffusionSampler, LLaDASampler
from bilevel_dlm.sampling.base import reveal_fast_dllm
from test_backbones_bilevel import confident
from test_llada2_model import MASK, build, left_padded_rows

# ----- Fast-dLLM ---------------------------------------------------------------------------------------------


def fast_dllm_transfer(confidence: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's get_transfer_index with a threshold, one row: topk over the masked confidences (k = the
    masked count), the first kept, each later one dropped when its confidence < threshold."""
    confidence = torch.where(masked, confidence, -torch.inf)
    transfer = torch.zeros_like(masked)
    k = int(masked.sum())
    _, select = torch.topk(confidence, k=k)
    transfer[select] = True
    for j in range(1, k):
        if confidence[select[j]] < threshold:
            transfer[select[j]] = False
    return transfer


@given(st.integers(1, 12), st.integers(0, 2**31), st.sampled_from([0.3, 0.5, 0.9]), st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_fast_dllm_rule_is_get_transfer_index(width: int, seed: int, threshold: float, ties: bool) -> None:
    """300 random cases of 3 rows each."""
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(3, width, generator=generator, dtype=torch.float64)
    if ties:  # few distinct values: ties at and around the threshold
        confidence = torch.round(confidence * 4) / 4
    masked = torch.rand(3, width, generator=generator) < 0.7
    ours = reveal_fast_dllm(confidence, masked, threshold=threshold)
    for row in range(3):
        if not bool(masked[row].any()):
            assert not bool(ours[row].any())
            continue
        reference = fast_dllm_transfer(confidence[row], masked[row], threshold)
        assert int(ours[row].sum()) == int(reference.sum())
        top = confidence[row].masked_fill(~masked[row], -1).max()
        # the one position revealed below the threshold (if any) is a most confident one; topk breaks ties freely
        assert torch.equal(ours[row] & (confidence[row] >= threshold), reference & (confidence[row] >= threshold))
        assert bool((confidence[row][ours[row]] >= min(threshold, float(top))).all())


def fast_dllm_factor_transfer(confidence: torch.Tensor, masked: torch.Tensor, factor: float) -> int:
    """How many positions Fast-dLLM's get_transfer_index_dynamic reveals in one row: thresholds 1 - factor / (n + 1),
    the first always passing; the loop's index where the sorted confidences first fall below them, plus one
    when that is the first or the last index."""
    count = int(masked.sum())
    thresholds = [1 - factor / (n + 1) for n in range(1, count + 1)]
    thresholds[0] = -1
    ranked = torch.sort(confidence[masked], descending=True)[0]
    for top in range(count):
        if ranked[top] < thresholds[top]:
            break
    if top == 0 or top == count - 1:
        top += 1
    return top


@given(st.integers(1, 12), st.integers(0, 2**31), st.sampled_from([0.5, 1.0, 2.0]))
@settings(max_examples=300, deadline=None)
def test_the_fast_dllm_factor_rule_is_get_transfer_index_dynamic(width: int, seed: int, factor: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(3, width, generator=generator, dtype=torch.float64) ** 0.3  # mostly confident
    masked = torch.rand(3, width, generator=generator) < 0.8
    ours = reveal_fast_dllm(confidence, masked, factor=factor)
    for row in range(3):
        if bool(masked[row].any()):
            count = fast_dllm_factor_transfer(confidence[row], masked[row], factor)
            top = torch.topk(confidence[row].masked_fill(~masked[row], -1), count).indices
            assert set(ours[row].nonzero()[:, 0].tolist()) == set(top.tolist())
        else:
            assert not bool(ours[row].any())


@torch.no_grad()
def fast_dllm_generate(model, prompt: torch.Tensor, gen_length: int, block_length: int, threshold: float,
                       mask_id: int) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's llada/generate.py ``generate`` with a threshold (steps unused), one row; the model's
    mask-token logit at -inf (our samplers never propose the mask token: a documented difference)."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    nfe = 0
    for num_block in range(gen_length // block_length):
        start, end = prompt.shape[1] + num_block * block_length, prompt.shape[1] + (num_block + 1) * block_length
        while True:
            nfe += 1
            mask_index = x == mask_id
            logits = model(x).logits
            logits[..., mask_id] = -torch.inf
            mask_index[:, end:] = 0
            x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0 = torch.where(mask_index, x0, x)
            transfer_index = fast_dllm_transfer(x0_p[0], mask_index[0], threshold)[None]
            x[transfer_index] = x0[transfer_index]
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x, nfe


def llada_model(seed: int) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return confident(LLaDAModelLM(llada_tiny_config(init_std=0.3)), 8.0).double().eval()


@pytest.mark.parametrize("prompt_length,gen_length,block_length", [(5, 8, 4), (7, 12, 4), (3, 16, 8), (6, 8, 8)])
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_llada_threshold_decoding_is_fast_dllm_s(prompt_length, gen_length, block_length, cache) -> None:
    """Fast-dLLM's published setting (threshold 0.9, steps = one per block, unused by its rule): the same tokens
    and forwards; with the cache refreshed every step (exact) as well."""
    model = llada_model(prompt_length)
    view = ModelView(LLaDABackbone(), model, model.config.mask_token_id)
    prompt = torch.randint(2, 120, (2, prompt_length), generator=torch.Generator().manual_seed(gen_length))
    sampler = LLaDASampler(steps=gen_length // block_length, block_length=block_length, threshold=0.9, cache=cache,
                           cache_refresh=1 if cache != "none" else None)
    with torch.no_grad():
        out = sampler.sample(view, prompt, max_new_tokens=gen_length)
    forwards = []
    for row in range(2):
        expected, nfe = fast_dllm_generate(model, prompt[row:row + 1], gen_length, block_length, 0.9,
                                           model.config.mask_token_id)
        assert torch.equal(out.sequences[row], expected[0])
        forwards.append(nfe)
    assert max(forwards) < gen_length, "the threshold never fired: this compares nothing parallel"
    if cache == "none":
        assert out.model_calls == max(forwards)


# ----- the LLaDA2.0 and LLaDA2.1 releases ---------------------------------------------------------------------


def schedule(block_length: int, steps: int) -> torch.Tensor:
    """The releases' _get_num_transfer_tokens."""
    base, remainder = block_length // steps, block_length % steps
    counts = torch.full((steps,), base, dtype=torch.int64)
    counts[:remainder] += 1
    return counts


def release_canvas(prompt: torch.Tensor, gen_length: int, block_length: int, mask_id: int):
    """The releases' whole-block canvas, additive block-causal mask and positions."""
    num_blocks = (prompt.shape[1] + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks))
    attention = block_mask.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None].log()
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    return x, attention.double(), torch.arange(total)[None], num_blocks


def argmax_and_probability(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The releases' _sample_with_temperature_topk_topp at temperature 0: softmax over every token."""
    probs = torch.softmax(logits, dim=-1)
    token = torch.argmax(probs, dim=-1, keepdim=True)
    return token[..., 0], torch.gather(probs, -1, token)[..., 0]


def cut_after_eos(x: torch.Tensor, prompt_length: int, gen_length: int, eos_id: int) -> torch.Tensor:
    answer = x[:, : prompt_length + gen_length]
    eos = (answer[0][prompt_length:] == eos_id).nonzero(as_tuple=True)[0]
    first = eos[0].item() if len(eos) > 0 else gen_length
    return answer[:, prompt_length: prompt_length + first + 1]


@torch.no_grad()
def llada20_generate(model, prompt, gen_length, block_length=32, steps=32, threshold=0.95, eos_id=1,
                     mask_id=MASK, minimal_topk=1) -> torch.Tensor:
    """The LLaDA2.0 release's generate (temperature 0, eos_early_stop off)."""
    steps = min(steps, gen_length // minimal_topk)
    x, attention, positions, num_blocks = release_canvas(prompt, gen_length, block_length, mask_id)
    counts = schedule(block_length, steps)
    for num_block in range(prompt.shape[1] // block_length, num_blocks):
        end = (num_block + 1) * block_length
        cur_x = x[:, :end]
        for step in range(steps):
            active = cur_x[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = model(cur_x, attention_mask=attention[:, :, :end, :end], position_ids=positions[:, :end]).logits
            x0, x0_p = argmax_and_probability(logits[:, -block_length:, :])
            num_to_transfer = counts[step].item()
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            confidence = torch.where(active, x0_p, -torch.inf)
            high = confidence[0] > threshold
            if high.sum().item() >= num_to_transfer:
                transfer[0] = high
            else:
                _, idx = torch.topk(confidence[0], k=min(num_to_transfer, active.sum().item()))
                transfer[0, idx] = True
            if transfer.any():
                cur_x[:, -block_length:][transfer] = x0[transfer]
        x[:, :end] = cur_x
        if (x[0, prompt.shape[1]:end] == eos_id).any():
            break
    return cut_after_eos(x, prompt.shape[1], gen_length, eos_id)


@torch.no_grad()
def llada21_generate(model, prompt, gen_length, block_length=32, threshold=0.95, editing_threshold=0.9,
                     max_post_steps=16, eos_id=1, mask_id=MASK, num_to_transfer=1,
                     max_passes: int | None = None) -> tuple[torch.Tensor, int]:
    """The LLaDA2.1 release's generate (temperature 0, eos_early_stop off), and how many tokens it edited;
    ``max_passes`` stops a block after that many passes (the release has no such bound: where the argmax of a
    masked position is the mask token it loops forever)."""
    x, attention, positions, num_blocks = release_canvas(prompt, gen_length, block_length, mask_id)
    edits = 0
    prompt_length = prompt.shape[1]
    for num_block in range(prompt_length // block_length, num_blocks):
        end = (num_block + 1) * block_length
        cur_x = x[:, :end]
        block_start = num_block * block_length
        post_steps = passes = 0
        while max_passes is None or passes < max_passes:
            passes += 1
            old = cur_x[:, -block_length:].clone()
            active = cur_x[:, -block_length:] == mask_id
            if not torch.any(active):
                post_steps += 1
            if post_steps > max_post_steps:
                break
            prompt_in_block = torch.zeros(block_length, dtype=torch.bool)
            if block_start < prompt_length:
                prompt_in_block[:min(prompt_length - block_start, block_length)] = True
            logits = model(cur_x, attention_mask=attention[:, :, :end, :end], position_ids=positions[:, :end]).logits
            x0, x0_p = argmax_and_probability(logits[:, -block_length:, :])
            mask_transfer = torch.zeros_like(x0, dtype=torch.bool)
            if active.sum() > 0:
                confidence = torch.where(active, x0_p, -torch.inf)
                high = (confidence[0] > threshold) & active[0]
                if high.sum().item() >= num_to_transfer:
                    mask_transfer[0] = high
                else:
                    _, idx = torch.topk(confidence[0], k=min(num_to_transfer, active.sum().item()))
                    mask_transfer[0, idx] = True
            editable = ~active & ~prompt_in_block[None, :]
            editing = torch.zeros_like(x0, dtype=torch.bool)
            editing[0] = (torch.where(editable, x0_p, -torch.inf)[0] > editing_threshold) & editable[0] & (x0[0] != old[0])
            edits += int(editing.sum())
            final = mask_transfer | editing
            if final.any():
                cur_x[:, -block_length:][final] = x0[final]
            if active.sum() == 0 and not editing.any():
                break
        x[:, :end] = cur_x
    return cut_after_eos(x, prompt_length, gen_length, eos_id), edits


def llada2_view(seed: int, scale: float, mask_boost: float = 1.0) -> ModelView:
    """A float64 tiny LLaDA2, head scaled by ``scale``; ``mask_boost`` scales the mask token's row as well
    (-2: the mask token takes probability at the masked positions and is the argmax at some, which the
    release then leaves masked)."""
    model = confident(build(seed), scale).double().eval()
    with torch.no_grad():
        model.lm_head.weight[MASK] *= mask_boost
    return ModelView(LLaDA2Backbone(), model, MASK)


def assert_release_output(ours: torch.Tensor, release: torch.Tensor, prompt_length: int, eos_id: int) -> None:
    """Our row [P + max_new_tokens] against the release's answer (up to and including its first EOS): equal
    there, and EOS after it."""
    answer = ours[prompt_length:]
    assert torch.equal(answer[: release.shape[1]], release[0])
    if release.shape[1] < answer.shape[0]:
        assert release[0, -1] == eos_id and bool((answer[release.shape[1]:] == eos_id).all())


# (prompt, new tokens, block): ragged ones too; 24 tokens in blocks of 32 is the release's uneven schedule
CASES = [(5, 8, 4), (6, 11, 4), (3, 24, 8), (9, 7, 8), (5, 20, 32), (2, 12, 16)]


@pytest.mark.parametrize("prompt_length,gen_length,block_length", CASES)
@pytest.mark.parametrize("threshold,mask_boost", [(0.95, 1.0), (0.6, 1.0), (0.6, -2.0)])
def test_block_diffusion_is_the_llada20_release_generate(prompt_length, gen_length, block_length, threshold,
                                                         mask_boost) -> None:
    view = llada2_view(prompt_length, 6.0, mask_boost)
    prompt = torch.randint(2, 120, (1, prompt_length), generator=torch.Generator().manual_seed(gen_length))
    sampler = BlockDiffusionSampler(block_length=block_length, threshold=threshold, stop_at_eos=False)
    with torch.no_grad():
        free = sampler.sample(view, prompt, max_new_tokens=gen_length).sequences[0]
    eos_id = int(free[prompt_length + gen_length // 2])  # a token it generates midway: the stop and cut act
    for eos in (eos_id, 1):
        expected = llada20_generate(view.model, prompt, gen_length, block_length, threshold=threshold, eos_id=eos)
        for cache in ("none", "prefix"):
            stopping = sampler.model_copy(update={"stop_at_eos": True, "eos_token_id": eos, "cache": cache})
            with torch.no_grad():
                out = stopping.sample(view, prompt, max_new_tokens=gen_length)
            assert_release_output(out.sequences[0], expected, prompt_length, eos)


def test_the_release_schedule_whole_blocks_and_mask_softmax_each_change_tokens() -> None:
    """Each release convention matters on these cases (the schedule with a threshold that never fires, the
    mask softmax on a model that proposes the mask token): turning it off changes the tokens of some case."""
    changed = {"schedule": False, "whole_blocks": False, "softmax_over_mask": False}
    for prompt_length, gen_length, block_length in CASES:
        view = llada2_view(prompt_length, 6.0, mask_boost=-2.0)
        prompt = torch.randint(2, 120, (1, prompt_length), generator=torch.Generator().manual_seed(gen_length))
        release = BlockDiffusionSampler(block_length=block_length, threshold=1.0, stop_at_eos=False)
        with torch.no_grad():
            tokens = release.sample(view, prompt, max_new_tokens=gen_length).sequences
            for option, value in (("schedule", "masked"), ("whole_blocks", False), ("softmax_over_mask", False)):
                other = release.model_copy(update={option: value}).sample(view, prompt, max_new_tokens=gen_length)
                changed[option] |= not torch.equal(other.sequences, tokens)
    assert all(changed.values()), changed


@pytest.mark.parametrize("prompt_length,gen_length,block_length", CASES)
def test_block_diffusion_with_editing_is_the_llada21_release_generate(prompt_length, gen_length, block_length) -> None:
    view = llada2_view(prompt_length + 100, 30.0)
    prompt = torch.randint(2, 120, (1, prompt_length), generator=torch.Generator().manual_seed(gen_length))
    edited = 0
    for editing_threshold in (0.9, 0.3):
        expected, edits = llada21_generate(view.model, prompt, gen_length, block_length, threshold=0.8,
                                           editing_threshold=editing_threshold, max_post_steps=4)
        edited += edits
        for cache in ("none", "prefix"):
            sampler = BlockDiffusionSampler(block_length=block_length, threshold=0.8, editing_threshold=editing_threshold,
                                            max_post_steps=4, eos_token_id=1, cache=cache)
            with torch.no_grad():
                out = sampler.sample(view, prompt, max_new_tokens=gen_length)
            assert_release_output(out.sequences[0], expected, prompt_length, 1)
    assert edited > 0, "no token was edited: the editing path is not compared"


@pytest.mark.parametrize("steps,minimal_topk", [(3, 1), (12, 1), (32, 2), (32, 5)])
def test_the_llada20_release_s_step_settings(steps, minimal_topk) -> None:
    """steps below and above the block's tokens, and minimal_topk capping them at max_new_tokens // minimal_topk."""
    for prompt_length, gen_length, block_length in CASES[:4]:
        view = llada2_view(prompt_length, 6.0)
        prompt = torch.randint(2, 120, (1, prompt_length), generator=torch.Generator().manual_seed(gen_length))
        expected = llada20_generate(view.model, prompt, gen_length, block_length, steps=steps, threshold=1.0,
                                    minimal_topk=minimal_topk, eos_id=1)
        sampler = BlockDiffusionSampler(block_length=block_length, steps=steps, minimal_topk=minimal_topk,
                                        threshold=1.0, eos_token_id=1)
        with torch.no_grad():
            assert_release_output(sampler.sample(view, prompt, max_new_tokens=gen_length).sequences[0], expected,
                                  prompt_length, 1)


@pytest.mark.parametrize("num_to_transfer,max_post_steps", [(2, 4), (3, 0), (1, 0)])
def test_the_llada21_release_s_transfer_and_post_step_settings(num_to_transfer, max_post_steps) -> None:
    """A ragged left-padded batch, row by row against the release: rows finish their blocks after different
    numbers of passes (one reaching max_post_steps while another still edits)."""
    view = llada2_view(7, 30.0)
    rows, ids, mask = left_padded_rows()
    settings = dict(threshold=0.8, editing_threshold=0.3, max_post_steps=max_post_steps, num_to_transfer=num_to_transfer)
    sampler = BlockDiffusionSampler(block_length=4, eos_token_id=1, **settings)
    with torch.no_grad():
        together = sampler.sample(view, ids, mask, max_new_tokens=10).sequences
    edits = 0
    for i, row in enumerate(rows):
        expected, edited = llada21_generate(view.model, row[None], 10, 4, eos_id=1, **settings)
        edits += edited
        assert_release_output(together[i, -(10 + len(row)):], expected, len(row), 1)
    assert edits > 0


def test_editing_ends_a_block_whose_masked_argmax_is_the_mask_token() -> None:
    """The release loops forever when a masked position's argmax is the mask token (nothing changes from pass to
    pass); the sampler ends the block there, with the tokens of the release stopped after any number of passes."""
    view = llada2_view(123, 6.0)
    prompt = torch.randint(2, 120, (1, 4), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        out = BlockDiffusionSampler(editing_threshold=0.9).sample(view, prompt, max_new_tokens=20)
    expected, _ = llada21_generate(view.model, prompt, 20, 32, max_passes=200)
    assert_release_output(out.sequences[0], expected, 4, 1)
    assert out.model_calls < 60 and bool((out.sequences == MASK).any())


def test_editing_batch_rows_equal_rows_alone_with_memory_cached_and_uncached() -> None:
    model = confident(build(3), 30.0)
    wrapper = MemoryWrapper(model, MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5)))
    rows, ids, mask = left_padded_rows()
    base = dict(max_new_tokens=10, seed=4, block_length=4, threshold=0.8, editing_threshold=0.3, max_post_steps=3)
    for adapt in (True, "blocks"):
        together = wrapper.generate(ids, mask, adapt=adapt, **base)
        assert torch.equal(together, wrapper.generate(ids, mask, adapt=adapt, cache="prefix", **base))
        for i, row in enumerate(rows):
            alone = wrapper.generate(row[None], adapt=adapt, **base)
            assert torch.equal(together[i, -10:], alone[0, -10:]), (adapt, i)


def test_editing_refuses_a_step_schedule() -> None:
    with pytest.raises(ValueError, match="no step schedule"):
        BlockDiffusionSampler(editing_threshold=0.9, steps=8)
