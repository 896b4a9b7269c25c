"""Batches: collation of examples and the canonical (x0, maskable, attention_mask) view of a batch.

A batch is a dict with ``input_ids`` [B, L] and optionally ``attention_mask`` (1 = real token) and
``labels`` (-100 = prompt / not supervised; other positions are maskable). Without labels every
attended token is maskable.

Training data has one global order: :class:`EpochOrder` permutes the examples of each epoch from (seed,
epoch) alone, and every example carries its ``example_index`` and ``epoch`` (:class:`IndexedExamples`), so
the random draws of a step are keyed by example (:class:`~bilevel_dlm.rng.KeyedRandom`) and the order is
the same whether it is split over ranks, micro-batches or both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .rng import example_keys

__all__ = ["PreparedBatch", "prepare_batch", "pad_collate", "iterate_batches", "BatchStream", "leading_real_tokens",
           "EpochOrder", "IndexedExamples", "KEY_FIELDS", "document_attention_mask"]

KEY_FIELDS = ("example_index", "epoch")  # what keys an example's random draws (bilevel_dlm.rng.KeyedRandom)


@dataclass(frozen=True)
class PreparedBatch:
    """The canonical view of a batch. ``padded`` and ``has_maskable`` were read from the device once
    (one host sync per batch), so nothing later needs to ask again."""

    x0: torch.Tensor
    maskable: torch.Tensor
    attention_mask: torch.Tensor
    padded: bool = True
    has_maskable: bool = True
    random_keys: torch.Tensor | None = None  # [B]: keys of the rows' (epoch, example index); None without them
    document_ids: torch.Tensor | None = None  # [B, L]: packed documents kept apart in attention; None: one sequence

    @property
    def prompt(self) -> torch.Tensor:
        """Attended positions that are not maskable (the prompt)."""
        return self.attention_mask.bool() & ~self.maskable

    @property
    def model_attention_mask(self) -> torch.Tensor | None:
        """The attention mask to give the model: None for a batch without padding (the fast path); with
        ``document_ids``, a bool [B, 1, L, L] mask where a token attends the real tokens of its own document
        (and itself, so that no row of the softmax is empty)."""
        if self.document_ids is not None:
            return document_attention_mask(self.document_ids, self.attention_mask)
        return self.attention_mask if self.padded else None


def document_attention_mask(document_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, L, L]: query i may attend key j when both are in the same document and j is a real token,
    and always itself (block-diagonal attention over packed documents)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    itself = torch.eye(document_ids.shape[1], dtype=torch.bool, device=document_ids.device)
    return ((same & attention_mask.bool()[:, None, :]) | itself)[:, None]


def leading_real_tokens(attention_mask: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [B, L]: the first ``count`` real (attended) tokens of every row, wherever the padding is."""
    return attention_mask.bool() & (attention_mask.long().cumsum(1) <= count)


def _as_long(value: Any, name: str, where: str, *, bool_ok: bool = False) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or (tensor.dtype == torch.bool and not bool_ok):
        raise TypeError(f"{where}: {name!r} must hold integers, got dtype {tensor.dtype}; pass token ids "
                        "(torch.long), not embeddings, probabilities or masks")
    return tensor.long()


