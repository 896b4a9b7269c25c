"""Which sample each routed token came from: what per-sample memory needs to know inside an MoE block.

An MoE block runs each expert on the tokens routed to it, gathered from the whole batch, so a hook on
an expert's linear sees ``[n_routed, d]`` rows of unknown origin. A model whose block wraps every
expert call in :func:`routed_tokens` tells the hook the flat token index of each row; per-sample fast
weights then give every routed token its own sample's delta, exactly as if each sample ran alone.
The adapter declares this with ``Backbone.reports_routed_tokens`` (the native LLaDA-MoE does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

__all__ = ["RoutedTokens", "routed_tokens", "current_routed_tokens"]


@dataclass(frozen=True)
class RoutedTokens:
    """Flat indices [n] (into the batch's ``B * L`` tokens) of the rows an expert is called on."""

    index: torch.Tensor
    length: int

    @property
    def samples(self) -> torch.Tensor:
        """The sample (batch row) of every routed token [n]."""
        return torch.div(self.index, self.length, rounding_mode="floor")


_CURRENT: ContextVar[RoutedTokens | None] = ContextVar("bilevel_dlm_routed_tokens", default=None)


@contextmanager
def routed_tokens(index: torch.Tensor, length: int) -> Iterator[None]:
    """Declare, for the expert call inside, the flat token index of each of its input rows."""
    token = _CURRENT.set(RoutedTokens(index, length))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_routed_tokens() -> RoutedTokens | None:
    """The routing declared by the innermost :func:`routed_tokens`, or None outside any."""
    return _CURRENT.get()
