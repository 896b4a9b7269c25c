"""Backbone adapter for MDLM: loglinear sigma(t) conditioning and the SUBS output parameterisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel_dlm.backbone import Backbone, register_backbone

__all__ = ["MDLMBackbone", "loglinear_sigma", "subs_log_probs"]

NOISE_EPS = 1e-3  # loglinear schedule: the mask probability at t = 1 is 1 - eps


def loglinear_sigma(t: torch.Tensor, eps: float = NOISE_EPS) -> torch.Tensor:
    """Total noise sigma(t) = -log(1 - (1 - eps) t) of MDLM's loglinear schedule."""
    return -torch.log1p(-(1 - eps) * t)


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS parameterisation: log-probabilities [..., V] from raw logits [..., V] and inputs [...].

    The mask token is never predicted (-inf), and an unmasked input token is carried over: its
    distribution is one-hot on itself (log-prob 0 there, -inf elsewhere).
    """
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    log_probs = logits.masked_fill(vocab == mask_token_id, float("-inf")).log_softmax(dim=-1)
    carried = torch.full_like(log_probs, float("-inf")).masked_fill(vocab == input_ids[..., None], 0.0)
    return torch.where((input_ids == mask_token_id)[..., None], log_probs, carried)


@register_backbone
class MDLMBackbone(Backbone):
    """kuleshov-group MDLM (DiT with adaLN time conditioning); native class in ``.modeling``."""

    name = "mdlm"
    blocks_path = "backbone.blocks"
    model_types = ("mdlm",)
    class_names = ("MDLM",)
    ffn_targets = ("mlp.0", "mlp.2")
    attention_targets = ("attn_qkv", "attn_out")
    default_sampler = "mdlm"

    def output_head(self, model: nn.Module) -> nn.Module:
        return model.backbone.output_layer.linear

    def call(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask_ratio: torch.Tensor | None = None,
    ) -> Any:
        """Forward with ``timesteps = sigma(t)``, taking t = the masked fraction (0 when unknown). The
        release's ``forward(input_ids, timesteps)`` takes no attention mask (see ``attention_kwargs``)."""
        if mask_ratio is None:
            t = torch.zeros(input_ids.shape[0], device=input_ids.device)
        else:
            t = mask_ratio.to(device=input_ids.device, dtype=torch.float32)
        return model(input_ids=input_ids, timesteps=loglinear_sigma(t), **self.attention_kwargs(model, attention_mask))

    def ignores_time(self, model: nn.Module) -> bool:
        """The release zeroes sigma unless ``time_conditioning`` is set."""
        return not getattr(model.config, "time_conditioning", False)

    def finalize_logits(self, logits: torch.Tensor, input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        return subs_log_probs(logits, input_ids, mask_token_id)
