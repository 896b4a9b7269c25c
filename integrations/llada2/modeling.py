"""Native transformers-5 implementation of LLaDA2.0 / LLaDA2.1 (MoE block-diffusion LMs).

Module paths equal the release's state dict, so ``LLaDA2MoeModelLM.from_pretrained(<release folder>)``
loads its safetensors as is. Architecture, as in the release's modeling code:

- pre-norm blocks: ``h = x + attention(rms(x))``; ``out = h + mlp(rms(h))``; the first
  ``first_k_dense_replace`` layers have a dense SwiGLU MLP, the others the sparse MoE block;
- attention: one fused ``query_key_value`` linear whose output is viewed as ``[heads + 2 kv_heads,
  head_dim]`` per token (queries, then keys, then values), per-head RMSNorm on queries and keys
  (``query_layernorm`` / ``key_layernorm``) before RoPE, RoPE on the first ``rotary_dim`` channels of
  each head only (rotate-half within that slice), scale ``head_dim ** -0.5``, output ``dense``;
- router (``mlp.gate``): float32 logits, sigmoid scores; the experts are chosen on ``score +
  expert_bias`` (a persistent buffer), restricted to the ``topk_group`` groups with the largest sum of
  their two best scores; the weights are the unbiased scores of the chosen experts, renormalised and
  multiplied by ``routed_scaling_factor``; ``shared_experts`` run on every token;
- attention is bidirectional; ``attention_mask`` may be a 4D additive ``[B, 1, L, L]`` mask (0 / -inf,
  the release's format; the block-causal mask of block-diffusion decoding), a 4D bool mask (True =
  may attend), or a 2D ``[B, L]`` key-padding mask (1 = keep).

Deliberate differences to the release: the routed experts run with autograd in eval mode too (the
release's eval path is ``torch.no_grad``), so memory can adapt in either mode; a 2D mask hides padded
keys (the release would turn it into a causal mask); ``word_embeddings`` has no ``padding_idx`` (the
release's freezes the pad row, which is the EOS that SFT supervises); the KV cache is
:class:`bilevel_dlm.kv_cache.KVCache` (a window of the canvas), not transformers' ``Cache``; RoPE tables are
computed in each forward (transformers 5 leaves non-persistent buffers uninitialised on meta-device
loading). Every expert call declares its routed tokens (``bilevel_dlm.routing``) for per-sample memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from bilevel_dlm.kv_cache import KVCache
from bilevel_dlm.routing import routed_tokens

from .configuration import LLaDA2MoeConfig

__all__ = ["LLaDA2MoeModelLM", "LLaDA2MoeModel", "LLaDA2MoePreTrainedModel", "LLaDA2MoeSparseMoeBlock",
           "LLaDA2MoeGate", "additive_attention_mask"]


class LLaDA2MoeRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, then scaled (the release's order)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(config: LLaDA2MoeConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [B, L, rotary_dim] in float32 (frequencies repeated for both halves of the slice)."""
    exponents = torch.arange(0, config.rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / config.rotary_dim
    inv_freq = 1.0 / (float(config.rope_theta) ** exponents)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of x [B, H, L, D] (rotate-half within that slice)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def additive_attention_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask as a 4D additive float mask [B, 1, L, L] (0 = attend, -inf = hidden), or None.

    2D key padding (1 = keep) hides padded keys from every query; a padded query still sees itself,
    so no softmax row is empty. A 4D bool mask is True where attending is allowed; a 4D float mask
    is taken as additive.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        keep = mask.bool()
        length = keep.shape[1]
        mask = keep[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=keep.device)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.dim() != 4:
        raise ValueError(f"LLaDA2: attention_mask must be [B, L] or [B, 1, L, L], got shape {tuple(mask.shape)}")
    return mask.to(dtype)


class LLaDA2MoeAttention(nn.Module):
    """Bidirectional attention with a fused qkv projection, per-head q/k RMSNorm and partial RoPE."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.query_key_value = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch, length, self.heads + 2 * self.kv_heads, self.head_dim)
        query, key, value = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if self.config.use_qk_norm:
            query, key = self.query_layernorm(query), self.key_layernorm(key)
        query, key = apply_partial_rotary(query, *rotary), apply_partial_rotary(key, *rotary)
        if kv_cache is not None:
            key, value = kv_cache.attend(layer, key, value)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=False,
            dropout_p=float(self.config.attention_dropout) if self.training else 0.0,
            enable_gqa=self.heads != self.kv_heads,
        )
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU feed-forward: the dense MLP, one routed expert, or the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Group-limited top-k router with sigmoid scores and a selection-only expert bias."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices [N, k] and their weights [N, k] (float32) for tokens [N, d]."""
        config = self.config
        scores = F.linear(tokens.float(), self.weight.float()).sigmoid()
        biased = scores + self.expert_bias.float()
        grouped = biased.view(tokens.shape[0], config.n_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(
            1, group_scores.topk(config.topk_group, dim=-1).indices, True)
        allowed = keep[:, :, None].expand_as(grouped).reshape(tokens.shape[0], -1)
        experts = biased.masked_fill(~allowed, float("-inf")).topk(config.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if config.num_experts_per_tok > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * float(config.routed_scaling_factor)


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Router, routed experts (each on its routed tokens only) and the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        shared = (config.num_shared_experts or 0) * config.moe_intermediate_size
        self.shared_experts = LLaDA2MoeMLP(config, shared) if shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        experts, weights = self.gate(tokens)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=tokens.device).scatter_add_(
            0, flat, torch.ones_like(flat)).tolist()  # one host sync for the group sizes
        token_index = (order // self.top_k).split(counts)
        slot_weight = weights.reshape(-1)[order].split(counts)
        out = torch.zeros_like(tokens, dtype=torch.float32)
        length = hidden_states.shape[1] if hidden_states.dim() == 3 else tokens.shape[0]
        for expert, rows, weight, count in zip(self.experts, token_index, slot_weight, counts):
            if count:
                with routed_tokens(rows, length):
                    out.index_add_(0, rows, expert(tokens[rows]).float() * weight[:, None])
        out = out.to(tokens.dtype).view_as(hidden_states)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2MoeConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = layer_index < config.first_k_dense_replace
        self.mlp = LLaDA2MoeMLP(config, config.intermediate_size) if dense else LLaDA2MoeSparseMoeBlock(config)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.input_layernorm(hidden_states), rotary, attention_mask,
                                                       kv_cache, layer)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, LLaDA2MoeGate):
            module.weight.normal_(0.0, std)
            module.expert_bias.zero_()
        elif isinstance(module, LLaDA2MoeRMSNorm):
            module.weight.fill_(1.0)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns final normed hidden states [B, L, d]."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool = False, kv_cache: KVCache | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Final hidden states (and optionally every layer's input plus the final output); with ``kv_cache``
        (:class:`bilevel_dlm.kv_cache.KVCache`) of its window only."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDA2: pass exactly one of input_ids or inputs_embeds")
        length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        columns = slice(None) if kv_cache is None else kv_cache.columns(length)
        hidden_states = self.word_embeddings(input_ids[:, columns]) if inputs_embeds is None else inputs_embeds[:, columns]
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden_states.device)[None]
        rotary = rotary_cos_sin(self.config, position_ids[:, columns])
        mask = additive_attention_mask(attention_mask, hidden_states.dtype)
        if mask is not None:
            mask = mask[:, :, columns]  # the window's queries against every key
        collected = [] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            if collected is not None:
                collected.append(hidden_states)
            hidden_states = layer(hidden_states, rotary, mask, kv_cache, index)
        hidden_states = self.norm(hidden_states)
        if collected is not None:
            collected.append(hidden_states)
        return hidden_states, None if collected is None else tuple(collected)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """LLaDA2 with its LM head: logits [B, L, V] aligned with the input (position i predicts token i)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, kv_cache: KVCache | None = None,
                ) -> MoeCausalLMOutputWithPast:
        """Logits [B, L, V] of a bidirectional pass under ``attention_mask``; with ``kv_cache`` (keys and
        values kept between denoising steps) of the cache's window only."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden_states, all_hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                                               output_hidden_states=output_hidden_states, kv_cache=kv_cache)
        return MoeCausalLMOutputWithPast(logits=self.lm_head(hidden_states).float(), hidden_states=all_hidden)


def _register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForMaskedLM resolve ``model_type: "llada2_moe"``."""
    for register in (
        lambda: AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig),
        lambda: AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModelLM),
        lambda: AutoModelForMaskedLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM),
    ):
        try:
            register()
        except ValueError:  # already registered
            pass


_register_auto_classes()
