"""Native transformers-5 implementation of MDLM's DiT backbone, state-dict compatible with the OWT release.

The release hard-imports flash-attn and einops; this version uses plain PyTorch SDPA (bidirectional,
optional key padding) and the same parameter names and shapes, so a released ``model.safetensors``
loads as is. The model returns raw logits; MDLM's SUBS parameterisation lives in the adapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from .configuration import MDLMConfig, tiny_config

__all__ = ["MDLM", "MDLMPreTrainedModel", "build_tiny_model", "reinit_zero_layers_for_tests", "rotary_inv_freq"]

TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal sigma embedding fed to sigma_map


def rotary_inv_freq(head_size: int, base: float = 10_000.0) -> torch.Tensor:
    """Rotary inverse frequencies [head_size / 2], float32."""
    return 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))


def timestep_embedding(sigma: torch.Tensor, size: int = TIMESTEP_FREQUENCIES, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, size] of the noise level: cosines first, then sines (DiT convention)."""
    half = size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: per-sample affine transform of normalised activations."""
    return x * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class ZeroInitLinear(nn.Linear):
    """A linear the release starts at zero (adaLN modulations, output projection): a fresh DiT is the identity
    on its residual stream and outputs zero logits."""


class MDLMLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalised in float32 like the release."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), (x.shape[-1],)) * self.weight.float()
        return normed.to(x.dtype)


class MDLMEmbedding(nn.Module):
    """Token embedding stored as a raw parameter ``embedding`` [V, D] (the release's layout)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[input_ids]


class MDLMTimestepEmbedder(nn.Module):
    """sigma [B] -> sinusoidal(256) -> Linear -> SiLU -> Linear -> [B, cond]."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(sigma).to(self.mlp[0].weight.dtype))


class MDLMRotaryEmbedding(nn.Module):
    """Rotary tables; ``inv_freq`` is a persistent buffer because the release's state dict holds it."""

    def __init__(self, head_size: int) -> None:
        super().__init__()
        self.head_size = head_size
        self.register_buffer("inv_freq", rotary_inv_freq(head_size))

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [L, head_size] in float32, each frequency repeated for both halves (rotate-half style)."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, L, H, hd] by position."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class MDLMBlock(GradientCheckpointingLayer):
    """DiT block: adaLN-modulated bidirectional attention (fused qkv, rotary) and GELU MLP, gated residuals."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.norm1 = MDLMLayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = MDLMLayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = ZeroInitLinear(config.cond_dim, 6 * dim)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        c: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        attended = self._attention(modulate(self.norm1(x), shift_msa, scale_msa), rotary, attention_mask)
        x = x + gate_msa * F.dropout(attended, self.dropout, self.training)
        hidden = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(hidden, self.dropout, self.training)

    def _attention(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.attn_qkv(x).view(batch, length, 3, self.n_heads, dim // self.n_heads).unbind(dim=2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        key_mask = None if attention_mask is None else (  # a 4D bool mask [B, 1, L, L] as it is
            attention_mask if attention_mask.dim() == 4 else attention_mask.bool()[:, None, None, :])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
        return self.attn_out(out.transpose(1, 2).reshape(batch, length, dim))


class MDLMFinalLayer(nn.Module):
    """adaLN-modulated final norm followed by the vocabulary projection ``linear``."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.norm_final = MDLMLayerNorm(config.hidden_dim)
        self.linear = ZeroInitLinear(config.hidden_dim, config.vocab_size)
        self.adaLN_modulation = ZeroInitLinear(config.cond_dim, 2 * config.hidden_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MDLMDiT(nn.Module):
    """The release's ``backbone``: embedding, sigma conditioning, rotary, DiT blocks, output layer."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.time_conditioning = config.time_conditioning
        self.vocab_embed = MDLMEmbedding(config.vocab_size, config.hidden_dim)
        self.sigma_map = MDLMTimestepEmbedder(config.cond_dim)
        self.rotary_emb = MDLMRotaryEmbedding(config.head_size)
        self.blocks = nn.ModuleList(MDLMBlock(config) for _ in range(config.n_blocks))
        self.output_layer = MDLMFinalLayer(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        sigma: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Raw logits [B, L, V] and, on request, the embeddings and each block's output."""
        if not self.time_conditioning:
            sigma = torch.zeros_like(sigma)
        x = self.vocab_embed(input_ids)
        c = F.silu(self.sigma_map(sigma))
        rotary = self.rotary_emb(input_ids.shape[1], input_ids.device)
        hidden_states = [x]
        for block in self.blocks:
            x = block(x, rotary, c, attention_mask=attention_mask)
            hidden_states.append(x)
        return self.output_layer(x, c), tuple(hidden_states) if output_hidden_states else None


class MDLMPreTrainedModel(PreTrainedModel):
    config_class = MDLMConfig
    supports_gradient_checkpointing = True
    _no_split_modules = ["MDLMBlock"]
    # Rounded to bf16, the inverse frequencies would shift rotary angles by ~0.5 rad at position 1000.
    _keep_in_fp32_modules_strict = ["rotary_emb"]
    # Recomputed by `_init_weights` when a checkpoint lacks it.
    _keys_to_ignore_on_load_missing = [r"rotary_emb\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Release initialisation: torch defaults, raw embedding kaiming-uniform, adaLN and final linear zero.

        Also (re)computes the rotary buffer when a checkpoint lacks it.
        """
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, MDLMEmbedding):
            init.kaiming_uniform_(module.embedding, a=math.sqrt(5))
        elif isinstance(module, MDLMLayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, MDLMRotaryEmbedding):
            init.copy_(module.inv_freq, rotary_inv_freq(module.head_size))


class MDLM(MDLMPreTrainedModel):
    """MDLM masked diffusion LM (class name and ``backbone.*`` parameter paths as in the release)."""

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__(config)
        self.backbone = MDLMDiT(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.backbone.output_layer.linear

    def forward(
        self,
        input_ids: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> MaskedLMOutput:
        """Raw logits for tokens [B, L] at noise level ``timesteps`` (sigma, [B] or scalar).

        ``attention_mask`` [B, L] (1 = keep) masks padded keys. sigma is ignored (zeroed) when
        ``config.time_conditioning`` is False, as in the release. Always returns a ``MaskedLMOutput``
        (the release's config sets ``return_dict: false``, which callers of this class do not expect).
        """
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        sigma = torch.as_tensor(timesteps, device=input_ids.device).float().reshape(-1).expand(input_ids.shape[0])
        logits, hidden_states = self.backbone(input_ids, sigma, attention_mask, output_hidden_states)
        return MaskedLMOutput(logits=logits, hidden_states=hidden_states)


@torch.no_grad()
def reinit_zero_layers_for_tests(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Give the zero-initialised linears random N(0, std) values; a fresh MDLM otherwise outputs all zeros."""
    for linear in (m for m in model.modules() if isinstance(m, ZeroInitLinear)):
        nn.init.normal_(linear.weight, std=std, generator=generator)
        nn.init.normal_(linear.bias, std=std, generator=generator)


def build_tiny_model(seed: int = 0, std: float = 0.02, **overrides: object) -> MDLM:
    """A tiny MDLM in eval mode with every layer random (see :func:`tiny_config` for the sizes)."""
    torch.manual_seed(seed)
    model = MDLM(tiny_config(**overrides))
    reinit_zero_layers_for_tests(model, std=std, generator=torch.Generator().manual_seed(seed))
    return model.eval()