def prepare_batch(
    batch: Mapping[str, Any],
    device: torch.device,
    protected_prefix: int = 0,
    *,
    vocab_size: int | None = None,
    max_length: int | None = None,
    mask_token_id: int | None = None,
    where: str = "batch",
) -> PreparedBatch:
    """Validate a batch dict and derive the maskable positions (labels != -100, attended, and not among
    the first ``protected_prefix`` real tokens of the row).

    Checked, with messages naming ``where``, the field and the fix: keys, integer dtypes (an attention mask
    may be bool), shapes, empty batches, token ids in ``[0, vocab_size)``, no mask token among the attended
    inputs, labels that are -100 or the input token, an attention mask of 0 / 1 and lengths up to
    ``max_length``. The value checks and the batch's flags are read from the device in one sync.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"{where}: a batch needs 'input_ids' (and optionally 'labels', 'attention_mask'); got {keys}")
    x0 = _as_long(batch["input_ids"], "input_ids", where).to(device)
    if x0.dim() != 2:
        raise ValueError(f"{where}: 'input_ids' must be [batch, length], got shape {tuple(x0.shape)} "
                         "(add a batch dimension with ids[None] for a single sequence)")
    if x0.numel() == 0:
        raise ValueError(f"{where}: 'input_ids' has shape {tuple(x0.shape)}; it needs at least one row and one token")
    if max_length is not None and x0.shape[1] > max_length:
        raise ValueError(f"{where}: sequences of {x0.shape[1]} tokens exceed the model's maximum length {max_length}; "
                         "truncate or split them")
    attention = batch.get("attention_mask")
    attention = (torch.ones_like(x0) if attention is None
                 else _as_long(attention, "attention_mask", where, bool_ok=True).to(device))
    _check_shape(attention, x0, "attention_mask", where)
    labels = batch.get("labels")
    labels = torch.where(attention.bool(), x0, -100) if labels is None else _as_long(labels, "labels", where).to(device)
    _check_shape(labels, x0, "labels", where)
    maskable = (labels != -100) & attention.bool()
    if protected_prefix:  # the first real tokens of each row (left padding moves them)
        maskable &= ~leading_real_tokens(attention, protected_prefix)
    masks_in_input = (x0 == mask_token_id) & attention.bool() if mask_token_id is not None else torch.zeros_like(maskable)
    keys = _random_keys(batch, x0, where)
    documents = batch.get("document_ids")
    if documents is not None:
        documents = _as_long(documents, "document_ids", where).to(device)
        _check_shape(documents, x0, "document_ids", where)
    checks = torch.stack([attention.bool().all(), maskable.any(), x0.min(), x0.max(), attention.min(), attention.max(),
                          attention.bool().any(1).all(), masks_in_input.sum(),
                          ((labels != -100) & (labels != x0) & attention.bool()).sum()]).tolist()
    full, has_maskable, smallest, largest, low, high, every_row_attended, masks, foreign_labels = checks
    if low < 0 or high > 1:
        raise ValueError(f"{where}: 'attention_mask' holds values in [{low}, {high}]; it must be 1 (real token) or 0 (padding)")
    if not every_row_attended:
        raise ValueError(f"{where}: a row is all padding (attention_mask all 0); drop empty rows")
    if smallest < 0 or (vocab_size is not None and largest >= vocab_size):
        valid = f"0..{vocab_size - 1}" if vocab_size is not None else "non-negative ids"
        raise ValueError(f"{where}: 'input_ids' holds token ids in [{smallest}, {largest}] but the model takes {valid}; "
                         "encode the data with the model's tokenizer (padding included)")
    if masks:
        raise ValueError(f"{where}: 'input_ids' holds the mask token (id {mask_token_id}) at {masks} attended "
                         "position(s); it marks the positions the model predicts, so data and prompts must not contain "
                         "it (encode text without the mask token, or pad with another id)")
    if foreign_labels:
        raise ValueError(f"{where}: {foreign_labels} label(s) of attended positions are neither -100 nor the input "
                         "token there; a masked diffusion model predicts its own input tokens, so labels are a copy "
                         "of input_ids with -100 on the prompt and padding")
    return PreparedBatch(x0=x0, maskable=maskable, attention_mask=attention, padded=not full, has_maskable=has_maskable,
                         random_keys=keys, document_ids=documents)


def _random_keys(batch: Mapping[str, Any], x0: torch.Tensor, where: str) -> torch.Tensor | None:
    """The rows' keys from ``example_index`` [B] and ``epoch`` ([B] or one value; 0 when absent)."""
    if batch.get("example_index") is None:
        return None
    fields = []
    for name in KEY_FIELDS:
        value = _as_long(batch.get(name, 0), name, where).to(x0.device)
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != x0.shape[0]):
            raise ValueError(f"{where}: {name!r} has shape {tuple(value.shape)}; it needs one entry per row of "
                             f"'input_ids' ({x0.shape[0]})")
        fields.append(value.expand(x0.shape[0]))
    return example_keys(fields[1], fields[0])


