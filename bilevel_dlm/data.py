"""Batches: collation of examples and the canonical (x0, maskable, attention_mask) view of a batch.

A batch is a dict with ``input_ids`` [B, L] and optionally ``attention_mask`` (1 = real token) and
``labels`` (-100 = prompt / not supervised; other positions are maskable). Without labels every
attended token is maskable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["PreparedBatch", "prepare_batch", "pad_collate", "iterate_batches", "leading_real_tokens"]


@dataclass(frozen=True)
class PreparedBatch:
    """The canonical view of a batch. ``padded`` and ``has_maskable`` were read from the device once
    (one host sync per batch), so nothing later needs to ask again."""

    x0: torch.Tensor
    maskable: torch.Tensor
    attention_mask: torch.Tensor
    padded: bool = True
    has_maskable: bool = True

    @property
    def prompt(self) -> torch.Tensor:
        """Attended positions that are not maskable (the prompt)."""
        return self.attention_mask.bool() & ~self.maskable

    @property
    def model_attention_mask(self) -> torch.Tensor | None:
        """The attention mask to give the model: None for a batch without padding (the fast path)."""
        return self.attention_mask if self.padded else None


def leading_real_tokens(attention_mask: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [B, L]: the first ``count`` real (attended) tokens of every row, wherever the padding is."""
    return attention_mask.bool() & (attention_mask.long().cumsum(1) <= count)


def _as_long(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype.is_floating_point:
        raise TypeError(f"batch[{name!r}] must hold integers, got dtype {tensor.dtype}")
    return tensor.long()


def prepare_batch(batch: Mapping[str, Any], device: torch.device, protected_prefix: int = 0) -> PreparedBatch:
    """Validate a batch dict and derive the maskable positions (labels != -100, attended, and not among
    the first ``protected_prefix`` real tokens of the row)."""
    if "input_ids" not in batch:
        raise KeyError(f"a batch needs 'input_ids'; got keys {sorted(batch)}")
    x0 = _as_long(batch["input_ids"], "input_ids").to(device)
    if x0.dim() != 2:
        raise ValueError(f"batch['input_ids'] must be [batch, length], got shape {tuple(x0.shape)}")
    attention = batch.get("attention_mask")
    attention = torch.ones_like(x0) if attention is None else _as_long(attention, "attention_mask").to(device)
    labels = batch.get("labels")
    labels = torch.where(attention.bool(), x0, -100) if labels is None else _as_long(labels, "labels").to(device)
    for name, tensor in (("attention_mask", attention), ("labels", labels)):
        if tensor.shape != x0.shape:
            raise ValueError(f"batch[{name!r}] has shape {tuple(tensor.shape)}, input_ids {tuple(x0.shape)}")
    maskable = (labels != -100) & attention.bool()
    if protected_prefix:  # the first real tokens of each row (left padding moves them)
        maskable &= ~leading_real_tokens(attention, protected_prefix)
    full, has_maskable = torch.stack([attention.bool().all(), maskable.any()]).tolist()
    return PreparedBatch(x0=x0, maskable=maskable, attention_mask=attention, padded=not full, has_maskable=has_maskable)


def pad_collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples of varying length: pad id, attention 0 and label -100 on the padding."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
             "labels": torch.full((len(examples), length), -100, dtype=torch.long)}
    for row, example in enumerate(examples):
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
        n = ids.shape[0]
        batch["input_ids"][row, :n] = ids
        attention = example.get("attention_mask")
        batch["attention_mask"][row, :n] = 1 if attention is None else torch.as_tensor(attention, dtype=torch.long)
        labels = example.get("labels")
        batch["labels"][row, :n] = ids if labels is None else torch.as_tensor(labels, dtype=torch.long)
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _is_batch(item: Mapping[str, Any]) -> bool:
    return torch.as_tensor(item["input_ids"]).dim() == 2


def iterate_batches(
    data: Iterable[Mapping[str, Any]] | Dataset | DataLoader,
    batch_size: int,
    *,
    pad_token_id: int = 0,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    repeat: bool = True,
) -> Iterator[Mapping[str, Any]]:
    """Batches from a DataLoader (as is), a Dataset or list of examples (batched, reshuffled every epoch
    when ``shuffle``), or any other iterable of examples or batches (in its own order).

    With ``repeat`` the data is cycled (a new epoch each time it is exhausted).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def one_epoch() -> Iterator[Mapping[str, Any]]:
        if isinstance(data, DataLoader):
            yield from data
        elif isinstance(data, Dataset) or (isinstance(data, Sequence) and len(data) and not _is_batch(data[0])):
            loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                collate_fn=lambda ex: pad_collate(ex, pad_token_id))
            yield from loader
        else:
            pending: list[Mapping[str, Any]] = []
            for item in data:
                if _is_batch(item):
                    yield item
                    continue
                pending.append(item)
                if len(pending) == batch_size:
                    yield pad_collate(pending, pad_token_id)
                    pending = []
            if pending:
                yield pad_collate(pending, pad_token_id)

    while True:
        produced = False
        for batch in one_epoch():
            produced = True
            yield batch
        if not produced:
            raise ValueError(
                "the data produced no batch (empty, or a one-shot iterator that was already consumed: "
                "pass a list, a Dataset or a DataLoader to train for more than one epoch)"
            )
        if not repeat:
            return
