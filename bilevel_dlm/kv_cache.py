"""Attention keys and values kept between denoising steps (Fast-dLLM's prefix and dual caches).

A forward with ``window`` None computes every position of the canvas and stores each attention layer's
keys and values. With ``window = (start, stop)`` it computes only those positions: their queries, keys and
values are fresh, and they attend to the stored keys and values everywhere else. ``stop`` at the canvas
end is the prefix cache (the current block and what follows it are recomputed), ``stop`` at the block end
is the dual cache. Each forward stores what it computed, so stored entries outside the window are those
of the last forward that computed them: an approximation of a bidirectional model (they would have seen
the newly revealed tokens), exact when the canvas has not changed since, and exact under block-causal
attention for every block before the last one that changed. A canvas may grow between forwards (a
window reaching past the stored columns); the window must start inside them.

A model supports the cache by taking ``kv_cache`` as an explicit forward parameter, embedding only the
positions :meth:`KVCache.columns` names (queries of those rows only in any attention mask, positions of
those columns) and passing every layer's keys and values through :meth:`KVCache.attend`, or giving the
cache to transformers' attention layers, which call it as their ``Cache`` (:meth:`KVCache.update`). The
native LLaDA, LLaDA-MoE, Dream and LLaDA2 models do.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["KVCache", "supports_kv_cache"]


class KVCache:
    """Per-layer keys and values [B, H, L, head_dim] as the last forwards left them, and the current window."""

    def __init__(self) -> None:
        self.window: tuple[int, int] | None = None
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def columns(self, length: int) -> slice:
        """The canvas positions the next forward computes, on a canvas of ``length`` columns."""
        if self.window is None:
            return slice(0, length)
        start, stop = self.window
        if not self._keys:
            raise RuntimeError("KVCache: a windowed forward needs a full forward first (window=None)")
        stored = next(iter(self._keys.values())).shape[2]
        if not 0 <= start < stop <= length or stored < start or stored > length or (stored < length and stop < length):
            raise ValueError(
                f"KVCache: window {self.window} does not fit a canvas of {length} columns with {stored} stored; a "
                "window lies inside the canvas and starts inside the stored columns, and a canvas longer than the "
                "stored one is computed to its end")
        return slice(start, stop)

    def attend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, L, d] layer ``layer`` attends to, stored for the next forward: those just
        computed (a full forward), or the stored ones with the window's positions replaced by the fresh ones."""
        if self.window is not None:
            if layer not in self._keys:
                raise RuntimeError("KVCache: a windowed forward needs a full forward first (window=None)")
            start, stop = self.window
            stored_keys, stored_values = self._keys[layer], self._values[layer]
            keys = torch.cat([stored_keys[:, :, :start], keys, stored_keys[:, :, stop:]], dim=2)
            values = torch.cat([stored_values[:, :, :start], values, stored_values[:, :, stop:]], dim=2)
        self._keys[layer], self._values[layer] = keys, values
        return keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` under the name transformers' attention layers call on their ``Cache``."""
        return self.attend(layer_idx, keys, values)


def supports_kv_cache(model: nn.Module) -> bool:
    """True when ``model.forward`` names a ``kv_cache`` parameter (a ``**kwargs`` catch-all does not count:
    such a model would ignore the cache and compute every position)."""
    try:
        return "kv_cache" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False
