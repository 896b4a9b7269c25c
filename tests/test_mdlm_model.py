"""Native MDLM (DiT) implementation and its adapter: layout, loading, conditioning, SUBS, library hooks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM

from bilevel_dlm.backbone import detect_backbone, resolve_targets
from bilevel_dlm.forward import ModelView
from bilevel_dlm.selection import Selection
from bilevel_dlm.integrations.mdlm import (
    MDLM,
    MDLMBackbone,
    MDLMConfig,
    build_tiny_model,
    reinit_zero_layers_for_tests,
    subs_log_probs,
    tiny_config,
)

MASK = 127
VOCAB = 128


def expected_layout(vocab: int, dim: int, cond: int, heads: int, blocks: int) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes as listed for the release in BACKBONES.md."""
    layout = {
        "backbone.vocab_embed.embedding": (vocab, dim),
        "backbone.sigma_map.mlp.0.weight": (cond, 256),
        "backbone.sigma_map.mlp.0.bias": (cond,),
        "backbone.sigma_map.mlp.2.weight": (cond, cond),
        "backbone.sigma_map.mlp.2.bias": (cond,),
        "backbone.rotary_emb.inv_freq": (dim // heads // 2,),
        "backbone.output_layer.norm_final.weight": (dim,),
        "backbone.output_layer.linear.weight": (vocab, dim),
        "backbone.output_layer.linear.bias": (vocab,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * dim, cond),
        "backbone.output_layer.adaLN_modulation.bias": (2 * dim,),
    }
    for i in range(blocks):
        p = f"backbone.blocks.{i}."
        layout |= {
            p + "norm1.weight": (dim,),
            p + "attn_qkv.weight": (3 * dim, dim),
            p + "attn_out.weight": (dim, dim),
            p + "norm2.weight": (dim,),
            p + "mlp.0.weight": (4 * dim, dim),
            p + "mlp.0.bias": (4 * dim,),
            p + "mlp.2.weight": (dim, 4 * dim),
            p + "mlp.2.bias": (dim,),
            p + "adaLN_modulation.weight": (6 * dim, cond),
            p + "adaLN_modulation.bias": (6 * dim,),
        }
    return layout


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def reference_inv_freq(head_size: int) -> torch.Tensor:
    return torch.tensor([10_000.0 ** (-2 * i / head_size) for i in range(head_size // 2)])


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor([-math.log(1 - (1 - 1e-3) * float(x)) for x in t])


def noisy_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (batch, length), generator=g)
    return ids.masked_fill(torch.rand(batch, length, generator=g) < 0.5, MASK)


def test_state_dict_layout_tiny_and_released() -> None:
    assert shapes(build_tiny_model(n_blocks=3)) == expected_layout(VOCAB, 64, 32, 4, 3)
    with torch.device("meta"):
        released = MDLM(MDLMConfig())
    assert shapes(released) == expected_layout(50258, 768, 128, 12, 12)
    assert released.config.mask_token_id == 50257 and not released.config.time_conditioning


def reference_logits(model: MDLM, ids: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The release's DiT math written out from the state dict (rotary as flash-attn's non-interleaved
    rotation of q and k, DiT's cos-then-sin timestep features, gated adaLN residuals)."""
    sd, cfg = model.state_dict(), model.config
    (batch, length), dim, heads = ids.shape, cfg.hidden_dim, cfg.n_heads
    hd = dim // heads

    def lin(x: torch.Tensor, name: str, bias: bool = True) -> torch.Tensor:
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (dim,)) * sd[name + ".weight"]

    freqs = torch.exp(-math.log(10_000) * torch.arange(128) / 128)
    features = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], dim=-1)
    c = F.silu(lin(F.silu(lin(features, "backbone.sigma_map.mlp.0")), "backbone.sigma_map.mlp.2"))
    angles = torch.arange(length)[:, None] * reference_inv_freq(hd)[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    x = sd["backbone.vocab_embed.embedding"][ids]
    for i in range(cfg.n_blocks):
        p = f"backbone.blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(c, p + "adaLN_modulation")[:, None].chunk(6, dim=-1)
        h = norm(x, p + "norm1") * (1 + scale1) + shift1
        q, k, v = lin(h, p + "attn_qkv", bias=False).view(batch, length, 3, heads, hd).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", rotate(q), rotate(k)) / math.sqrt(hd)
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, dim)
        x = x + gate1 * lin(attended, p + "attn_out", bias=False)
        h = norm(x, p + "norm2") * (1 + scale2) + shift2
        x = x + gate2 * lin(F.gelu(lin(h, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
    shift, scale = lin(c, "backbone.output_layer.adaLN_modulation")[:, None].chunk(2, dim=-1)
    return lin(norm(x, "backbone.output_layer.norm_final") * (1 + scale) + shift, "backbone.output_layer.linear")


def test_forward_matches_reference_math() -> None:
    model = build_tiny_model(std=0.3, time_conditioning=True)
    ids, sigma = noisy_ids(), torch.tensor([0.2, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, sigma).logits, reference_logits(model, ids, sigma), atol=1e-5, rtol=1e-4)


def test_release_config_keys_accepted() -> None:
    config = MDLMConfig(
        architectures=["MDLM"], cond_dim=32, dropout=0.0, hidden_dim=64, model_length=64, n_blocks=2, n_heads=4,
        return_dict=False, time_conditioning=False, torch_dtype="float32", vocab_size=VOCAB, unknown_key=3,
    )
    assert config.unknown_key == 3 and config.hidden_size == 64 and config.num_hidden_layers == 2
    out = MDLM(config)(noisy_ids(), torch.zeros(2))
    assert out.logits.shape == (2, 12, VOCAB)
    with pytest.raises(ValueError, match="n_heads"):
        MDLMConfig(hidden_dim=60, n_heads=4)


def test_round_trip_and_rotary_buffer(tmp_path) -> None:
    model = build_tiny_model()
    ids, sigma = noisy_ids(), torch.tensor([0.3, 1.2])
    model.save_pretrained(tmp_path)
    reference = model(ids, sigma).logits
    loaded = MDLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids, sigma).logits, reference)
    assert torch.allclose(loaded.backbone.rotary_emb.inv_freq, reference_inv_freq(16))
    assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path), MDLM)

    # A checkpoint without the buffer: from_pretrained must compute it, not leave it uninitialised.
    weights = os.path.join(tmp_path, "model.safetensors")
    state = load_file(weights)
    del state["backbone.rotary_emb.inv_freq"]
    save_file(state, weights, metadata={"format": "pt"})
    rebuilt = MDLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(rebuilt.backbone.rotary_emb.inv_freq, reference_inv_freq(16))
    assert torch.equal(rebuilt(ids, sigma).logits, reference)

    half = MDLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.backbone.rotary_emb.inv_freq.dtype == torch.float32
    assert half.backbone.blocks[0].attn_qkv.weight.dtype == torch.bfloat16


