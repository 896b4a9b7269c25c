"""A meta-learned initialisation of the fast weights (the MAML / Reptile family).

Instead of a fresh draw every batch, the inner loop starts from phi_0, a set of parameters (one per
fast-weight tensor, initialised from one fresh draw) that the outer loop trains:

- ``fomaml`` (first-order MAML): the gradient of the outer loss at the adapted phi_K (a constant of the
  first-order step, made a leaf so the outer backward reaches it) is applied to phi_0, summed over the
  samples of per-sample memory;
- ``reptile``: after each outer step phi_0 <- phi_0 + rate * (mean over the step's samples and
  micro-batches of phi_K - phi_0), not a gradient (phi_0 stays out of the optimizer);
- ``maml``: the unrolled inner loop starts from phi_0 itself, so the outer backward differentiates
  through the K updates into phi_0.

phi_0 is saved with the other meta-parameters and is where ``adapt`` starts.
"""

from __future__ import annotations

import torch
from torch import nn

from .contracts import FastWeights

__all__ = ["MetaInit", "META_INIT_METHODS"]

META_INIT_METHODS = ("fomaml", "reptile", "maml")


class MetaInit(nn.Module):
    """phi_0 for ``memory`` and the rule that trains it (``method`` in :data:`META_INIT_METHODS`)."""

    def __init__(self, memory: FastWeights, method: str, rate: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        if method not in META_INIT_METHODS:
            raise ValueError(f"unknown meta initialisation {method!r}; choose one of {META_INIT_METHODS}")
        self.method, self.rate = method, rate
        draw = memory.initial_values(torch.Generator(memory.device).manual_seed(seed))
        self.values = nn.ParameterList(nn.Parameter(v.clone(), requires_grad=method != "reptile") for v in draw)
        self._adapted_sum: list[torch.Tensor] | None = None  # reptile: sum of phi_K over the step's samples
        self._adapted_count = 0

    def initial(self, differentiable: bool) -> list[torch.Tensor]:
        """phi_0 to reset the memory from: the parameters themselves (unrolled MAML) or detached copies."""
        return [p if differentiable else p.detach() for p in self.values]

    def after_backward(self, memory: FastWeights) -> None:
        """fomaml: phi_0.grad += dL/dphi_K; reptile: add phi_K to the step's sum (one call per micro-batch)."""
        per_sample = memory.per_sample
        if self.method == "fomaml":
            for parameter, value in zip(self.values, memory.values):
                if value.grad is None:
                    continue
                grad = value.grad.sum(0) if per_sample else value.grad
                parameter.grad = grad.clone() if parameter.grad is None else parameter.grad + grad
        elif self.method == "reptile":
            values = [v.detach().sum(0) if per_sample else v.detach() for v in memory.values]
            count = memory.values[0].shape[0] if per_sample else 1
            self._adapted_sum = values if self._adapted_sum is None else [
                total + value for total, value in zip(self._adapted_sum, values)]
            self._adapted_count += count

    @torch.no_grad()
    def after_step(self, stepped: bool) -> None:
        """reptile: phi_0 <- phi_0 + rate (mean phi_K - phi_0), the mean over the step's samples; a
        skipped step's phi_K are dropped."""
        if self.method == "reptile" and self._adapted_sum is not None and stepped:
            for parameter, total in zip(self.values, self._adapted_sum):
                parameter.add_(self.rate * (total / self._adapted_count - parameter))
        self._adapted_sum, self._adapted_count = None, 0
