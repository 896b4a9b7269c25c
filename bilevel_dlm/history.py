"""What a training run measured (:class:`History`): written by ``fit``, saved in its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["History"]


@dataclass
class History:
    """What ``fit`` measured: one entry per optimizer step, evaluations at ``eval_steps``.

    ``nonfinite_steps`` lists the steps that were attempted with a non-finite loss or gradient and
    skipped (the step was then retried on the next batch); ``variant`` is the inner method's ``name``
    ("MemDLM"), or "MDLM" for an inner method that adapts nothing (the plain baseline); ``changes`` the
    step and settings of every resume that was allowed to change the run.
    """

    steps: list[int] = field(default_factory=list)
    outer_loss: list[float] = field(default_factory=list)
    inner_losses: list[list[float]] = field(default_factory=list)
    inner_grad_norms: list[list[float]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_loss_prompt_memory: list[float] = field(default_factory=list)
    skipped_batches: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)
    variant: str = "MemDLM"
    step_seconds: list[float] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)  # settings a resume changed (allow_changes)
