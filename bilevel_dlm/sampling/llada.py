"""LLaDA's semi-autoregressive low-confidence remasking sampler (the reference ``generate``).

The new tokens are split into blocks filled left to right. Within a block every step predicts the
block's positions, then reveals the most confident masked positions of the block; a revealed token is
never masked again. The block's mask count is split evenly over its steps (remainder to the first
steps). With ``threshold`` (Fast-dLLM's parallel decoding) a step reveals, under ``threshold_rule=
"fast_dllm"`` (the default, Fast-dLLM's ``get_transfer_index``), the most confident masked position and every
one with confidence >= threshold, step after step until the block is full (``steps`` unused); under
``"share"`` every masked position above it if at least the step's share (at least one) are, else the share,
within ``steps``. ``factor`` (Fast-dLLM's factor-based variant) reveals the n most confident, n the largest
with ``(i + 1)(1 - c_i) <= factor`` for the i-th most confident (at least one and, under Fast-dLLM's rule,
all when only the last fails; or at least the share). With ``cache``
(Fast-dLLM's prefix / dual cache) the first step of a block runs the whole canvas and stores every
layer's keys and values; the block's other steps compute only the block and what follows it (``prefix``)
or the block alone (``dual``) and reuse the stored keys and values elsewhere (``bilevel_dlm.kv_cache``:
an approximation, refreshed once per block, or every ``cache_refresh`` steps of a block; with
``cache_refresh=1`` every step is a full forward and the tokens are those of ``cache="none"``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..kv_cache import KVCache
from .base import BlockSampler, GenerationRun, even_split

__all__ = ["LLaDASampler"]


class LLaDASampler(BlockSampler):
    """Block-wise confidence-ordered unmasking, optionally with Gumbel sampling and classifier-free guidance."""

    temperature: float = Field(0.0, ge=0.0, description="Gumbel-max sampling temperature; 0 = argmax")
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    cfg_scale: float = Field(0.0, ge=0.0, description="classifier-free guidance scale; 0 = off")

    @model_validator(mode="after")
    def _check(self) -> "LLaDASampler":
        if self.remasking == "random" and self.decodes_in_parallel:
            raise ValueError("threshold / factor decoding compares the model's confidences, but remasking='random' "
                             "ranks positions by random numbers; use remasking='low_confidence'")
        if self.cache != "none" and self.cfg_scale > 0:
            raise ValueError("cache= with classifier-free guidance (cfg_scale > 0) is not supported: the unconditional "
                             "pass would need a cache of its own; use cache='none' with cfg_scale")
        return self

    @property
    def draws_random_numbers(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"

    def _generate(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, steps: int) -> torch.Tensor:
        blocks, per_block = self._blocks(prompt_length, canvas.shape[1], steps)
        mask_id = run.view.mask_token_id
        cache = run.open_cache(type(self).__name__, self.cache)
        for block in blocks:
            counts = even_split((canvas[:, block] == mask_id).sum(1), per_block)
            for step in self._block_steps(per_block):
                current = canvas[:, block]
                if self.decodes_in_parallel and not bool((current == mask_id).any()):
                    break  # parallel decoding filled the block early
                self._cache_step(run, cache, step, block, canvas.shape[1])
                proposal, confidence = self._propose(run, self._logits(run, canvas, prompt_length, block, cache))
                share = counts[:, min(step, per_block - 1)]  # (past the schedule only under Fast-dLLM's rule)
                reveal = self._reveal(confidence, current == mask_id, share)
                canvas[:, block] = torch.where(reveal, proposal, current)
                run.record(canvas)
            if block.stop < canvas.shape[1]:
                run.block_done(canvas, block.stop)
        return canvas

    def _logits(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, block: slice,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits of the current block only [B, block_length, V] (optionally classifier-free guided)."""
        if self.cfg_scale == 0:
            return run.logits(canvas, columns=block, kv_cache=cache)
        unconditional = canvas.clone()
        unconditional[:, :prompt_length] = run.view.mask_token_id
        return run.logits(canvas, unconditional=unconditional, cfg_scale=self.cfg_scale, columns=block)

    def _propose(self, run: GenerationRun, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposed tokens [B, N] (Gumbel-max in float64 at ``temperature``) and their confidence [B, N]."""
        if self.temperature > 0:
            proposal = (logits.double() + self.temperature * run.gumbel(logits.shape, logits.device)).argmax(-1)
        else:
            proposal = logits.argmax(-1)
        if self.remasking == "random":
            return proposal, run.uniform(proposal.shape, proposal.device)
        chosen = logits.gather(-1, proposal[..., None]).squeeze(-1)
        return proposal, (chosen - logits.logsumexp(-1)).exp()
