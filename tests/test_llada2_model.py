"""Native LLaDA2.x: the release's state-dict layout, attention, router, block-causal masking, the
adapter's forward call, adaptation in train mode, and block-diffusion decoding.

The expected layout and formulas are written out here from the release's modeling code (see the
module docstring of integrations/llada2/modeling.py), not taken from the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.backbone import detect_backbone
from bilevel_dlm.forward import ModelView
from bilevel_dlm.integrations.llada2 import (LLaDA2Backbone, LLaDA2MoeConfig, LLaDA2MoeModelLM,
                                             additive_attention_mask, tiny_config)
from bilevel_dlm.sampling import BlockDiffusionSampler
from bilevel_dlm.sampling.block import block_causal_mask
from transformers import AutoModelForMaskedLM

from test_backbones_bilevel import confident

MASK = 127


def build(seed: int = 0, **overrides) -> LLaDA2MoeModelLM:
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(tiny_config(**overrides))
    with torch.no_grad():  # give the router a non-zero expert bias and the norms non-unit weights
        for name, tensor in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.expert_bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_state_dict_has_the_release_names_and_shapes() -> None:
    config = tiny_config()
    h, heads, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    expected = {"model.word_embeddings.weight": (config.vocab_size, h), "model.norm.weight": (h,),
                "lm_head.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        expected.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                         f"{p}.attention.query_key_value.weight": ((heads + 2 * kv) * d, h),
                         f"{p}.attention.query_layernorm.weight": (d,), f"{p}.attention.key_layernorm.weight": (d,),
                         f"{p}.attention.dense.weight": (h, heads * d)})
        if i < config.first_k_dense_replace:
            f = config.intermediate_size
            expected.update({f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                             f"{p}.mlp.down_proj.weight": (h, f)})
            continue
        m, s = config.moe_intermediate_size, config.moe_intermediate_size * config.num_shared_experts
        expected.update({f"{p}.mlp.gate.weight": (config.num_experts, h), f"{p}.mlp.gate.expert_bias": (config.num_experts,),
                         f"{p}.mlp.shared_experts.gate_proj.weight": (s, h), f"{p}.mlp.shared_experts.up_proj.weight": (s, h),
                         f"{p}.mlp.shared_experts.down_proj.weight": (h, s)})
        for e in range(config.num_experts):
            expected.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (m, h), f"{p}.mlp.experts.{e}.up_proj.weight": (m, h),
                             f"{p}.mlp.experts.{e}.down_proj.weight": (h, m)})
    state = LLaDA2MoeModelLM(config).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_save_and_load_round_trip_keeps_release_only_config_keys(tmp_path) -> None:
    model = build()
    model.config.score_function = "sigmoid"  # a key of the released config.json the code never reads
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LLaDA2MoeModelLM and loaded.config.score_function == "sigmoid"
    ids = torch.randint(2, 120, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert isinstance(detect_backbone(loaded), LLaDA2Backbone)


def _reference_attention(layer, x: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The release's attention, written out: fused qkv split by heads, per-head RMSNorm, partial RoPE."""
    config = layer.config
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    w = layer.query_key_value.weight.view(heads + 2 * kv, d, -1)
    q, k, v = (torch.einsum("bld,hed->bhle", x, w[a:b]) for a, b in ((0, heads), (heads, heads + kv), (heads + kv, heads + 2 * kv)))

    def rms(t, weight):
        return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    q, k = rms(q, layer.query_layernorm.weight), rms(k, layer.key_layernorm.weight)
    r = config.rotary_dim
    inv = config.rope_theta ** (-torch.arange(0, r, 2).double() / r)
    angle = position[:, None].double() * inv  # [L, r/2]
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(t):  # pairs (i, i + r/2) of the first r channels rotate by the position's angle
        a, b, rest = t[..., : r // 2], t[..., r // 2 : r], t[..., r:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = q @ k.mT / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(-1) @ v
    return layer.dense(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def test_attention_equals_the_written_out_release_formula() -> None:
    model = build()
    layer = model.model.layers[1].attention
    x = torch.randn(2, 9, model.config.hidden_size)
    position = torch.arange(9)
    from bilevel_dlm.integrations.llada2.modeling import rotary_cos_sin

    rotary = rotary_cos_sin(model.config, position[None])
    mask = additive_attention_mask(block_causal_mask(torch.arange(9)[None].repeat(2, 1) // 4,
                                                     torch.ones(2, 9, dtype=torch.bool)), torch.float32)
    for m in (None, mask):
        torch.testing.assert_close(layer(x, rotary, m), _reference_attention(layer, x, position, m), rtol=1e-5, atol=1e-5)


def test_router_picks_within_the_best_groups_and_scales_unbiased_scores() -> None:
    config = tiny_config(num_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.5)
    gate = LLaDA2MoeModelLM(config).model.layers[1].mlp.gate
    logits = torch.tensor([[3.0, -3.0, 0.5, 0.4, 2.0, 1.9, -1.0, 2.5]])  # groups: (0,1) (2,3) (4,5) (6,7)
    tokens = torch.zeros(1, config.hidden_size)
    tokens[0, 0] = 1.0
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits[0]
        gate.expert_bias.zero_()
    scores = logits.sigmoid()[0]
    # sigmoid: .95 .05 | .62 .60 | .88 .87 | .27 .92; group score = sum of its two best:
    # 1.00, 1.22, 1.75, 1.19 -> groups 2 and 1. The single best expert (0) is outside them.
    experts, weights = gate(tokens)
    assert set(experts[0].tolist()) == {4, 5}
    chosen = scores[[4, 5]]
    torch.testing.assert_close(weights[0].sort().values, (chosen / chosen.sum() * 2.5).sort().values)
    with torch.no_grad():
        gate.expert_bias[2] = 0.5  # selection only: expert 2 now leads group 1, its weight stays unbiased
    experts, weights = gate(tokens)
    assert set(experts[0].tolist()) == {2, 4}
    chosen = scores[[2, 4]]
    torch.testing.assert_close(weights[0].sort().values, (chosen / chosen.sum() * 2.5).sort().values)


def test_sparse_block_equals_a_dense_computation_of_every_expert() -> None:
    model = build()
    block = model.model.layers[2].mlp
    x = torch.randn(3, 7, model.config.hidden_size)
    experts, weights = block.gate(x.reshape(-1, x.shape[-1]))
    dense = torch.stack([expert(x.reshape(-1, x.shape[-1])) for expert in block.experts], 1)  # [N, E, d]
    routed = (dense.gather(1, experts[..., None].expand(-1, -1, dense.shape[-1])) * weights[..., None]).sum(1)
    expected = routed.view_as(x) + block.shared_experts(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_block_causal_mask_hides_later_blocks_only() -> None:
    model = build()
    ids = torch.randint(2, 120, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = torch.randint(2, 120, (4,))  # the last of three blocks of 4
    blocks = torch.arange(12)[None] // 4
    mask = block_causal_mask(blocks, torch.ones(1, 12, dtype=torch.bool))
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask).logits, model(changed, attention_mask=mask).logits
        full_a, full_b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(full_a[:, :8], full_b[:, :8]), "without the mask later blocks are visible"


def test_the_adapter_passes_the_release_mask_format_for_padded_batches() -> None:
    model = build()
    view = ModelView(LLaDA2Backbone(), model, MASK)
    ids = torch.randint(2, 120, (2, 10))
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, 7:] = 0
    with torch.no_grad():
        logits = view.logits(ids, padding)
        additive = additive_attention_mask(padding, torch.float32)
        assert additive.shape == (2, 1, 10, 10) and set(additive.unique().tolist()) == {0.0, float("-inf")}
        torch.testing.assert_close(logits, model(ids, attention_mask=additive).logits)
        torch.testing.assert_close(logits[0], model(ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1, :7], model(ids[1:, :7]).logits[0], rtol=1e-5, atol=1e-5)


def test_adaptation_runs_in_train_mode_and_refuses_active_dropout() -> None:
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5))
    prompts = torch.randint(2, 120, (2, 9))
    model = build(attention_dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        MemoryWrapper(model, config).adapt(prompts)
    assert not model.training, "the mode is restored"
    model = build()
    modes = []
    handle = model.model.layers[-1].register_forward_pre_hook(lambda m, a: modes.append(m.training))
    memory = MemoryWrapper(model, config).adapt(prompts)
    handle.remove()
    assert modes and all(modes), "the release's experts only have gradients in train mode"
    assert any(bool(v.abs().sum() > 0) for n, v in zip(memory.names, memory.values) if "lora_B" in n)


@pytest.mark.parametrize("steps", [4, 2])
def test_block_decoding_fills_blocks_left_to_right_with_the_step_share(steps: int) -> None:
    model = build()
    view = ModelView(LLaDA2Backbone(), model, MASK)
    prompt = torch.randint(2, 120, (1, 6))
    sampler = BlockDiffusionSampler(block_length=4, steps=steps, threshold=1.0, **OWN_RULES)  # step shares only
    out = sampler.sample(view, prompt, max_new_tokens=10, return_history=True)
    assert torch.equal(out.sequences[:, :6], prompt) and not bool((out.sequences == MASK).any())
    # Blocks counted from the first real token: the prompt ends inside block 1 (positions 4..7).
    blocks = [range(6, 8), range(8, 12), range(12, 16)]
    for canvas in out.history:  # a later block only starts once the earlier ones are complete
        counts = [int((canvas[0, list(b)] == MASK).sum()) for b in blocks]
        first_open = next((i for i, c in enumerate(counts) if c), len(blocks))
        assert all(c == len(blocks[i]) for i, c in enumerate(counts) if i > first_open)
    expected_calls = sum(min(steps, len(b)) for b in blocks)  # one call per step that still has a share
    assert out.model_calls == expected_calls == len(out.history)


# The sampler's own options where it departs from the release (tested against the release in
# tests/test_decoding_parity.py): the block's masked count split over the steps, the canvas to max_new_tokens,
# the mask token never proposed, no stop at EOS.
OWN_RULES = dict(schedule="masked", whole_blocks=False, softmax_over_mask=False, stop_at_eos=False)


def full_canvas_block_decoding(model: LLaDA2MoeModelLM, prompt: torch.Tensor, new_tokens: int, block_length: int,
                               steps: int, threshold: float) -> torch.Tensor:
    """Block diffusion written out plainly for one unpadded row: every step runs the whole canvas."""
    canvas = torch.cat([prompt, torch.full((1, new_tokens), MASK)], 1)
    blocks = torch.arange(canvas.shape[1]) // block_length
    attention = (blocks[None, :] <= blocks[:, None])[None, None]
    for block in range(int(blocks[prompt.shape[1]]), int(blocks[-1]) + 1):
        positions = [p for p in range(prompt.shape[1], canvas.shape[1]) if blocks[p] == block]
        for share in (len(positions) // steps + (i < len(positions) % steps) for i in range(steps)):
            masked = [p for p in positions if canvas[0, p] == MASK]
            if not masked:
                break
            logits = model(canvas, attention_mask=attention).logits[0]
            logits[:, MASK] = float("-inf")
            confidence, token = logits.softmax(-1).max(-1)
            above = [p for p in masked if confidence[p] > threshold]
            for p in above if len(above) >= share else sorted(masked, key=lambda p: -confidence[p])[:share]:
                canvas[0, p] = token[p]
    return canvas


@pytest.mark.parametrize("seed", range(3))
def test_block_decoding_equals_full_canvas_decoding(seed: int) -> None:
    """The sampler runs the canvas only to the current block's end (no position sees a later block): its
    tokens equal those of full-canvas forwards, cached or not, with and without early block ends (float64,
    so no near-ties flip; the head is scaled so that the threshold of 0.7 fires)."""
    model = confident(build(seed)).double()
    view = ModelView(LLaDA2Backbone(), model, MASK)
    prompt = torch.randint(2, 120, (1, 7), generator=torch.Generator().manual_seed(seed))
    calls = {}
    with torch.no_grad():
        for threshold in (0.7, 1.0):
            expected = full_canvas_block_decoding(model, prompt, 13, 4, 3, threshold)
            for cache in ("none", "prefix"):
                sampler = BlockDiffusionSampler(block_length=4, steps=3, threshold=threshold, cache=cache, **OWN_RULES)
                out = sampler.sample(view, prompt, max_new_tokens=13)
                assert torch.equal(out.sequences, expected), (threshold, cache)
                calls[threshold] = out.model_calls
    assert calls[0.7] < calls[1.0]


def test_threshold_zero_reveals_a_whole_block_per_step() -> None:
    model = build()
    view = ModelView(LLaDA2Backbone(), model, MASK)
    out = BlockDiffusionSampler(block_length=4, steps=4, threshold=1e-9).sample(view, torch.randint(2, 120, (2, 8)),
                                                                              max_new_tokens=8)
    assert out.model_calls == 2 and not bool((out.sequences == MASK).any())


def left_padded_rows() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Prompts of 5, 9 and 7 tokens, and the same as one left-padded batch (ids, attention mask)."""
    rows = [torch.randint(2, 120, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 7)]
    ids = torch.full((3, 9), 1, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    return rows, ids, mask


def test_block_decoding_of_a_left_padded_batch_equals_each_prompt_alone() -> None:
    model = build()
    wrapper = MemoryWrapper(model, MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5)))
    rows, ids, mask = left_padded_rows()
    settings = dict(max_new_tokens=8, adapt=True, seed=4, block_length=4, steps=2, threshold=0.3)
    together = wrapper.generate(ids, mask, **settings)
    for i, row in enumerate(rows):
        alone = wrapper.generate(row[None], **settings)
        assert torch.equal(together[i, -8:], alone[0, -8:]), f"row {i}"


def test_llada2_config_refuses_inconsistent_groups() -> None:
    with pytest.raises(ValueError, match="n_group"):
        LLaDA2MoeConfig(num_key_value_heads=2, num_experts=6, n_group=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LLaDA2MoeConfig()
