"""Native transformers-5 implementation of dense LLaDA (LLaDA-8B), checkpoint compatible with the release.

Module paths are the released state-dict names (``model.transformer.wte``, ``model.transformer.blocks.{i}.q_proj``,
..., ``model.transformer.ff_out``), so a released ``model.safetensors`` loads with ``from_pretrained`` as is and
the same adapter serves the object built by the release's remote code. Attention is bidirectional SDPA; RoPE
tables are computed in float32 at every forward, so the state dict holds no rotary buffers that loading could
leave uninitialised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from bilevel_dlm.kv_cache import KVCache

from .configuration import LLaDAConfig

__all__ = ["LLaDABlock", "LLaDAModel", "LLaDAModelLM", "LLaDARMSNorm"]

# Released architecture options this implementation covers: option -> the only supported value.
_SUPPORTED_OPTIONS: dict[str, Any] = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "attention_layer_norm": False,
    "rope": True,
    "alibi": False,
    "clip_qkv": None,
    "input_emb_norm": False,
    "scale_logits": False,
}


def check_supported(config: LLaDAConfig) -> None:
    """Raise when the config asks for an OLMo variant other than the released LLaDA architecture."""
    unsupported = {k: getattr(config, k) for k, v in _SUPPORTED_OPTIONS.items() if getattr(config, k) != v}
    if unsupported:
        raise NotImplementedError(
            f"LLaDAModelLM implements the released LLaDA architecture only; unsupported settings {unsupported} "
            f"(supported values: { {k: _SUPPORTED_OPTIONS[k] for k in unsupported} }). Use the checkpoint's own "
            "modeling code for other OLMo variants."
        )


class LLaDARMSNorm(nn.Module):
    """RMSNorm normalised in float32, then scaled (and shifted when ``bias``) in the input dtype."""

    def __init__(self, size: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * normed if self.bias is None else self.weight * normed + self.bias


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim] in float32 for positions 0..L-1 (rotate-half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, H, L, head_dim] by position, in float32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


class LLaDABlock(GradientCheckpointingLayer):
    """Pre-norm block: h = x + attn_out(attention(attn_norm(x))); out = h + ff_out(silu(ff_proj(n)) * up_proj(n)),
    n = ff_norm(h). All linears sit directly on the block, as in the released checkpoints."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, f, kv_dim = config.d_model, config.mlp_hidden_size, config.n_kv_heads * config.head_dim
        bias, qkv_bias = config.include_bias, config.include_bias or config.include_qkv_bias
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attention_dropout = float(config.attention_dropout)
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps, norm_bias)
        self.ff_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.ff_out = nn.Linear(f, d, bias=bias)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
        kv_cache: KVCache | None = None, layer: int = 0,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        normed = self.attn_norm(x)
        q = self.q_proj(normed).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(normed).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(normed).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.attend(layer, k, v)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=False
        )
        x = x + self.dropout(self.attn_out(attended.transpose(1, 2).reshape(batch, length, -1)))
        normed = self.ff_norm(x)
        return x + self.dropout(self.ff_out(F.silu(self.ff_proj(normed)) * self.up_proj(normed)))


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """2D mask [B, L] (1 = keep) -> bool SDPA mask [B, 1, 1, L]; a 4D bool mask [B, 1, L, L] (True = attend,
    e.g. packed documents kept apart) as it is; None when nothing is masked (fast kernels)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask if attention_mask.dim() == 4 else attention_mask.bool()[:, None, None, :]


class LLaDAModel(nn.Module):
    """Embedding, blocks, final norm and LM head under ``transformer`` (the released module tree)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        d, vocab = config.d_model, config.embedding_size
        norm_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d),
                "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                "ln_f": LLaDARMSNorm(d, config.rms_norm_eps, norm_bias),
                # Under weight tying transformers ties this weight to ``wte`` (the release has no bias there).
                "ff_out": nn.Linear(d, vocab, bias=config.include_bias and not config.weight_tying),
            }
        )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Logits [B, L, V] and, when asked, the input of every block followed by the ln_f output (n_layers + 1).
        With ``kv_cache`` only its window's positions are computed (bilevel_dlm.kv_cache)."""
        columns = slice(None) if kv_cache is None else kv_cache.columns(input_ids.shape[1])
        x = self.embedding_dropout(self.transformer.wte(input_ids[:, columns]))
        cos, sin = rotary_tables(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device)
        cos, sin = cos[columns], sin[columns]
        key_mask = key_padding_mask(attention_mask)
        hidden_states: list[torch.Tensor] = []
        for layer, block in enumerate(self.transformer.blocks):
            if output_hidden_states:
                hidden_states.append(x)
            x = block(x, cos, sin, key_mask, kv_cache, layer)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        return self.transformer.ff_out(x), tuple(hidden_states) if output_hidden_states else None


class LLaDAModelLM(PreTrainedModel):
    """LLaDA masked diffusion LM: ``forward`` returns logits aligned with the input (position i predicts token i).

    ``hidden_states`` follows the release: entry i < n_layers is the input of block i, the last entry is the
    final hidden state after ``ln_f`` (what the LM head sees); the raw output of the last block is not returned.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}

    def __init__(self, config: LLaDAConfig) -> None:
        check_supported(config)
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) linears and embeddings, zero biases, unit norm weights."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, LLaDARMSNorm):
            init.ones_(module.weight)
        if isinstance(module, (nn.Linear, LLaDARMSNorm)) and module.bias is not None:
            init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput | tuple:
        """Bidirectional forward of ``input_ids`` [B, L]; ``attention_mask`` [B, L] (1 = keep) masks padded keys.

        ``kv_cache`` (:class:`bilevel_dlm.kv_cache.KVCache`): keys and values kept between denoising steps;
        the logits then cover the cache's window only. Other transformers keyword arguments (``use_cache``...)
        have no effect.
        """
        if labels is not None:
            raise ValueError(
                "LLaDAModelLM does not compute a loss: the masked diffusion loss needs each sample's masking "
                "ratio. Compute it from the returned logits (bilevel_dlm's objectives do)."
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        logits, hidden_states = self.model(input_ids, attention_mask, bool(output_hidden_states), kv_cache)
        output = MaskedLMOutput(logits=logits, hidden_states=hidden_states)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()
