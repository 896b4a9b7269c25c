"""Random sources for mask construction.

A plain ``torch.Generator`` draws independent keys for every row. :class:`RowSharedRandom` draws the
same keys for every row, from a stream that does not depend on the batch size or the sequence length,
so per-sample inference-time adaptation gives row b exactly what it would get if run alone.
"""

from __future__ import annotations

import torch

__all__ = ["RowSharedRandom", "RandomSource", "uniform", "as_torch_generator"]


class RowSharedRandom:
    """Every call gets a fresh generator seeded from (seed, call index); rows share the draw."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.calls = 0

    def generator(self, device: torch.device | str) -> torch.Generator:
        self.calls += 1
        return torch.Generator(device).manual_seed(self.seed * 1_000_003 + self.calls)


RandomSource = torch.Generator | RowSharedRandom | None


def uniform(shape: torch.Size | tuple[int, ...], source: RandomSource, device: torch.device | str) -> torch.Tensor:
    """U(0, 1) draws of ``shape`` [B, L]; with a row-shared source all rows get the same [L] draw."""
    if isinstance(source, RowSharedRandom):
        return torch.rand(shape[-1], generator=source.generator(device), device=device).expand(shape)
    return torch.rand(shape, generator=source, device=device)


def as_torch_generator(source: RandomSource, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator for draws that are not per row (e.g. fast-weight initialisation)."""
    return source.generator(device) if isinstance(source, RowSharedRandom) else source