def _check_shape(tensor: torch.Tensor, x0: torch.Tensor, name: str, where: str) -> None:
    if tensor.shape != x0.shape:
        raise ValueError(f"{where}: {name!r} has shape {tuple(tensor.shape)} but 'input_ids' {tuple(x0.shape)}; "
                         "they must match position by position")


def pad_collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples of varying length: pad id, attention 0 and label -100 on the padding."""
    for index, example in enumerate(examples):
        _check_example(example, index)
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
    if all(example.get("document_ids") is not None for example in examples):  # packed documents; padding: -1
        batch["document_ids"] = torch.full((len(examples), length), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            batch["document_ids"][row, : len(example["input_ids"])] = torch.as_tensor(example["document_ids"])
    for name in KEY_FIELDS:  # kept when every example has it
        if all(example.get(name) is not None for example in examples):
            batch[name] = torch.as_tensor([int(example[name]) for example in examples], dtype=torch.long)
    return batch


def _check_example(example: Mapping[str, Any], index: int) -> None:
    """An example is a dict of 1D integer sequences of one length, with 'input_ids'."""
    where = f"example {index} of the batch"
    if not isinstance(example, Mapping) or "input_ids" not in example:
        keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise KeyError(f"{where}: an example needs 'input_ids' (and optionally 'labels', 'attention_mask'); got {keys}")
    ids = _as_long(example["input_ids"], "input_ids", where)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{where}: 'input_ids' must be a non-empty 1D sequence, got shape {tuple(ids.shape)}")
    for name in ("labels", "attention_mask", "document_ids"):
        if example.get(name) is not None:
            values = _as_long(example[name], name, where)
            if values.shape != ids.shape:
                raise ValueError(f"{where}: {name!r} has {values.numel()} entries but 'input_ids' {ids.numel()}; "
                                 "they must match position by position")


def _is_batch(item: Mapping[str, Any]) -> bool:
    return torch.as_tensor(item["input_ids"]).dim() == 2


class EpochOrder(Sampler):
    """One global order of ``size`` examples per epoch, a function of (seed, epoch) alone: a permutation
    (``shuffle``) or 0..size-1. It yields ``(epoch, index)`` for :class:`IndexedExamples`; the Trainer (via
    ``set_epoch``) and ``fit`` split it into micro-batches and ranks in order, so every topology with the
    same global batch sees the same examples in each optimizer step."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.order(self.epoch))

    def __len__(self) -> int:
        return self.size


class IndexedExamples(Dataset):
    """``data[index]`` with its ``example_index`` and ``epoch``, looked up by :class:`EpochOrder`'s pairs.

    ``set_epoch`` forwards to ``order``: accelerate reaches a loader's dataset where the sampler is wrapped
    too deep for it (2 processes and a resumed epoch: a skipping sampler around the rank's shard)."""

    def __init__(self, data: Sequence[Mapping[str, Any]] | Dataset, order: EpochOrder | None = None) -> None:
        self.data, self.order = data, order

    def set_epoch(self, epoch: int) -> None:
        if self.order is not None:
            self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        example = self.data[index]
        if not isinstance(example, Mapping):
            raise TypeError(f"training example {index} is a {type(example).__name__}; an example is a dict with "
                            "'input_ids' (and optionally 'labels', 'attention_mask')")
        return {**example, "example_index": index, "epoch": epoch}


