"""Native transformers-5 implementation of LLaDA-MoE-7B-A1B (OLMoE-derived masked diffusion LM).

Module paths equal the release's state dict, so ``LLaDAMoEModelLM.from_pretrained(<release folder>)``
loads its safetensors as is (the release's config.json says ``model_type: "llada"``; load it with this
class, not with AutoModel). Architecture, as in the release's modeling code:

- pre-norm blocks: ``h = x + attn(rms(x))``; ``out = h + moe(rms(h)) [+ shared_expert(rms(h))]``;
- attention is bidirectional (no causal mask); a 2D ``attention_mask`` only hides padded keys;
  ``q_norm`` / ``k_norm`` are RMSNorms over one head (weight ``[head_dim]``), applied to the projections
  before RoPE. transformers' OLMoE normalises over the full projection width instead, which is why its
  attention is not reused here;
- router: ``mlp.gate`` linear -> softmax (float32) -> top-k, weights not renormalised unless
  ``norm_topk_prob``; every expert is a separate SwiGLU module called only on its routed tokens, so
  hooks on an expert's linears see exactly those tokens (``[n_routed, hidden]``), and each call declares
  the flat token index of its rows (``bilevel_dlm.routing``) for per-sample fast weights.

Deliberate differences to the release: no KV cache (the release refuses one too); RoPE frequencies are
computed in each forward instead of a buffer, because transformers 5 leaves non-persistent buffers
uninitialised when it loads on the meta device; ``embed_tokens`` has no ``padding_idx`` (the release
inherits OLMoE's, which freezes the EOS row that LLaDA SFT trains on as padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm as LLaDAMoERMSNorm

from bilevel_dlm.kv_cache import KVCache
from bilevel_dlm.routing import routed_tokens

from .configuration import LLaDAMoEConfig

__all__ = ["LLaDAMoEModelLM", "LLaDAMoEModel", "LLaDAMoEPreTrainedModel", "LLaDAMoESparseMoeBlock"]


def rotary_cos_sin(config: LLaDAMoEConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [B, L, rotary_dim] in float32 for the (first ``partial_rotary_factor`` of the) head."""
    rotary_dim = int(config.head_dim * config.partial_rotary_factor)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / rotary_dim
    inv_freq = 1.0 / (float(config.rope_theta) ** exponents)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of x [B, H, L, D] (half-split convention)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class LLaDAMoEAttention(nn.Module):
    """Bidirectional multi-head attention with GQA, per-head q/k RMSNorm and RoPE (SDPA kernel)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_layernorm:
            self.q_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.config.qk_layernorm:
            query, key = self.q_norm(query), self.k_norm(key)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            query, key, value = query.clamp(-clip, clip), key.clamp(-clip, clip), value.clamp(-clip, clip)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if kv_cache is not None:
            key, value = kv_cache.attend(layer, key, value)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=key_mask,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class LLaDAMoEMLP(nn.Module):
    """SwiGLU feed-forward: one routed expert or the shared expert."""

    def __init__(self, config: LLaDAMoEConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDAMoESparseMoeBlock(nn.Module):
    """Router (``gate``) plus a list of experts; each expert runs on its routed tokens only."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            LLaDAMoEMLP(config, config.intermediate_size) for _ in range(config.num_experts)
        )

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert weights (in the tokens' dtype) and indices, both [N, k], for tokens [N, d]."""
        probs = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(tokens.dtype), experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, experts = self.route(tokens)
        # Group the (token, slot) pairs by expert: one host sync for the group sizes, not one per expert.
        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        # scatter_add, not bincount: bincount's output size costs a second sync on a GPU.
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=tokens.device).scatter_add_(
            0, flat_experts, torch.ones_like(flat_experts)).tolist()
        token_index = (order // self.top_k).split(counts)
        slot_weight = weights.reshape(-1)[order].split(counts)
        out = torch.zeros_like(tokens)
        length = hidden_states.shape[1] if hidden_states.dim() == 3 else tokens.shape[0]
        for expert, rows, weight, count in zip(self.experts, token_index, slot_weight, counts):
            if count:
                with routed_tokens(rows, length):  # per-sample fast weights find each row's sample
                    out.index_add_(0, rows, expert(tokens[rows]) * weight[:, None])
        return out.view_as(hidden_states)


class LLaDAMoEDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm transformer block: attention, then routed experts (+ the shared expert if any)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.input_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LLaDAMoEAttention(config)
        self.post_attention_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LLaDAMoESparseMoeBlock(config)
        self.shared_expert = (
            LLaDAMoEMLP(config, config.shared_expert_intermediate_size) if config.has_shared_expert else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), rotary, key_mask,
                                                       kv_cache, layer)
        normed = self.post_attention_layernorm(hidden_states)
        ffn = self.mlp(normed)
        if self.shared_expert is not None:
            ffn = ffn + self.shared_expert(normed)
        return hidden_states + ffn


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    _supports_sdpa = True