def test_fresh_model_outputs_zeros_until_reinit() -> None:
    model = MDLM(tiny_config()).eval()
    ids = noisy_ids()
    assert torch.count_nonzero(model(ids, torch.zeros(2)).logits) == 0
    reinit_zero_layers_for_tests(model, generator=torch.Generator().manual_seed(0))
    assert model(ids, torch.zeros(2)).logits.abs().min() > 0


def test_bidirectional_and_key_padding() -> None:
    model = build_tiny_model()
    ids = noisy_ids(batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % MASK
    base, other = model(ids, torch.zeros(1)).logits, model(changed, torch.zeros(1)).logits
    assert not torch.allclose(base[0, 0], other[0, 0])  # the first position sees the last token

    # Padded keys are invisible: the valid prefix matches the unpadded sequence (rotary is relative).
    padded = torch.cat([ids, torch.full((1, 5), 3)], dim=1)
    keep = torch.cat([torch.ones(1, 12), torch.zeros(1, 5)], dim=1).long()
    out = model(padded, torch.zeros(1), attention_mask=keep).logits[:, :12]
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)


def test_hidden_states() -> None:
    out = build_tiny_model(n_blocks=3)(noisy_ids(), torch.zeros(2), output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 12, 64)


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_subs_is_normalised_and_carries_unmasked_tokens(lead: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(*lead, VOCAB, generator=g)
    ids = torch.randint(0, VOCAB, lead, generator=g)
    ids.view(-1)[0], ids.view(-1)[-1] = MASK, 5
    out = subs_log_probs(logits, ids, MASK)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(lead))
    assert torch.isneginf(out[..., MASK]).all()
    masked = ids == MASK
    expected = torch.log_softmax(logits[..., :MASK], dim=-1)[masked]  # mask is the last id
    torch.testing.assert_close(out[masked][:, :MASK], expected)
    carried = out[~masked]
    tokens = ids[~masked]
    assert torch.equal(carried.gather(-1, tokens[:, None]), torch.zeros(len(tokens), 1))
    assert torch.isneginf(carried).sum() == carried.numel() - len(tokens)


