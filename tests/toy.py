"""A tiny bidirectional masked diffusion LM written with plain torch modules, and its adapter.

Small enough for float64 finite differences and simple enough for ``higher`` to monkeypatch; it has
the LLaDA block layout (ff_proj / up_proj / ff_out) so the same target names apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bilevel_dlm import Backbone, register_backbone

VOCAB = 24
MASK_ID = 23


class ToyConfig:
    model_type = "toy_dlm"
    mask_token_id = MASK_ID
    pad_token_id = 0


class ToyBlock(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        if key_padding is not None:
            scores = scores.masked_fill(~key_padding[:, None, :], float("-inf"))
        x = x + self.attn_out(scores.softmax(-1) @ self.v_proj(x))
        return x + self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


class ToyDLM(nn.Module):
    def __init__(self, d: int = 16, f: int = 32, n_blocks: int = 3, vocab: int = VOCAB, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = ToyConfig()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d, f) for _ in range(n_blocks))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        key_padding = None if attention_mask is None else attention_mask.bool()
        for block in self.blocks:
            x = block(x, key_padding)
        return self.lm_head(torch.tanh(x))


@register_backbone
class ToyBackbone(Backbone):
    name = "toy"
    blocks_path = "blocks"
    model_types = ("toy_dlm",)
    ffn_targets = ("ff_proj", "up_proj", "ff_out")
    attention_targets = ("q_proj", "k_proj", "v_proj", "attn_out")


def toy_batch(batch: int = 3, length: int = 10, prompt: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens (never the mask id), the first ``prompt`` positions as prompt (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, MASK_ID, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
