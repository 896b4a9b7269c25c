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

Under block-causal attention no position sees a later block, so every forward runs the canvas up to the
end of the current block only (as the release does). With ``cache="prefix"`` the first block's first step
stores every layer's keys and values; a later block's first step computes the previous block (revealed
since it was stored) and the current one, its other steps the current block alone (its prompt tokens
included: they see the block's new tokens). The stored entries are those a full forward would compute,
so the tokens equal ``cache="none"`` (up to floating-point summation order). When the memory is re-adapted
after every block (``generate(adapt="blocks")``) each block's first step is a full forward again: keys and
values computed under the old memory are stale.
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
        # Where a block's first step starts computing: the previous block's first column (revealed since it was
        # stored); None = a full forward (the first block, or a memory re-adapted after every block).
        previous_start = None
        for offset in range(blocks):
            in_block = block_ids == (first_block + offset)[:, None]
            block_start = int(in_block.any(0).nonzero()[0, 0])  # prompt tokens of the block: recomputed too
            current = new & in_block
            columns = current.any(0).nonzero()[:, 0]  # the span of the rows' current blocks: logits there only
            span = slice(int(columns[0]), int(columns[-1]) + 1)
            current = current[:, span]
            seen, seen_attention = canvas[:, : span.stop], attention[:, :, : span.stop, : span.stop]
            counts = even_split((current & (canvas[:, span] == mask_id)).sum(1), per_block)
            for step in range(per_block):
                masked = current & (canvas[:, span] == mask_id)
                if not bool(masked.any()):
                    break
                start = block_start if step else previous_start
                run.cache_step(cache, start is None, start or 0, span.stop)
                logits = run.logits(seen, attention_mask=seen_attention, columns=span, kv_cache=cache)
                proposal, confidence = self._propose(run, logits)
                reveal = reveal_confident(confidence, masked, counts[:, step], self.threshold)
                canvas[:, span] = torch.where(reveal, proposal, canvas[:, span])
                run.record(canvas)
            if offset < blocks - 1:
                run.block_done(canvas, span.stop)
            previous_start = None if run.model_changes_at_block_end else block_start
        return canvas

    def _propose(self, run: GenerationRun, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, L] (argmax, or Gumbel-max in float64 at ``temperature``) and their probability."""
        if self.temperature > 0:
            proposal = (logits.double() / self.temperature + run.gumbel(logits.shape, logits.device)).argmax(-1)
        else:
            proposal = logits.argmax(-1)
        probabilities = logits.float().softmax(-1) if self.temperature == 0 else (logits.float() / self.temperature).softmax(-1)
        return proposal, probabilities.gather(-1, proposal[..., None]).squeeze(-1)
