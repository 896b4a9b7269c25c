"""Native Dream-v0: checkpoint layout, loading, bidirectional attention, padding, checkpointing, adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, Qwen2Config, Qwen2ForCausalLM

from bilevel_dlm.backbone import detect_backbone
from bilevel_dlm.forward import ModelView
from bilevel_dlm.integrations.dream import (
    DreamBackbone,
    DreamConfig,
    DreamModel,
    padding_attention_mask,
    padding_position_ids,
    tiny_config,
)

SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)


def _model(seed: int = 0, **overrides) -> DreamModel:
    torch.manual_seed(seed)
    return DreamModel(tiny_config(**overrides)).eval()


def _ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 120, (batch, length), generator=generator)


def _released_config_json(**sizes) -> dict:
    """config.json as the release writes it (transformers 4.46 era), with tiny sizes."""
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 1, "mask_token_id": 127,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 131072,
        "max_window_layers": 28, "model_type": "Dream", "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.46.2", "use_cache": False,
        "use_mrope": False, "use_sliding_window": False, **sizes,
    }


def test_state_dict_matches_qwen2_for_causal_lm():
    ours = DreamModel(tiny_config(**SIZES)).state_dict()
    qwen = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in qwen.items()}
    assert ours["lm_head.weight"].data_ptr() != ours["model.embed_tokens.weight"].data_ptr()


def test_tied_embeddings_option():
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_release_defaults():
    config = DreamConfig()
    assert (config.mask_token_id, config.pad_token_id, config.eos_token_id, config.bos_token_id) == (
        151666, 151643, 151643, 151665,
    )
    assert config.rope_parameters["rope_theta"] == 1e6 and not config.tie_word_embeddings


def test_save_and_from_pretrained_round_trip(tmp_path):
    model, ids = _model(), _ids()
    model.save_pretrained(tmp_path)
    for loader in (DreamModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is DreamModel
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_loads_released_checkpoint_folder(tmp_path):
    source, ids = _model(), _ids()
    (tmp_path / "config.json").write_text(json.dumps(_released_config_json(**SIZES)))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    for loader in (DreamModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is DreamModel and loaded.config.mask_token_id == 127
        assert loaded.config.rope_parameters["rope_theta"] == 1e6
        # rope_theta differs from the source's default, so compare against the source under the same theta
        source.model.rotary_emb.inv_freq.copy_(loaded.model.rotary_emb.inv_freq)
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=0, atol=0)
    expected = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_is_bidirectional(attn):
    model, ids = _model(), _ids()
    model.set_attn_implementation(attn)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 120
    assert not torch.allclose(model(ids).logits[:, 0], model(changed).logits[:, 0], atol=1e-4)


def test_full_and_none_masks_agree():
    model, ids = _model(), _ids()
    ones = torch.ones_like(ids)
    reference = model(ids).logits
    for mask in ("full", ones, ones.bool()[:, None, :, None] & ones.bool()[:, None, None, :]):
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(attn, side):
    model = _model()
    model.set_attn_implementation(attn)
    lengths, width = [9, 5, 3], 9
    rows = [_ids(1, n, seed=n) for n in lengths]
    batch = torch.ones(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, row in enumerate(rows):
        span = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        batch[b, span], mask[b, span] = row[0], 1
    padded = model(batch, attention_mask=mask).logits
    assert torch.isfinite(padded).all()
    for b, row in enumerate(rows):
        torch.testing.assert_close(padded[b][mask[b].bool()], model(row).logits[0], rtol=1e-5, atol=1e-5)


def test_padding_helpers():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert padding_position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
    full = padding_attention_mask(mask)
    assert full.shape == (2, 1, 4, 4) and full.dtype == torch.bool
    keep = mask.bool()
    for b in range(2):
        for i in range(4):
            expected = [bool(keep[b, i] and keep[b, j]) or i == j for j in range(4)]
            assert full[b, 0, i].tolist() == expected


def test_output_hidden_states():
    model, ids = _model(num_hidden_layers=3), _ids()
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_same_grads(enable):
    ids = _ids()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model().train()
        if checkpointing:
            getattr(model, enable)()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids).logits.logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_adapter_realigns_logits():
    model, ids = _model(), _ids()
    backbone = detect_backbone(model)
    assert isinstance(backbone, DreamBackbone)
    aligned = ModelView(backbone, model, model.config.mask_token_id).logits(ids)
    raw = model(ids).logits
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
    torch.testing.assert_close(aligned[:, 0], raw[:, 0])
    assert not torch.allclose(aligned[:, 1:], raw[:, 1:], atol=1e-3)


def test_adapter_padding_matches_native_2d_mask():
    model, ids = _model(), _ids(3, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 6:] = 0
    view = ModelView(DreamBackbone(), model, model.config.mask_token_id)
    native = model(ids, attention_mask=mask).logits
    aligned = view.logits(ids, mask)
    torch.testing.assert_close(aligned[:, 1:], native[:, :-1])


def test_adapter_structure():
    model, backbone = _model(), DreamBackbone()
    assert backbone.blocks(model) is model.model.layers
    assert backbone.output_head(model) is model.lm_head
    assert backbone.mask_token_id(model) == 127 and backbone.protected_prefix == 1
    block = backbone.blocks(model)[0]
    for target in backbone.ffn_targets + backbone.attention_targets:
        assert isinstance(block.get_submodule(target), torch.nn.Linear)
