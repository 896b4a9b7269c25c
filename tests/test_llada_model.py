"""Native LLaDA: released checkpoint layout, numerics against an independent reference, HF plumbing, adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from bilevel_dlm.backbone import detect_backbone, resolve_targets
from bilevel_dlm.forward import ModelView
from bilevel_dlm.integrations.llada import LLaDABackbone, LLaDAConfig, LLaDAModelLM, tiny_config
from bilevel_dlm.integrations.llada.modeling import rotary_tables

MASK_ID = 127


def make_model(seed: int = 0, **overrides) -> LLaDAModelLM:
    """Tiny model with weights large enough for peaked attention (so RoPE and masking visibly matter)."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.25)
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 127, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: LLaDAModelLM, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA forward written from the published architecture in float64, reading only the state dict."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n_heads, n_kv, width = cfg.n_heads, cfg.n_kv_heads, cfg.d_model
    head_dim, (batch, length) = width // n_heads, ids.shape
    angles = torch.arange(length, dtype=torch.float64)[:, None] * cfg.rope_theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    )
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def rope(t):  # [B, L, H, hd]: component j is paired with j + hd/2
        a, b = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def affine(t, name):  # weight (and bias, when the checkpoint has one) of a linear or a norm
        weight, bias = sd[f"{name}.weight"], sd.get(f"{name}.bias", 0.0)
        return (t @ weight.T if weight.dim() == 2 else t * weight) + bias

    def rms(t, name):
        return affine(t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps), name)

    x = sd["model.transformer.wte.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, p + "attn_norm")
        q = rope(affine(h, p + "q_proj").view(batch, length, n_heads, head_dim))
        k = rope(affine(h, p + "k_proj").view(batch, length, n_kv, head_dim))
        v = affine(h, p + "v_proj").view(batch, length, n_kv, head_dim)
        kv_of_head = torch.arange(n_heads) // (n_heads // n_kv)
        k, v = k[:, :, kv_of_head], v[:, :, kv_of_head]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, width)
        x = x + affine(attended, p + "attn_out")
        h = rms(x, p + "ff_norm")
        x = x + affine(F.silu(affine(h, p + "ff_proj")) * affine(h, p + "up_proj"), p + "ff_out")
    return affine(rms(x, "model.transformer.ln_f"), "model.transformer.ff_out")


def expected_state_dict_shapes(d: int, f: int, vocab: int, n_layers: int, kv_dim: int) -> dict[str, tuple[int, ...]]:
    """The released LLaDA-8B key layout (BACKBONES.md), for arbitrary sizes."""
    shapes = {"model.transformer.wte.weight": (vocab, d)}
    for i in range(n_layers):
        block = f"model.transformer.blocks.{i}."
        shapes |= {
            block + "attn_norm.weight": (d,),
            block + "q_proj.weight": (d, d),
            block + "k_proj.weight": (kv_dim, d),
            block + "v_proj.weight": (kv_dim, d),
            block + "attn_out.weight": (d, d),
            block + "ff_norm.weight": (d,),
            block + "ff_proj.weight": (f, d),
            block + "up_proj.weight": (f, d),
            block + "ff_out.weight": (d, f),
        }
    return shapes | {"model.transformer.ln_f.weight": (d,), "model.transformer.ff_out.weight": (vocab, d)}


RELEASED_STYLE_CONFIG = {  # the released config.json's keys, at tiny sizes
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
    "embedding_dropout": 0.0, "embedding_size": 128, "eos_token_id": 1, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": MASK_ID, "max_sequence_length": 512, "mlp_hidden_size": 96,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 2,
    "n_layers": 2, "pad_token_id": 1, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126, "weight_tying": False,
}  # fmt: skip


# ----- checkpoint layout and loading ---------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_state_dict_has_the_released_names_and_shapes(n_kv_heads):
    model = LLaDAModelLM(tiny_config(n_kv_heads=n_kv_heads))
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == expected_state_dict_shapes(64, 128, 128, 4, kv_dim=16 * n_kv_heads)


def test_defaults_are_the_released_llada_8b_values():
    cfg = LLaDAConfig()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden_size) == (4096, 32, 32, 32, 12288)
    assert (cfg.vocab_size, cfg.embedding_size, cfg.rope_theta, cfg.rms_norm_eps) == (126464, 126464, 500000.0, 1e-5)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.weight_tying) == (126336, 126081, 126081, False)


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    model = make_model(n_kv_heads=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = LLaDAModelLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 9)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_released_config_json_and_weights_load_as_is(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_STYLE_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LLaDAConfig)
    assert (config.n_kv_heads, config.mlp_hidden_size, config.embedding_size, config.init_fn) == (2, 96, 128, "mitchell")
    source = make_model(n_layers=2, n_kv_heads=2, mlp_hidden_size=96, vocab_size=126)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors", {"format": "pt"})
    ids = random_ids(2, 7)
    for loaded in (LLaDAModelLM.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, LLaDAModelLM)
        assert torch.equal(loaded.eval()(ids).logits, source(ids).logits)


