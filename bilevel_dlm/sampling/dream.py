"""Dream's sampler (the reference ``diffusion_generate``): time-based unmasking over all new tokens.

Times run ``linspace(1, eps, steps + 1)``; going from t to s reveals a fraction ``1 - s/t`` of the
still-masked positions, everything at the last step. ``origin`` picks those positions at random; the
confidence algorithms pick the most confident ones (or sample them from ``softmax(confidence / alg_temp)``):
``maskgit_plus`` the probability of the drawn token, ``topk_margin`` top-1 minus top-2 probability,
``entropy`` the negative entropy. Each reveal is exact per row, so a batch decodes like its rows alone.
With ``threshold`` (maskgit_plus / topk_margin) or ``factor``, steps reveal by ``threshold_rule`` (see
:class:`~bilevel_dlm.sampling.base.BlockSampler`: Fast-dLLM's rule by default, or the schedule's share, at
least one token a step), and a block ends once nothing in it is masked.

``block_length`` fills the new tokens in blocks, left to right, each with its own ``steps / blocks`` steps
and schedule; None is one block of every new token (the reference). This is Dream's own schedule run per
block, not Fast-dLLM's block-wise Dream code (``generation_utils_block.py``), which differs: its first
step of a block is a full forward that reveals exactly the block's first token, the other steps always
run on its cache, and its schedule path orders positions by entropy over ``steps_per_block - 1`` steps.
With a KV cache (``bilevel_dlm.kv_cache``) a block's first step is a full forward that stores every
layer's keys and values, and its other steps compute the block and what follows it (``"prefix"``) or
the block alone (``"dual"``), each with the column before the block, whose hidden state predicts the
block's first token (Dream's logits are shifted). An approximation, refreshed every ``cache_refresh``
steps of a block (None: at its first step only; 1: every step, the tokens of ``cache="none"``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from .base import BlockSampler, GenerationRun

__all__ = ["DreamSampler"]


class DreamSampler(BlockSampler):
    """Defaults decode deterministically: lowest-entropy positions first, argmax tokens."""

    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] = "entropy"
    temperature: float = Field(0.0, ge=0.0, description="token sampling temperature; 0 = argmax")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus filtering; 1 = off")
    top_k: int | None = Field(None, gt=0, description="keep the k most likely tokens; None = off")
    alg_temp: float = Field(0.0, ge=0.0, description="> 0: sample positions from softmax(confidence / alg_temp)")
    eps: float = Field(1e-3, gt=0.0, lt=1.0, description="final time of the schedule")

    @model_validator(mode="after")
    def _check(self) -> "DreamSampler":
        if self.decodes_in_parallel and (self.alg not in ("maskgit_plus", "topk_margin") or self.alg_temp > 0):
            raise ValueError("threshold / factor decoding needs a confidence in [0, 1] compared as it is: "
                             "alg='maskgit_plus' or 'topk_margin' with alg_temp=0")
        return self

    @property
    def draws_random_numbers(self) -> bool:
        return self.temperature > 0 or self.alg == "origin" or self.alg_temp > 0

    def _generate(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, steps: int) -> torch.Tensor:
        blocks, per_block = self._blocks(prompt_length, canvas.shape[1], steps)
        times = torch.linspace(1.0, self.eps, per_block + 1, dtype=torch.float64).tolist()
        mask_id = run.view.mask_token_id
        cache = run.open_cache(type(self).__name__, self.cache)
        for block in blocks:
            for step in self._block_steps(per_block):
                fraction = 1.0 - times[step + 1] / times[step] if step < per_block - 1 else 1.0
                current = canvas[:, block]
                masked = current == mask_id
                if self.decodes_in_parallel and not bool(masked.any()):
                    break  # parallel decoding filled the block early
                self._cache_step(run, cache, step, block, canvas.shape[1])
                tokens, confidence = self._propose(run, run.logits(canvas, columns=block, kv_cache=cache))
                if self.alg == "origin":
                    reveal = masked & (run.uniform(masked.shape, masked.device, torch.float64) < fraction)
                else:
                    counts = (masked.sum(1) * fraction).floor().long()
                    scores = confidence.double()
                    if self.alg_temp > 0:  # Gumbel-top-k: positions drawn without replacement from the softmax
                        scores = (scores.masked_fill(~masked, float("-inf")) / self.alg_temp
                                  + run.gumbel(scores.shape, scores.device))
                    reveal = self._reveal(scores, masked, counts)
                canvas[:, block] = torch.where(reveal, tokens, current)
                run.record(canvas)
            if block.stop < canvas.shape[1]:
                run.block_done(canvas, block.stop)
        return canvas

    def _propose(self, run: GenerationRun, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, N] drawn from the filtered distribution, and the confidence of the chosen ``alg``."""
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_p < 1:
            logits = _nucleus(logits, self.top_p)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        log_probs = logits.log_softmax(-1)
        if self.temperature > 0:
            tokens = (log_probs + run.gumbel(log_probs.shape, log_probs.device)).argmax(-1)
        else:
            tokens = log_probs.argmax(-1)
        probs = log_probs.exp()
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            return tokens, top2[..., 0] - top2[..., 1]
        if self.alg == "entropy":
            return tokens, torch.special.xlogy(probs, probs).sum(-1)
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens up to cumulative probability ``top_p`` (the top token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
