"""The Engine protocol: what the modules behind :class:`~bilevel_dlm.wrapper.MemoryWrapper` (training,
saving, adaptation, generation, evaluation) read and call on the object they work for.

They depend on this protocol, not on the façade, so no module imports the wrapper that imports it;
``MemoryWrapper`` is the implementation, and any object with these members can be trained or saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .backbone import Backbone
    from .config import MemDLMConfig
    from .contracts import FastWeights, InnerMethod, InnerResult, OuterObjective
    from .data import PreparedBatch
    from .forward import ModelView
    from .history import History
    from .noise import Anchor
    from .rng import RandomSource

__all__ = ["Engine"]


class Engine(Protocol):
    """The model and its parts (backbone adapter, view, inner method and memory, outer objective), the
    optimizer with its schedule, the counters of the non-finite / divergence guards, and the step's pieces."""

    model: nn.Module
    peft_model: nn.Module | None
    config: MemDLMConfig
    backbone: Backbone
    view: ModelView
    tokenizer: Any
    inner: InnerMethod
    memory: FastWeights
    outer: OuterObjective
    device: torch.device
    max_length: int | None
    generator: torch.Generator
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    skipped_batches: int
    updates: int
    nonfinite_run: int
    last_finite: tuple[int, dict[str, float]] | None
    weight_norm: float | None
    trained_on: dict[str, Any] | None
    prompt_memory: FastWeights | None

    @property
    def mask_token_id(self) -> int: ...
    def configure_optimizers(self, max_steps: int | None) -> None: ...
    def prepare(self, batch: Mapping[str, Any], where: str = "batch") -> PreparedBatch: ...
    def bilevel_context(self) -> AbstractContextManager: ...
    def random_source(self, batch: PreparedBatch) -> RandomSource: ...
    def compute_loss(self, batch: PreparedBatch) -> tuple[torch.Tensor, InnerResult, Anchor]: ...
    def trainable_parameters(self) -> list[nn.Parameter]: ...
    def step(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]: ...
    def eval_loss(self, data: Iterable[Mapping[str, Any]], memory: str = "off", *, batch_size: int = 8) -> float: ...
    def pad_token_id(self) -> int: ...
    def check_savable(self) -> None: ...
    def save_pretrained(self, directory: str | Path, *, training_state: dict[str, Any] | None = None) -> Path: ...
    def restore_training(self, directory: str | Path, *, allow_pickle: bool = False
                         ) -> tuple[History, int, int, dict[str, Any] | None]: ...
    def adapt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              seed: int | None = None) -> FastWeights: ...