def test_time_conditioning() -> None:
    ids = noisy_ids()
    off = build_tiny_model()
    torch.testing.assert_close(off(ids, torch.tensor([0.0, 0.0])).logits, off(ids, torch.tensor([2.0, 5.0])).logits)
    on = build_tiny_model(std=0.5, time_conditioning=True)
    low, high = on(ids, torch.tensor([0.1, 0.1])).logits, on(ids, torch.tensor([2.0, 0.1])).logits
    assert not torch.allclose(low[0], high[0], atol=1e-4)
    torch.testing.assert_close(low[1], high[1])  # per-sample sigma


def test_adapter_call_uses_loglinear_sigma() -> None:
    model = build_tiny_model(std=0.5, time_conditioning=True)
    ids, t = noisy_ids(), torch.tensor([0.25, 0.9])
    adapter = MDLMBackbone()
    torch.testing.assert_close(adapter.call(model, ids, None, t).logits, model(ids, sigma_of(t)).logits)
    torch.testing.assert_close(adapter.call(model, ids, None).logits, model(ids, torch.zeros(2)).logits)


def test_gradient_checkpointing_same_grads() -> None:
    ids = noisy_ids()

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = build_tiny_model(time_conditioning=True).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls = []
        model.backbone.blocks[0].attn_qkv.register_forward_hook(lambda *_: calls.append(1))
        model(ids, torch.tensor([0.5, 1.0])).logits.logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block is recomputed in backward
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, msg=name)


def test_detect_backbone_and_targets() -> None:
    model = build_tiny_model()
    adapter = detect_backbone(model)
    assert isinstance(adapter, MDLMBackbone) and adapter.default_sampler == "mdlm"
    assert adapter.mask_token_id(model) == MASK
    assert adapter.output_head(model) is model.backbone.output_layer.linear
    targets = resolve_targets(adapter, model, adapter.ffn_targets + adapter.attention_targets, [0, 1])
    assert sorted(targets) == sorted(
        f"backbone.blocks.{i}.{name}" for i in (0, 1) for name in ("mlp.0", "mlp.2", "attn_qkv", "attn_out")
    )


def test_model_view_matches_subs_of_forward() -> None:
    model = build_tiny_model(std=0.5, time_conditioning=True)
    view = ModelView(MDLMBackbone(), model, MASK)
    ids, t = noisy_ids(), torch.tensor([0.4, 0.7])
    expected = subs_log_probs(model(ids, sigma_of(t)).logits, ids, MASK)
    torch.testing.assert_close(view.logits(ids, mask_ratio=t), expected)
    select = ids == MASK
    rows, _ = view.logits_at(Selection.of(select), ids, mask_ratio=t)
    torch.testing.assert_close(rows, expected[select])
