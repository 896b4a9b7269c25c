"""Random sources for mask construction.

A plain ``torch.Generator`` draws independent keys for every row. :class:`RowSharedRandom` draws the
same keys for every row, from a stream that does not depend on the batch size or the sequence length,
so per-sample inference-time adaptation gives row b exactly what it would get if run alone. Its keys
are indexed by the position *within the row's real tokens* (``offsets``: the number of leading padding
positions), so a left-padded row draws exactly what it draws unpadded.

:func:`keyed_uniform` draws from a counter-based hash of (seed, key, column) instead of a stream: the
evaluation anchors of an example depend on the example alone, not on its batch, its position in the
data or the number of processes.
"""

from __future__ import annotations

import torch

__all__ = ["RowSharedRandom", "RandomSource", "uniform", "as_torch_generator", "leading_padding", "keyed_uniform",
           "content_keys"]

_MASK32 = 0xFFFFFFFF


class RowSharedRandom:
    """Every call gets a fresh generator seeded from (seed, call index); rows share the draw.

    ``offsets`` [B] (optional): leading padding positions of each row; row b's key for column c is the
    shared key of position ``c - offsets[b]``.
    """

    def __init__(self, seed: int, offsets: torch.Tensor | None = None) -> None:
        self.seed = seed
        self.calls = 0
        self.offsets = offsets

    def generator(self, device: torch.device | str) -> torch.Generator:
        self.calls += 1
        return torch.Generator(device).manual_seed(self.seed * 1_000_003 + self.calls)


RandomSource = torch.Generator | RowSharedRandom | None


def leading_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of padding positions before each row's first real token [B] (0 for right padding)."""
    return (attention_mask.long().cumsum(1) == 0).sum(1)


def uniform(shape: torch.Size | tuple[int, ...], source: RandomSource, device: torch.device | str) -> torch.Tensor:
    """U(0, 1) draws of ``shape`` [B, L]; with a row-shared source all rows get the same [L] draw,
    aligned on each row's first real token."""
    if not isinstance(source, RowSharedRandom):
        return torch.rand(shape, generator=source, device=device)
    keys = torch.rand(shape[-1], generator=source.generator(device), device=device)
    if source.offsets is None:
        return keys.expand(shape)
    columns = torch.arange(shape[-1], device=device)
    return keys[(columns - source.offsets.to(device)[:, None]).clamp_min(0)]


def as_torch_generator(source: RandomSource, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator for draws that are not per row (e.g. fast-weight initialisation)."""
    return source.generator(device) if isinstance(source, RowSharedRandom) else source


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, "lowbias32") on int64 tensors holding values < 2^32.

    Products are formed from 16-bit halves so every intermediate stays below 2^63 (exact on every device).
    """
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        low, high = x & 0xFFFF, x >> 16
        x = (low * factor + (((high * factor) & 0xFFFF) << 16)) & _MASK32
    return x ^ (x >> 16)


def content_keys(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A 32-bit key [B] per row from its real tokens and their positions among the real tokens
    (padding, on either side, does not change it)."""
    real = attention_mask.bool()
    position = attention_mask.long().cumsum(1) - 1
    per_token = _mix32((_mix32(tokens.long() & _MASK32) + position * 0x9E3779B9) & _MASK32)
    return (per_token * real).sum(1) & _MASK32


def keyed_uniform(seed: int, keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """U(0, 1) float64 draws [B, C] that depend only on (seed, keys[b], columns[b, c]) (counter-based)."""
    seeded = _mix32(torch.as_tensor(seed & _MASK32, device=keys.device) + 0x632BE5AB)
    mixed = _mix32((_mix32((keys[:, None] ^ seeded) & _MASK32) + columns.long() * 0x85EBCA77) & _MASK32)
    return (mixed.double() + 0.5) / 2.0**32
