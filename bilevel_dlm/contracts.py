"""The contracts of the bilevel engine: what a memory, an inner method and an outer objective are.

``MemoryWrapper`` runs one training step against these three and nothing else:

1. ``anchor = outer.sample_anchor(x0, maskable, generator)``;
2. ``inner.run(x0, maskable, anchor, attention_mask, generator=..., prefix=...)`` adapts
   ``inner.memory`` and returns per-stage metrics; the memory is bound for the rest of the step;
3. ``loss = outer.loss(x0, maskable, anchor, attention_mask)`` is computed with the memory bound and
   backpropagated into theta (the model's trainable parameters and ``inner.meta_parameters()``);
4. ``inner.after_backward()``, the optimizer step (or its skip), then ``inner.after_step(stepped)``.

``generator`` is a :data:`~bilevel_dlm.rng.RandomSource`: in ``fit`` and MemDLMTrainer a
:class:`~bilevel_dlm.rng.KeyedRandom` keyed by each row's (epoch, example index), so that the run is the
same on any number of processes and after a resume. Draw from it with ``bilevel_dlm.rng.uniform`` (one
number per token) and ``row_uniform`` (per row), never ``torch.rand(generator=...)``.

At inference, ``MemoryWrapper.adapt`` runs ``inner.for_prompts(memory.spawn(per_sample), settings)`` on
the prompts.

Guarantees around them: the memory is reset by the inner method and dropped after the step; if
``inner.unrolled`` is false, the outer gradient of theta does not flow through the adaptation (the
adapted memory may still carry a graph to the method's own meta-parameters), else it does; the blocks below the memory are recorded by the inner method and
replayed in the outer pass only when ``inner.shares_anchor_prefix`` says an inner stage saw exactly the
outer input (and the recording drew no random numbers); the outer loss is normalised by
``outer.denominator`` summed over micro-batches and processes (``loss_terms``).
MemDLM's classes (:class:`~bilevel_dlm.memory.MemoryParams`, :class:`~bilevel_dlm.inner.InnerLoop`,
:class:`~bilevel_dlm.outer.OuterLoop`) are implementations; so is any class that subclasses these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import AdaptConfig
    from .noise import Anchor
    from .prefix import PrefixReplay
    from .rng import RandomSource

__all__ = ["FastWeights", "InnerMethod", "InnerResult", "OuterObjective"]


@dataclass
class InnerResult:
    """What an inner method's run reports: per-stage inner loss and fast-weight gradient norm, as tensors [K]
    (no host sync)."""

    losses: torch.Tensor
    grad_norms: torch.Tensor


class FastWeights(ABC):
    """A memory: plain tensors outside the model, added to its computation while bound.

    Implementations keep ``names`` (one per tensor, stable), ``values`` (the current tensors, never
    modified in place), ``first_block`` (the first transformer block the memory touches: blocks below it
    do not depend on it) and ``per_sample``.
    """

    names: tuple[str, ...]
    first_block: int
    per_sample: bool
    device: torch.device

    @property
    @abstractmethod
    def values(self) -> tuple[torch.Tensor, ...]:
        """The current tensors (raises when the memory is empty)."""

    @abstractmethod
    def reset(self, batch_size: int | None = None, generator: RandomSource = None,
              initial: Sequence[torch.Tensor] | None = None) -> None:
        """Fresh tensors (from ``initial`` when given, e.g. a meta-learned initialisation)."""

    @abstractmethod
    def initial_values(self, generator: RandomSource = None) -> tuple[torch.Tensor, ...]:
        """One fresh draw of the unbatched tensors (what :meth:`reset` starts from by default)."""

    @abstractmethod
    def set(self, values: Sequence[torch.Tensor]) -> None:
        """Replace the tensors by new ones."""

    @abstractmethod
    def clear(self) -> None:
        """Drop the tensors and every graph hanging on them."""

    @abstractmethod
    def bind(self) -> AbstractContextManager:
        """While active, the model computes with the memory's current ``values`` (read at each forward);
        unbinding restores the model exactly. Re-entrant: a bound memory bound again is added once."""

    @abstractmethod
    def suspended(self) -> AbstractContextManager:
        """While active, a bound memory adds nothing."""

    @abstractmethod
    def spawn(self, per_sample: bool) -> FastWeights:
        """An empty memory of the same form on the same model (e.g. per-prompt memory for ``adapt``)."""

    def state(self) -> dict[str, torch.Tensor]:
        """Name -> detached copy of every tensor."""
        return {name: value.detach().clone() for name, value in zip(self.names, self.values)}


class InnerMethod(ABC):
    """Adapts a memory on a batch; the outer objective is then computed with it bound."""

    memory: FastWeights
    #: How training runs with this method are labelled (``History.variant``, progress bars).
    name: str = "bilevel"
    #: True when one inner stage runs on exactly the outer anchor's input, so the engine may let it
    #: record the blocks below the memory for the outer pass (``prefix`` of :meth:`run`).
    shares_anchor_prefix: bool = False

    @property
    def unrolled(self) -> bool:
        """True when the outer gradient flows through the adaptation (second order)."""
        return False

    @property
    def adapts(self) -> bool:
        """False when :meth:`run` leaves the memory empty (a plain baseline): nothing is bound."""
        return True

    @abstractmethod
    def run(self, x0: torch.Tensor, maskable: torch.Tensor, anchor: Anchor, attention_mask: torch.Tensor | None = None,
            *, generator: RandomSource = None, weighting: str | None = None,
            prefix: PrefixReplay | None = None) -> InnerResult:
        """Reset and adapt ``self.memory`` on the batch; per-stage loss and gradient norm tensors [K]."""

    def for_prompts(self, memory: FastWeights, settings: AdaptConfig) -> InnerMethod:
        """The method that adapts ``memory`` on prompts at inference (``MemoryWrapper.adapt``), with the
        adaptation's own settings; it shares this method's meta-parameters."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define for_prompts(memory, settings), so MemoryWrapper.adapt / "
            "generate(adapt=...) cannot use it: implement it, or evaluate without inference-time memory")

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters of the method itself that the outer loop trains (or updates): saved in checkpoints."""
        return []

    def after_backward(self) -> None:
        """Called once the outer backward has run, while the adapted memory still exists."""

    def after_step(self, stepped: bool) -> None:
        """Called at the end of every outer step: after theta's optimizer step (``stepped``), or after a
        step skipped for non-finite values (updates that are not gradients, e.g. Reptile's, go here)."""


class OuterObjective(ABC):
    """The loss of theta at an anchor, computed with whatever memory is bound."""

    @abstractmethod
    def sample_anchor(self, x0: torch.Tensor, maskable: torch.Tensor, generator: RandomSource = None) -> Anchor:
        """A noised batch for training (drawn from ``generator``: keyed by example in fit and the Trainer)."""

    @abstractmethod
    def keyed_anchor(self, x0: torch.Tensor, maskable: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> Anchor:
        """A noised batch for evaluation, each example's draws from its own content and ``seed``."""

    @abstractmethod
    def loss_terms(self, x0: torch.Tensor, maskable: torch.Tensor, anchor: Anchor,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(numerator, denominator): sums over batches or processes give the loss of their union."""

    @abstractmethod
    def denominator(self, maskable: torch.Tensor) -> torch.Tensor:
        """The normaliser of a batch (the denominator of :meth:`loss_terms`)."""

    def loss(self, x0: torch.Tensor, maskable: torch.Tensor, anchor: Anchor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        numerator, denominator = self.loss_terms(x0, maskable, anchor, attention_mask)
        return numerator / denominator.clamp_min(1)
