"""Block-diffusion decoding (LLaDA2.x's ``generate``): blocks left to right, confidence-threshold reveals.

Every row's real tokens (prompt, then the new tokens) are cut into blocks of ``block_length`` counted
from the row's first real token, as the release cuts its unpadded canvas. Attention is block-causal:
a query in block i sees the keys of blocks <= i (never padding). The blocks holding new tokens are
filled one after the other; within a block each of ``steps`` steps predicts the block's masked
positions, proposes a token for each (argmax, or sampled at ``temperature``) with its probability as
confidence, and reveals every masked position whose confidence exceeds ``threshold`` if there are at
least as many as the step's share of the block (the block's mask count split evenly over the steps,
remainder first), otherwise the step's share with the highest confidence. Revealed tokens stay.

The mask goes to the model as a 4D bool ``[B, 1, L, L]`` attention mask (True = may attend), so the
backbone adapter must accept one (the LLaDA2 adapter does). Rows are decoded exactly as alone.

With ``cache="prefix"`` a block's first step runs the whole canvas and stores every layer's keys and
values; its other steps compute the block alone (its prompt tokens included: they see the block's new
tokens). Under block-causal attention no earlier block sees the current one, so the stored entries are
those a full forward would compute: the tokens equal ``cache="none"`` (up to floating-point summation
order).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from .base import GenerationRun, Sampler, even_split, reveal_confident

__all__ = ["BlockDiffusionSampler", "block_causal_mask"]


def block_causal_mask(block_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: query i may attend key j iff j is real and block(j) <= block(i); a padded
    query sees itself only (no empty softmax row)."""
    allowed = (block_ids[:, None, :] <= block_ids[:, :, None]) & real[:, None, :]
    allowed = allowed | torch.eye(block_ids.shape[1], dtype=torch.bool, device=block_ids.device)[None]
    return allowed[:, None]


class BlockDiffusionSampler(Sampler):
    """``steps`` is the number of denoising steps per block (None: one per token of the block); a step
    with nothing left to reveal is skipped."""

    decodes_in_blocks: ClassVar[bool] = True

    block_length: int = Field(32, gt=0, description="tokens per block (LLaDA2 releases: 32)")
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="reveal every masked token above this confidence")
    temperature: float = Field(0.0, ge=0.0, description="token sampling temperature; 0 = argmax")
    cache: Literal["none", "prefix"] = Field("none", description="reuse the committed blocks' keys and values "
                                             "between the steps of a block (exact under block-causal attention)")

    def _generate(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, steps: int) -> torch.Tensor:
        mask_id = run.view.mask_token_id
        real = torch.ones_like(canvas, dtype=torch.bool) if run.attention_mask is None else run.attention_mask.bool()
        position = real.long().cumsum(1) - 1
        block_ids = torch.where(real, torch.div(position, self.block_length, rounding_mode="floor"), -1)
        attention = block_causal_mask(block_ids, real)
        new = torch.zeros_like(real)
        new[:, prompt_length:] = True
        first_block = block_ids[:, prompt_length]  # the block of each row's first new token
        per_block = self.steps or self.block_length
        blocks = int((block_ids[:, -1] - first_block).max()) + 1
        cache = run.open_cache(type(self).__name__, self.cache)
        for offset in range(blocks):
            in_block = block_ids == (first_block + offset)[:, None]
            block_start = int(in_block.any(0).nonzero()[0, 0])  # prompt tokens of the block: recomputed too
            current = new & in_block
            columns = current.any(0).nonzero()[:, 0]  # the span of the rows' current blocks: logits there only
            span = slice(int(columns[0]), int(columns[-1]) + 1)
            current = current[:, span]
            counts = even_split((current & (canvas[:, span] == mask_id)).sum(1), per_block)
            for step in range(per_block):
                masked = current & (canvas[:, span] == mask_id)
                if not bool(masked.any()):
                    break
                run.cache_step(cache, step == 0, block_start, span.stop)
                logits = run.logits(canvas, attention_mask=attention, columns=span, kv_cache=cache)
                proposal, confidence = self._propose(run, logits)
                reveal = reveal_confident(confidence, masked, counts[:, step], self.threshold)
                canvas[:, span] = torch.where(reveal, proposal, canvas[:, span])
                run.record(canvas)
            if offset < blocks - 1:
                run.block_done(canvas, span.stop)
        return canvas

    def _propose(self, run: GenerationRun, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, L] (argmax, or Gumbel-max in float64 at ``temperature``) and their probability."""
        if self.temperature > 0:
            proposal = (logits.double() / self.temperature + run.gumbel(logits.shape, logits.device)).argmax(-1)
        else:
            proposal = logits.argmax(-1)
        probabilities = logits.float().softmax(-1) if self.temperature == 0 else (logits.float() / self.temperature).softmax(-1)
        return proposal, probabilities.gather(-1, proposal[..., None]).squeeze(-1)
