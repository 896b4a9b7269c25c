"""Attention keys and values kept between denoising steps (Fast-dLLM's prefix and dual caches).

A forward with ``window`` None computes every position of the canvas and stores each attention layer's
keys and values. With ``window = (start, stop)`` it computes only those positions: their queries, keys and
values are fresh, and they attend to the stored keys and values everywhere else. ``stop`` at the canvas
end is the prefix cache (the current block and what follows it are recomputed), ``stop`` at the block end
is the dual cache. Stored entries outside the window are those of the last full forward: an
approximation of a bidirectional model (they would have seen the newly revealed tokens), exact when the
canvas has not changed since.

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
    """Per-layer keys and values [B, H, L, head_dim] of the last full forward, and the current window."""

    def __init__(self) -> None:
        self.window: tuple[int, int] | None = None
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def columns(self, length: int) -> slice:
        """The canvas positions the next forward computes."""
        return slice(0, length) if self.window is None else slice(*self.window)

    def attend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, L, d] layer ``layer`` attends to: those just computed (a full forward,
        which stores them), or the stored ones with the window's positions replaced by the fresh ones."""
        if self.window is None:
            self._keys[layer], self._values[layer] = keys, values
            return keys, values
        if layer not in self._keys:
            raise RuntimeError("KVCache: a windowed forward needs a full forward first (window=None)")
        start, stop = self.window
        stored_keys, stored_values = self._keys[layer], self._values[layer]
        return (torch.cat([stored_keys[:, :, :start], keys, stored_keys[:, :, stop:]], dim=2),
                torch.cat([stored_values[:, :, :start], values, stored_values[:, :, stop:]], dim=2))

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