def _with_stream_keys(batch: Mapping[str, Any], epoch: int, first: int) -> Mapping[str, Any]:
    """A batch of an iterable without example indices: its rows are examples first, first + 1, ... of the
    epoch's stream."""
    if batch.get("example_index") is not None:
        return batch
    rows = torch.as_tensor(batch["input_ids"]).shape[0]
    return {**batch, "example_index": torch.arange(first, first + rows), "epoch": torch.full((rows,), epoch)}


class BatchStream:
    """Batches from a Dataset or list of examples (in :class:`EpochOrder`, reshuffled every epoch when
    ``shuffle``), a DataLoader (as is) or any other iterable of examples or batches (in its own order).
    Examples are collated by ``collate_fn`` (default: :func:`pad_collate` with ``pad_token_id``).
    Every batch carries its rows' ``example_index`` and ``epoch``: the dataset index, or for a DataLoader
    or iterable the position in the epoch's stream (unless it brings its own).

    With ``repeat`` the data is cycled (a new epoch each time it is exhausted). ``epoch_batches`` is
    the number of batches of the last complete epoch (None until one has completed), so a caller can
    tell when a whole pass over the data has gone by.
    """

    def __init__(
        self,
        data: Iterable[Mapping[str, Any]] | Dataset | DataLoader,
        batch_size: int,
        *,
        pad_token_id: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        repeat: bool = True,
        collate_fn: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if generator is not None:
            warnings.warn("BatchStream(generator=...) is deprecated: the order is drawn from (seed, epoch); pass "
                          "seed=<int> (taken from the generator's initial seed now)", DeprecationWarning, stacklevel=3)
            seed = generator.initial_seed()
        self.data, self.batch_size, self.pad_token_id = data, batch_size, pad_token_id
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
        self.collate = collate_fn or (lambda examples: pad_collate(examples, pad_token_id))
        self.epoch_batches: int | None = None
        self._batches = self._stream()

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Mapping[str, Any]:
        return next(self._batches)

    def _one_epoch(self, epoch: int) -> Iterator[Mapping[str, Any]]:
        data = self.data
        if isinstance(data, DataLoader):
            yield from self._keyed(data, epoch)
        elif isinstance(data, Dataset) or (isinstance(data, Sequence) and len(data) and not _is_batch(data[0])):
            order = EpochOrder(len(data), self.seed, self.shuffle)
            order.set_epoch(epoch)
            yield from DataLoader(IndexedExamples(data, order), batch_size=self.batch_size, sampler=order,
                                  collate_fn=self.collate)
        else:
            yield from self._keyed(self._batched(data), epoch)

    def _batched(self, data: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        pending: list[Mapping[str, Any]] = []
        for item in data:
            if _is_batch(item):
                yield item
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                yield self.collate(pending)
                pending = []
        if pending:
            yield self.collate(pending)

    @staticmethod
    def _keyed(batches: Iterable[Mapping[str, Any]], epoch: int) -> Iterator[Mapping[str, Any]]:
        first = 0
        for batch in batches:
            batch = _with_stream_keys(batch, epoch, first)
            first += torch.as_tensor(batch["input_ids"]).shape[0]
            yield batch

    def _stream(self) -> Iterator[Mapping[str, Any]]:
        epoch = 0
        while True:
            produced = 0
            for batch in self._one_epoch(epoch):
                produced += 1
                yield batch
            if not produced:
                raise ValueError(
                    "the data produced no batch (empty, or a one-shot iterator that was already consumed: "
                    "pass a list, a Dataset or a DataLoader to train for more than one epoch)"
                )
            self.epoch_batches = produced
            epoch += 1
            if not self.repeat:
                return


def iterate_batches(data: Iterable[Mapping[str, Any]] | Dataset | DataLoader, batch_size: int, **options: Any
                    ) -> BatchStream:
    """A :class:`BatchStream` over ``data`` (options: pad_token_id, shuffle, seed, repeat, collate_fn)."""
    return BatchStream(data, batch_size, **options)