def test_weight_tying_shares_the_embedding_and_saves_without_a_head_tensor(tmp_path):
    model = make_model(weight_tying=True)
    transformer = model.model.transformer
    assert transformer.ff_out.weight is transformer.wte.weight
    ids = random_ids(1, 6)
    torch.testing.assert_close(model(ids).logits, reference_logits(model, ids).float(), atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    assert "model.transformer.ff_out.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = LLaDAModelLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unsupported_architecture_options_are_refused():
    with pytest.raises(NotImplementedError, match="alibi"):
        LLaDAModelLM(tiny_config(alibi=True, rope=False))


# ----- numerics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_logits_match_an_independent_reference(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    ids = random_ids(2, 12)
    expected = reference_logits(model, ids).float()
    assert expected.std() > 1.0  # peaked enough that a wrong rotation or head grouping would show
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_biases_follow_include_bias_and_match_the_reference():
    model = make_model(include_bias=True, n_kv_heads=2)
    biases = {name for name in model.state_dict() if name.endswith(".bias")}
    assert biases == {name.removesuffix("weight") + "bias" for name in model.state_dict() if name.endswith(".weight")} - {
        "model.transformer.wte.bias"
    }
    ids = random_ids(2, 8)
    torch.testing.assert_close(model(ids).logits, reference_logits(model, ids).float(), atol=1e-4, rtol=1e-4)


def test_attention_is_bidirectional():
    model = make_model()
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 127
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0], atol=1e-3)


def test_right_padding_does_not_change_the_real_positions():
    model = make_model(n_kv_heads=2)
    row, full = random_ids(1, 6, seed=2), random_ids(1, 10, seed=3)
    padded = torch.cat((row, torch.full((1, 4), 1)), dim=1)
    batch = torch.cat((padded, full))
    mask = torch.ones_like(batch)
    mask[0, 6:] = 0
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0, :6], model(row).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(full).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference_logits(model, batch, mask).float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(batch).logits[0, :6], out[0, :6], atol=1e-3)  # the mask did matter


def test_hidden_states_are_block_inputs_then_the_normed_final_state():
    model = make_model()
    ids = random_ids(2, 5)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    transformer = model.model.transformer
    assert torch.equal(out.hidden_states[0], transformer.wte(ids))
    cos, sin = rotary_tables(5, model.config.head_dim, model.config.rope_theta, torch.device("cpu"))
    assert torch.equal(out.hidden_states[1], transformer.blocks[0](out.hidden_states[0], cos, sin, None))
    assert torch.equal(transformer.ff_out(out.hidden_states[-1]), out.logits)
    assert model(ids).hidden_states is None


def test_return_dict_false_gives_a_tuple_and_labels_are_refused():
    model = make_model()
    ids = random_ids(1, 4)
    logits = model(ids, return_dict=False)[0]
    assert torch.equal(logits, model(ids).logits)
    with pytest.raises(ValueError, match="masking ratio"):
        model(ids, labels=ids)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_gradients(enable):
    ids, mask = random_ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0

    def gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = make_model(n_kv_heads=2).train()
        if checkpointing:
            getattr(model, enable)()
        calls = []
        model.model.transformer.blocks[1].q_proj.register_forward_hook(lambda *_: calls.append(1))
        F.cross_entropy(model(ids, attention_mask=mask).logits.flatten(0, 1), ids.flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block really was recomputed in backward
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-6, msg=name)


# ----- backbone adapter -----------------------------------------------------------------------------------


def test_adapter_is_detected_and_resolves_block_targets():
    model = make_model()
    adapter = detect_backbone(model)
    assert isinstance(adapter, LLaDABackbone)
    assert adapter.mask_token_id(model) == MASK_ID
    assert adapter.output_head(model) is model.model.transformer.ff_out
    block = model.model.transformer.blocks[3]
    found = resolve_targets(adapter, model, adapter.ffn_targets, [3])
    assert found == {
        "model.transformer.blocks.3.ff_proj": block.ff_proj,
        "model.transformer.blocks.3.up_proj": block.up_proj,
        "model.transformer.blocks.3.ff_out": block.ff_out,
    }
    assert len(resolve_targets(adapter, model, adapter.attention_targets, [0, 2])) == 8
    with pytest.raises(ValueError, match="available linear modules.*q_proj"):
        resolve_targets(adapter, model, ("mlp.down_proj",), [0])


def test_model_view_logits_equal_the_model_logits():
    model = make_model(n_kv_heads=2)
    ids = random_ids(2, 9)
    view = ModelView(LLaDABackbone(), model, MASK_ID)
    assert torch.equal(view.logits(ids), model(ids).logits)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    torch.testing.assert_close(view.logits(ids, mask), model(ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_adapter_explains_a_tied_remote_model_without_head_module():
    model = make_model()
    del model.model.transformer["ff_out"]  # what the release's remote code builds under weight_tying
    with pytest.raises(TypeError, match="weight_tying"):
        LLaDABackbone().output_head(model)
