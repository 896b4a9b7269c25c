"""Positions selected by a bool mask, found with one host sync and gathered by index afterwards.

Boolean-mask indexing (``x[mask]``) asks the device for the number of selected positions every time it
runs. A loss needs the same positions from several tensors (hidden states, inputs, targets, the sample
of every row), so :class:`Selection` finds them once (``nonzero``: one sync) and every later gather uses
the integer indices, which the device can run without waiting for the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Selection"]


@dataclass(frozen=True)
class Selection:
    """The true positions of a bool mask [B, L] in row-major order: sample ``rows`` [N], ``columns`` [N]."""

    rows: torch.Tensor
    columns: torch.Tensor
    batch_size: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> "Selection":
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"a selection needs a bool mask [batch, length], got {mask.dtype} {tuple(mask.shape)}")
        rows, columns = mask.nonzero(as_tuple=True)
        return cls(rows, columns, mask.shape[0])

    def __len__(self) -> int:
        return self.rows.shape[0]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor[mask]`` for a tensor [B, L, ...]: the selected entries [N, ...]."""
        return tensor[self.rows, self.columns]
