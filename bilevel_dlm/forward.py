"""Model calls through a backbone adapter: final hidden states, and logits only where they are needed.

The LM head is the most expensive single layer of a large-vocabulary model, and the losses only look
at a few positions. We therefore stop the model's forward at the input of its LM head (a pre-hook
captures the final hidden states and interrupts the call), align them with the adapter, and apply
the head to the selected rows only. This touches no model code and works for any model whose head
is a module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbone import Backbone
from .kv_cache import KVCache
from .selection import Selection

__all__ = ["ModelView", "final_hidden"]


class _HeadReached(Exception):
    """Raised by the head pre-hook to stop the forward once the final hidden states are known."""


def final_hidden(
    backbone: Backbone,
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mask_ratio: torch.Tensor | None = None,
    kv_cache: KVCache | None = None,
) -> torch.Tensor:
    """Final hidden states [B, L, d] aligned so that position i predicts token i ([B, n, d] of the
    window of a ``kv_cache``)."""
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _HeadReached

    handle = backbone.output_head(model).register_forward_pre_hook(capture)
    try:
        extra = {} if kv_cache is None else {"kv_cache": kv_cache}
        backbone.call(model, input_ids, attention_mask, mask_ratio, **extra)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"{type(backbone).__name__}.output_head(model) was never called during the forward; "
            "the adapter must return the module that produces the vocabulary logits."
        )
    return backbone.align_hidden(captured[0])


@dataclass
class ModelView:
    """A model seen through its adapter: hidden states and aligned (log-)logits on demand."""

    backbone: Backbone
    model: nn.Module
    mask_token_id: int

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, mask_ratio: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        return final_hidden(self.backbone, self.model, input_ids, attention_mask, mask_ratio, kv_cache)

    def head(self, hidden_rows: torch.Tensor, input_rows: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (at least float32) for hidden rows [..., d] whose input tokens are ``input_rows``."""
        logits = self.backbone.output_head(self.model)(hidden_rows)
        if logits.element_size() < 4:
            logits = logits.float()
        return self.backbone.finalize_logits(logits, input_rows, self.mask_token_id)

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_ratio: torch.Tensor | None = None,
        columns: slice | None = None,
        kv_cache: KVCache | None = None,
        head_everywhere: bool = False,
    ) -> torch.Tensor:
        """Aligned logits [B, L, V] at every position, or [B, n, V] at the canvas ``columns`` (a contiguous
        slice) only: samplers apply the head, often the largest layer, to the positions that can be
        revealed, not to the prompt. With a ``kv_cache`` the model computes its window only, and the logits
        cover the columns it can give: the window, less the ``backbone.hidden_lookback`` columns after a
        start > 0 (their aligned hidden states come from before the window). ``head_everywhere`` applies the
        head to every computed position before selecting the columns (the plain path, for comparison)."""
        hidden = self.hidden(input_ids, attention_mask, mask_ratio, kv_cache)
        computed = slice(0, input_ids.shape[1]) if kv_cache is None else kv_cache.columns(input_ids.shape[1])
        rows = self.window_columns(columns, computed, input_ids.shape[1])
        input_ids = input_ids[:, computed]
        if head_everywhere:
            return self.head(hidden, input_ids)[:, rows]
        return self.head(hidden[:, rows], input_ids[:, rows])

    def window_columns(self, columns: slice | None, computed: slice, length: int) -> slice:
        """Canvas ``columns`` of a canvas of ``length`` (None: all the forward gives logits for) as columns of
        the ``computed`` window; refused where the window misses them or the columns before them that their
        aligned hidden states come from."""
        lookback = self.backbone.hidden_lookback if computed.start > 0 else 0
        if columns is None:
            return slice(lookback, computed.stop - computed.start)
        start, stop, step = columns.indices(length)
        if step != 1:
            raise ValueError(f"columns must be a contiguous slice, got step {step}")
        if start - lookback < computed.start or stop > computed.stop:
            raise ValueError(
                f"columns [{start}, {stop}) need the window to compute columns [{start - lookback}, {stop}), but it "
                f"computes [{computed.start}, {computed.stop}); widen the KVCache window"
            )
        return slice(start - computed.start, stop - computed.start)

    def logits_at(
        self,
        select: Selection,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_ratio: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, V] at the selected positions, plus the hidden states [N, d] there."""
        rows = select.take(self.hidden(input_ids, attention_mask, mask_ratio))
        return self.head(rows, select.take(input_ids)), rows
