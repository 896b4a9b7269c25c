"""Share the blocks below the first fast weight between passes that see the same input.

The anchor stage of the inner loop and the outer pass both run on x_t, and the blocks below the
first fast weight do not depend on the memory, so their outputs are identical. ``PrefixReplay``
records those block outputs (with their autograd graph into theta) during the first pass and, in
the later pass, temporarily puts stand-ins into the block list that return the recorded outputs
instead of recomputing them. The model's own forward code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["PrefixReplay"]


class _Recorded(nn.Module):
    """Stand-in for a block: returns the output the real block produced on the same input. Other
    attribute reads fall through to the real block (models read per-layer settings in their loop)."""

    def __init__(self, block: nn.Module, output: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: no second copy of its parameters
        self.output = output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._block, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


class PrefixReplay:
    """Record the outputs of ``blocks[:n]`` once, replay them in later forwards on the same input."""

    def __init__(self, blocks: nn.ModuleList, n: int) -> None:
        self.blocks = blocks
        self.n = n
        self.outputs: list[Any] | None = None

    @property
    def recorded(self) -> bool:
        return self.outputs is not None

    @contextmanager
    def record(self) -> Iterator[None]:
        outputs: list[Any] = [None] * self.n

        def keep(index: int):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                outputs[index] = output
            return hook

        handles = [self.blocks[i].register_forward_hook(keep(i)) for i in range(self.n)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.outputs = outputs

    @contextmanager
    def replay(self) -> Iterator[None]:
        if self.outputs is None:
            raise RuntimeError("PrefixReplay.replay() before anything was recorded")
        originals = [self.blocks[i] for i in range(self.n)]
        for i in range(self.n):
            self.blocks[i] = _Recorded(originals[i], self.outputs[i])
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def clear(self) -> None:
        """Drop the recorded outputs (and the graph they hold)."""
        self.outputs = None
