"""Generation under every pair of the options a user can switch, for each sampler of the native models.

Factors per sampler: backbone family, blocks (Dream), KV cache and its refresh interval, threshold or factor
decoding and its rule (Fast-dLLM's or the share), block diffusion's release conventions (schedule, whole
blocks, softmax over the mask token, stop at EOS) and LLaDA2.1's editing, the head on every position
(``full_logits``), memory (none, the prompt's, re-adapted after each block) and left padding. For each combination of a greedy all-pairs design (``all_pairs`` of the training option matrix):

- every new token is revealed (no mask left) and the prompt is kept;
- each row of the left-padded batch decodes exactly as that prompt alone (per-sample memory, padding and
  cache together);
- an exact cache (a full forward every step, or block diffusion's block-causal prefix cache) gives the
  tokens of uncached decoding, and ``full_logits`` those of the head on the needed positions only.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper
from test_backbones_bilevel import FAMILIES, confident
from test_option_matrix import all_pairs

MASK, NEW = 127, 8
PARALLEL = {None: {}, "threshold": dict(threshold=0.7), "factor": dict(factor=1.0)}  # how many tokens a step reveals
RULES = ("fast_dllm", "share")  # how a parallel step counts its reveals
LLADA = {"family": ("llada", "llada_moe"), "cache": ("none", "prefix", "dual"), "cache_refresh": (None, 1),
         "parallel": (None, "threshold", "factor"), "threshold_rule": RULES, "full_logits": (False, True),
         "adapt": (False, True, "blocks"), "padding": ("none", "left")}
DREAM = {"family": ("dream",), "block_length": (None, 4), "cache": ("none", "prefix", "dual"),
         "cache_refresh": (None, 1, 2), "alg": ("entropy", "maskgit_plus"), "parallel": (None, "threshold", "factor"),
         "threshold_rule": RULES, "full_logits": (False, True), "adapt": (False, True, "blocks"),
         "padding": ("none", "left")}
BLOCK = {"family": ("llada2",), "cache": ("none", "prefix"), "threshold": (0.7, 0.95), "editing_threshold": (None, 0.5),
         "schedule": ("release", "masked"), "whole_blocks": (True, False), "softmax_over_mask": (True, False),
         "stop_at_eos": (True, False), "full_logits": (False, True), "adapt": (False, True, "blocks"),
         "padding": ("none", "left")}
FIXED = {"llada": dict(block_length=4, steps=8), "llada_moe": dict(block_length=4, steps=8),
         "dream": dict(steps=6), "llada2": dict(block_length=4)}


def valid(factors: dict[str, tuple]):
    names = list(factors)

    def check(row: tuple) -> bool:
        settings = dict(zip(names, row))
        if settings.get("cache_refresh") is not None and settings["cache"] == "none":
            return False  # refused: a refresh interval without a cache
        if settings.get("editing_threshold") is not None and settings.get("schedule") == "masked":
            return False  # refused: LLaDA2.1's editing loop has no step schedule
        return settings.get("parallel") is None or settings.get("alg", "maskgit_plus") == "maskgit_plus"

    return check


CASES = [dict(zip(factors, row)) for factors in (LLADA, DREAM, BLOCK) for row in all_pairs(factors, valid(factors))]


def wrapper(family: str, device: torch.device | str = "cpu") -> MemoryWrapper:
    """A float64 model and memory: a batch and its rows alone then differ by rounding far below the gaps
    between the (near-tied, random-model) confidences, so "decodes as alone" is checked exactly. Its head
    is scaled (``confident``) so that the thresholds and factors here reveal several tokens in a step."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5, dtype="float64"),
                          inner=InnerConfig(lr=20.0, clip=None))
    return MemoryWrapper(confident(FAMILIES[family].build(0).to(device, torch.float64).eval()), config)


def prompts(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 120, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :2] = mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 1), mask


def exact_cache(settings: dict) -> bool:
    return settings["cache"] != "none" and (settings["family"] == "llada2" or settings.get("cache_refresh") == 1)


@pytest.mark.device
@pytest.mark.parametrize("settings", CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_generation_under_the_option_combination(settings: dict, device: torch.device) -> None:
    family, padding = settings["family"], settings["padding"]
    options = {key: value for key, value in settings.items() if key not in ("family", "padding", "parallel")}
    options = {**FIXED[family], **options, **PARALLEL[settings.get("parallel")], "max_new_tokens": NEW, "seed": 0}
    w = wrapper(family, device)
    ids, mask = prompts(padding)
    out = w.generate(ids, mask, **options)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert not bool((out[:, -NEW:] == MASK).any())
    for row in range(3):
        alone = w.generate(ids[row:row + 1, mask[row].bool()], **options)
        assert torch.equal(out[row, -NEW:], alone[0, -NEW:]), f"row {row} differs from the prompt alone"
    if exact_cache(settings):
        plain = {**options, "cache": "none"} | ({"cache_refresh": None} if "cache_refresh" in options else {})
        assert torch.equal(out, w.generate(ids, mask, **plain))
    if settings["full_logits"]:
        assert torch.equal(out, w.generate(ids, mask, **{**options, "full_logits": False}))


@pytest.mark.parametrize("family", ["llada", "llada_moe", "dream", "llada2"])
def test_the_parallel_settings_reveal_several_tokens_in_a_step(family: str) -> None:
    """The matrix's thresholds and factors act on these models (left-padded batch, no memory): each needs
    fewer forwards than one step per scheduled share, so the parallel axis is tested, not idle."""
    w = wrapper(family)
    ids, mask = prompts("left")
    base = {**FIXED[family], "max_new_tokens": NEW, "seed": 0, "adapt": False, "return_history": True}
    if family == "llada2":
        settings = [dict(threshold=t) for t in BLOCK["threshold"]]
        plain = w.generate(ids, mask, **base, threshold=1.0).model_calls
    else:
        base |= {"alg": "maskgit_plus"} if family == "dream" else {}
        settings = [PARALLEL["threshold"], PARALLEL["factor"]]
        plain = w.generate(ids, mask, **base).model_calls
    for parallel in settings:
        assert w.generate(ids, mask, **base, **parallel).model_calls < plain, parallel


def test_the_designs_cover_every_valid_pair_of_option_values() -> None:
    for factors in (LLADA, DREAM, BLOCK):
        names = list(factors)
        chosen = [tuple(case.values()) for case in CASES if list(case) == names]
        possible = [row for row in itertools.product(*factors.values()) if valid(factors)(row)]
        for i, j in itertools.combinations(range(len(names)), 2):
            assert {(row[i], row[j]) for row in chosen} == {(row[i], row[j]) for row in possible}, (names[i], names[j])