def _check_supported(config: LLaDAMoEConfig) -> None:
    """Refuse release options this implementation does not run, instead of computing something else."""
    if config.moe_layer_freq and not all(config.moe_layer_freq):
        raise NotImplementedError(
            f"LLaDA-MoE: dense (non-MoE) layers are not supported (moe_layer_freq={config.moe_layer_freq}); "
            "the released model is MoE in every layer."
        )
    if config.moe_router_enable_expert_bias:
        raise NotImplementedError("LLaDA-MoE: moe_router_enable_expert_bias=True is not supported (release: false).")


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns final normed hidden states [B, L, d]."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Final hidden states, and (optionally) the n_layers + 1 hidden states of the release's layout:
        the embeddings, each layer's output but the last, then the final normed output. With ``kv_cache``
        only its window's positions are computed (bilevel_dlm.kv_cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDA-MoE: pass exactly one of input_ids or inputs_embeds")
        length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        columns = slice(None) if kv_cache is None else kv_cache.columns(length)
        hidden_states = self.embed_tokens(input_ids[:, columns]) if inputs_embeds is None else inputs_embeds[:, columns]
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden_states.device)[None]
        rotary = rotary_cos_sin(self.config, position_ids[:, columns])
        # 2D mask (1 = keep) -> boolean key-padding mask broadcast over heads and queries; a 4D bool mask
        # [B, 1, L, L] (True = attend, e.g. packed documents kept apart) as it is.
        key_mask = None if attention_mask is None else (
            attention_mask if attention_mask.dim() == 4 else attention_mask[:, None, None, :].bool())
        collected = [] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            if collected is not None:
                collected.append(hidden_states)
            hidden_states = layer(hidden_states, rotary, key_mask, kv_cache, index)
        hidden_states = self.norm(hidden_states)
        if collected is not None:
            collected.append(hidden_states)
        return hidden_states, None if collected is None else tuple(collected)


class LLaDAMoEModelLM(LLaDAMoEPreTrainedModel):
    """LLaDA-MoE with its LM head: logits [B, L, V] aligned with the input (position i predicts token i)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        kv_cache: KVCache | None = None,
    ) -> MoeCausalLMOutputWithPast:
        """Logits of a bidirectional pass; ``attention_mask`` [B, L] (1 = keep) hides padded keys only.
        ``kv_cache`` (:class:`bilevel_dlm.kv_cache.KVCache`): keys and values kept between denoising
        steps; the logits then cover the cache's window only."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden_states, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            kv_cache=kv_cache,
        )
        return MoeCausalLMOutputWithPast(logits=self.lm_head(hidden_states), hidden_states=all_hidden)


def _register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForMaskedLM resolve ``model_type: "lladamoe"``."""
    for register in (
        lambda: AutoConfig.register(LLaDAMoEConfig.model_type, LLaDAMoEConfig),
        lambda: AutoModel.register(LLaDAMoEConfig, LLaDAMoEModelLM),
        lambda: AutoModelForMaskedLM.register(LLaDAMoEConfig, LLaDAMoEModelLM),
    ):
        try:
            register()
        except ValueError:  # already registered (re-import, or another package claimed the name)
            pass


_register_auto_classes()
