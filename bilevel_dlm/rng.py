"""Random sources for mask construction.

A plain ``torch.Generator`` draws independent keys for every row. :class:`RowSharedRandom` draws the
same keys for every row, from a stream that does not depend on the batch size or the sequence length,
so per-sample inference-time adaptation gives row b exactly what it would get if run alone. Its keys
are indexed by the position *within the row's real tokens* (``offsets``: the number of leading padding
positions), so a left-padded row draws exactly what it draws unpadded.

:func:`keyed_uniform` draws from a counter-based hash of (seed, key, column) instead of a stream: the
evaluation anchors of an example depend on the example alone, not on its batch, its position in the
data or the number of processes. :class:`KeyedRandom` uses it for training: every draw of a training step
(anchor, trajectory, fresh fast weights) is a function of (seed, epoch, the example's global index), so a
run draws the same numbers on 1 or 8 processes, with or without gradient accumulation, and after a resume.
"""

from __future__ import annotations

import torch

__all__ = ["RowSharedRandom", "KeyedRandom", "RandomSource", "uniform", "row_uniform", "leading_padding",
           "keyed_uniform", "content_keys", "example_keys"]

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


class KeyedRandom:
    """Training draws keyed by example: row b's draws depend only on (seed, ``keys[b]``, the call's number,
    the column), never on the other rows, the batch size, the process or the device.

    ``keys`` [B]: one 32-bit key per row (:func:`example_keys` of its epoch and global example index).
    ``attention_mask`` [B, L] (optional): token draws are indexed by the position among the row's real
    tokens, so padding on either side changes nothing. Each call (anchor time, anchor mask, trajectory,
    fast weights) is a new stream, numbered in the order the step makes them.
    """

    def __init__(self, seed: int, keys: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        self.seed, self.keys, self.calls = seed, keys, 0
        self.positions = None if attention_mask is None else attention_mask.long().cumsum(1) - 1

    def draw(self, columns: torch.Tensor) -> torch.Tensor:
        """float64 U(0, 1) [B, C] for this call's stream at ``columns`` [B, C] (or [C])."""
        self.calls += 1
        columns = columns.expand(self.keys.shape[0], -1)
        return keyed_uniform(self.seed * 1_000_003 + self.calls, self.keys, columns)

    def pooled(self) -> "KeyedRandom":
        """One key for the whole batch (shared fast weights adapted on it), continuing the call count."""
        key = _mix32((self.keys.sum() + self.keys.shape[0]) & _MASK32)[None]
        pooled = KeyedRandom(self.seed, key)
        pooled.calls = self.calls
        return pooled


RandomSource = torch.Generator | RowSharedRandom | KeyedRandom | None


def leading_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of padding positions before each row's first real token [B] (0 for right padding)."""
    return (attention_mask.long().cumsum(1) == 0).sum(1)


def uniform(shape: torch.Size | tuple[int, ...], source: RandomSource, device: torch.device | str) -> torch.Tensor:
    """U(0, 1) draws, one per token of ``shape`` [B, L]; with a row-shared source all rows get the same [L]
    draw, and a row-shared or keyed source aligns a row's draws on its first real token (a keyed source
    draws float64, so that no two of a row's draws are equal)."""
    if isinstance(source, KeyedRandom):  # float64: a row's draws never tie, so ranks do not depend on the sort
        rows, width = shape
        if rows != source.keys.shape[0] or (source.positions is not None and width != source.positions.shape[1]):
            raise ValueError(f"a keyed random source for {tuple(source.keys.shape)} rows"
                             + ("" if source.positions is None else f" of {source.positions.shape[1]} tokens")
                             + f" cannot draw one number per token of shape {tuple(shape)}")
        columns = source.positions if source.positions is not None else torch.arange(width, device=device)
        return source.draw(columns.to(device).clamp_min(0))
    if not isinstance(source, RowSharedRandom):
        return torch.rand(shape, generator=source, device=device)
    keys = torch.rand(shape[-1], generator=source.generator(device), device=device)
    if source.offsets is None:
        return keys.expand(shape)
    columns = torch.arange(shape[-1], device=device)
    return keys[(columns - source.offsets.to(device)[:, None]).clamp_min(0)]


def row_uniform(rows: int, columns: int, source: RandomSource, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U(0, 1) draws [rows, columns] not tied to token positions (anchor times, fresh fast weights): a
    keyed source gives each row its own example's draws (``rows`` must be its row count), a row-shared
    source one draw for every row, a generator (or None) plain ``torch.rand``."""
    if isinstance(source, KeyedRandom):
        if rows != source.keys.shape[0]:
            raise ValueError(f"a keyed random source of {source.keys.shape[0]} rows cannot draw {rows} rows")
        return source.draw(torch.arange(columns, device=device)).to(dtype)
    if isinstance(source, RowSharedRandom):
        return torch.rand(columns, generator=source.generator(device), device=device, dtype=dtype).expand(rows, -1)
    return torch.rand(rows, columns, generator=source, device=device, dtype=dtype)


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


def example_keys(epoch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit key [B] of each row's (epoch, global example index), for :class:`KeyedRandom`."""
    return _mix32((_mix32(index.long() & _MASK32) + epoch.long() * 0x9E3779B9) & _MASK32)


def keyed_uniform(seed: int, keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """U(0, 1) float64 draws [B, C] that depend only on (seed, keys[b], columns[b, c]) (counter-based)."""
    seeded = _mix32(torch.as_tensor(seed & _MASK32, device=keys.device) + 0x632BE5AB)
    mixed = _mix32((_mix32((keys[:, None] ^ seeded) & _MASK32) + columns.long() * 0x85EBCA77) & _MASK32)
    return (mixed.double() + 0.5) / 2.0**32
