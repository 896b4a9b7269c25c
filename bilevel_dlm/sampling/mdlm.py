"""MDLM's ancestral sampler with a cached denoiser (the reference ``ddpm_cache``).

Times run ``linspace(1, eps, steps + 1)``. From t to s a masked position stays masked with weight s or
becomes token v with weight ``p_x0(v) (t - s)``, where p_x0 comes from the view's SUBS log-probabilities
(the model is told t through ``mask_ratio``); revealed tokens are carried over. While a step changes
nothing, p_x0 is reused instead of recomputed, so with more steps than tokens many steps cost no forward.
A final argmax fills whatever is still masked.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from .base import GenerationRun, Sampler

__all__ = ["MDLMSampler"]


class MDLMSampler(Sampler):
    """``use_cache`` reuses p_x0 while the canvas is unchanged. That is exact only for a model that ignores
    t (MDLM's release has ``time_conditioning=False``), so the default (None) caches exactly then, as the
    reference sampler does, and recomputes every step for a time-conditioned model."""

    eps: float = Field(1e-5, gt=0.0, lt=1.0, description="final time of the schedule")
    use_cache: bool | None = Field(None, description="None: cache only when the model ignores t (exact)")

    @property
    def draws_random_numbers(self) -> bool:
        return True  # ancestral sampling

    def _generate(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, steps: int) -> torch.Tensor:
        times = torch.linspace(1.0, self.eps, steps + 1, dtype=torch.float64).tolist()
        mask_id = run.view.mask_token_id
        log_p_x0 = None
        use_cache = run.view.backbone.ignores_time(run.view.model) if self.use_cache is None else self.use_cache
        for step in range(steps):
            t, s = times[step], times[step + 1]
            if log_p_x0 is None:
                log_p_x0 = self._log_p_x0(run, canvas, prompt_length, t)
            weights = log_p_x0.double() + math.log(t - s)
            weights[..., mask_id] = math.log(s)
            proposal = (weights + run.gumbel(weights.shape, weights.device)).argmax(-1)
            current = canvas[:, prompt_length:]
            updated = torch.where(current == mask_id, proposal, current)
            if not use_cache or not torch.equal(updated, current):
                log_p_x0 = None
            canvas[:, prompt_length:] = updated
            run.record(canvas)
        remaining = canvas[:, prompt_length:] == mask_id
        if bool(remaining.any()):
            if log_p_x0 is None:
                log_p_x0 = self._log_p_x0(run, canvas, prompt_length, self.eps)
            canvas[:, prompt_length:] = torch.where(remaining, log_p_x0.argmax(-1), canvas[:, prompt_length:])
            run.record(canvas)
        return canvas

    @staticmethod
    def _log_p_x0(run: GenerationRun, canvas: torch.Tensor, prompt_length: int, t: float) -> torch.Tensor:
        """SUBS log-probabilities [B, N, V] of the new positions at time t."""
        ratio = torch.full((canvas.shape[0],), t, device=canvas.device)
        return run.logits(canvas, ratio, columns=slice(prompt_length, None))
