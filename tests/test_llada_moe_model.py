"""Native LLaDA-MoE: checkpoint layout, routing math, attention semantics and the backbone adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForMaskedLM

from bilevel_dlm.backbone import detect_backbone, resolve_targets
from bilevel_dlm.forward import ModelView
from bilevel_dlm.integrations.llada_moe import LLaDAMoEBackbone, LLaDAMoEModelLM, tiny_config
from bilevel_dlm.integrations.llada_moe.modeling import rotary_cos_sin


def _model(seed: int = 0, **overrides) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    model = LLaDAMoEModelLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # random norm weights so that a wrong normalisation axis shows up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 127, (batch, length), generator=torch.Generator().manual_seed(seed))


def _expected_shapes(layers: int, experts: int, shared: int | None) -> dict[str, tuple[int, ...]]:
    d, f, heads, kv_heads, vocab = 64, 32, 4, 2, 128
    head = d // heads
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * head, d),
            p + "self_attn.k_proj.weight": (kv_heads * head, d),
            p + "self_attn.v_proj.weight": (kv_heads * head, d),
            p + "self_attn.o_proj.weight": (d, heads * head),
            p + "self_attn.q_norm.weight": (head,),
            p + "self_attn.k_norm.weight": (head,),
            p + "mlp.gate.weight": (experts, d),
        }
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            shapes |= {q + "gate_proj.weight": (f, d), q + "up_proj.weight": (f, d), q + "down_proj.weight": (d, f)}
        if shared:
            q = p + "shared_expert."
            shapes |= {
                q + "gate_proj.weight": (shared, d),
                q + "up_proj.weight": (shared, d),
                q + "down_proj.weight": (d, shared),
            }
    return shapes


@pytest.mark.parametrize("shared", [False, True])
def test_state_dict_is_the_released_layout(shared: bool) -> None:
    model = _model(shared_expert=shared)
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == _expected_shapes(layers=2, experts=4, shared=48 if shared else None)


def test_save_and_from_pretrained_round_trip(tmp_path) -> None:
    model, tokens = _model(shared_expert=True), _tokens()
    model.save_pretrained(tmp_path)
    for loaded in (LLaDAMoEModelLM.from_pretrained(tmp_path), AutoModelForMaskedLM.from_pretrained(tmp_path)):
        assert type(loaded) is LLaDAMoEModelLM
        torch.testing.assert_close(loaded.eval()(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_loads_a_release_style_folder(tmp_path) -> None:
    """The release's config.json says model_type "llada" and names the expert width differently."""
    model, tokens = _model(rope_theta=10000.0), _tokens()
    release_config = {
        "architectures": ["LLaDAMoEModelLM"],
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig"},
        "model_type": "llada",
        "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "expert_intermediate_size": 32, "dense_intermediate_size": 256,
        "shared_expert_intermediate_size": None, "moe_layer_freq": [1, 1], "num_experts": 4,
        "num_experts_per_tok": 2, "norm_topk_prob": False, "qk_layernorm": True, "rope_theta": 10000,
        "rope_scaling": None, "partial_rotary_factor": 1, "rms_norm_eps": 1e-5, "use_cache": False,
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
        "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "mask_token_id": 127, "eos_token_id": 1,
        "pad_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(release_config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded, info = LLaDAMoEModelLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.model_type == "lladamoe" and loaded.config.intermediate_size == 32
    assert isinstance(detect_backbone(loaded), LLaDAMoEBackbone)
    torch.testing.assert_close(loaded.eval()(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_attention_is_bidirectional() -> None:
    model, tokens = _model(), _tokens(batch=1)
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 127
    first = model(tokens).logits[0, 0]
    assert (model(changed).logits[0, 0] - first).abs().max() > 1e-4


def test_padding_is_respected() -> None:
    model = _model()
    lengths, width = [9, 5], 9
    rows = [_tokens(batch=1, length=n, seed=n) for n in lengths]
    padded = torch.ones(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        padded[i, :n], mask[i, :n] = row[0], 1
    batched = model(padded, attention_mask=mask).logits
    for i, (row, n) in enumerate(zip(rows, lengths)):
        torch.testing.assert_close(batched[i, :n], model(row).logits[0], rtol=1e-5, atol=1e-5)


def _naive_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: per-head RMSNorm, rotation of channel pairs (i, i + D/2), explicit GQA."""
    b, n, _ = x.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def split(t, h):
        return t.view(b, n, h, dim)

    def rms(t, weight):
        return weight * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)

    def rope(t):
        half = dim // 2
        pos = torch.arange(n, dtype=torch.float32)[:, None, None]
        theta = pos * 10000.0 ** (-torch.arange(half, dtype=torch.float32) * 2 / dim)
        lo, hi = t[..., :half], t[..., half:]
        return torch.cat((lo * theta.cos() - hi * theta.sin(), hi * theta.cos() + lo * theta.sin()), -1)

    q = rope(rms(split(attn.q_proj(x), heads), attn.q_norm.weight))
    k = rope(rms(split(attn.k_proj(x), kv_heads), attn.k_norm.weight))
    v = split(attn.v_proj(x), kv_heads)
    out = torch.empty(b, n, heads, dim)
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, g]) / math.sqrt(dim)
        out[:, :, h] = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, g])
    return attn.o_proj(out.reshape(b, n, heads * dim))


def test_attention_matches_naive_reference() -> None:
    model = _model(rope_theta=10000.0)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    rotary = rotary_cos_sin(model.config, torch.arange(7)[None])
    torch.testing.assert_close(attn(x, rotary, None), _naive_attention(attn, x), rtol=1e-5, atol=1e-5)


def _moe_io(model: LLaDAMoEModelLM, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}
    handle = model.model.layers[0].mlp.register_forward_hook(
        lambda module, args, output: captured.update(x=args[0], y=output)
    )
    model(tokens)
    handle.remove()
    return captured["x"], captured["y"]


@pytest.mark.parametrize("renormalise", [False, True])
def test_moe_block_equals_dense_top_k_mixture(renormalise: bool) -> None:
    model = _model(num_hidden_layers=1, norm_topk_prob=renormalise)
    block = model.model.layers[0].mlp
    x, y = _moe_io(model, _tokens())
    tokens = x.reshape(-1, 64)
    probs = torch.softmax(tokens @ block.gate.weight.T, dim=-1)
    kth = probs.topk(2, dim=-1).values[:, -1:]
    weights = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.stack([expert(tokens) for expert in block.experts], dim=1)  # every expert, every token
    reference = (weights[..., None] * dense).sum(1)
    torch.testing.assert_close(y.reshape(-1, 64), reference, rtol=1e-5, atol=1e-5)


def test_each_expert_sees_exactly_its_routed_tokens() -> None:
    model = _model(num_hidden_layers=1)
    block = model.model.layers[0].mlp
    seen: dict[int, torch.Tensor] = {}
    handles = [
        expert.register_forward_hook(lambda module, args, output, e=e: seen.__setitem__(e, args[0]))
        for e, expert in enumerate(block.experts)
    ]
    x, _ = _moe_io(model, _tokens(batch=3))
    for handle in handles:
        handle.remove()
    tokens = x.reshape(-1, 64)
    chosen = torch.softmax(tokens @ block.gate.weight.T, dim=-1).topk(2, dim=-1).indices
    for e in range(4):
        rows = (chosen == e).any(-1).nonzero().flatten()
        if len(rows) == 0:
            assert e not in seen
            continue
        assert seen[e].dim() == 2 and seen[e].shape[0] == len(rows)
        torch.testing.assert_close(seen[e], tokens[rows], rtol=0, atol=0)
    assert sum(len(t) for t in seen.values()) == tokens.shape[0] * 2


def test_expert_gradient_comes_only_from_routed_tokens() -> None:
    model = _model(num_hidden_layers=1)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(5))
    block(x)[0, 2].sum().backward()
    chosen = set(block.route(x[0, 2:3])[1].flatten().tolist())
    for e, expert in enumerate(block.experts):
        got_grad = expert.up_proj.weight.grad is not None and expert.up_proj.weight.grad.abs().sum() > 0
        assert got_grad == (e in chosen), (e, chosen)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    tokens = _tokens()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model(shared_expert=True).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        logits = model(tokens, attention_mask=torch.ones_like(tokens)).logits
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "model.layers.0.mlp.gate.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hidden_states_follow_the_release_layout() -> None:
    model, tokens = _model(num_hidden_layers=3), _tokens()
    out = model(tokens, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(tokens))
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


@pytest.mark.parametrize("shared", [False, True])
def test_adapter_targets(shared: bool) -> None:
    model = _model(shared_expert=shared)
    adapter = detect_backbone(model)
    assert isinstance(adapter, LLaDAMoEBackbone) and adapter.mask_token_id(model) == 127
    last = len(adapter.blocks(model)) - 1
    ffn = resolve_targets(adapter, model, adapter.ffn_target_patterns(model), [last])
    assert len(ffn) == 4 * 3 + (3 if shared else 0)
    assert all(name.startswith(f"model.layers.{last}.") for name in ffn)
    mixing = resolve_targets(adapter, model, adapter.token_mixing_targets, [last], strict=False)
    assert set(mixing) == {n for n in ffn if ".mlp.experts." in n}
    attention = resolve_targets(adapter, model, adapter.attention_target_patterns(model), [last])
    assert len(attention) == 4


def test_model_view_logits_match_the_model() -> None:
    model, tokens = _model(), _tokens()
    mask = torch.ones_like(tokens)
    mask[1, -3:] = 0
    view = ModelView(detect_backbone(model), model, mask_token_id=127)
    torch.testing.assert_close(view.logits(tokens, mask), model(tokens, attention_mask=mask).logits)
