"""MemoryParams: fast weights ("parametric memory") kept outside the model and bound by forward hooks.

While bound, every target linear computes ``y + scale * x A^T B^T`` (LoRA) or ``y + x dW^T`` (full
delta). The fast weights are plain float32 tensors, not parameters of the model, so ``parameters()``,
``state_dict()``, optimizers, DDP buckets and gradient clipping never see them, and unbinding leaves
the model exactly as it was. With ``per_sample=True`` every tensor has a leading batch dimension and
sample b only ever sees row b.

The tensors are never updated in place: :meth:`set` swaps in new objects, so a graph (or a gradient
checkpoint) that used the old ones stays valid until its backward has run.

Token-mixing targets (MoE experts) see the routed tokens of the whole batch as ``[n, d]`` rows; with
per-sample memory each row gets its own sample's delta, from the routing the model declares
(:mod:`bilevel_dlm.routing`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled  # noqa: F401  (turns on dynamo's guards on module hooks: see bilevel_dlm.compiled)
from .backbone import Backbone, detect_backbone, resolve_targets
from .config import MemoryConfig
from .contracts import FastWeights
from .rng import KeyedRandom, RandomSource, RowSharedRandom, row_uniform
from .routing import current_routed_tokens

__all__ = ["MemoryParams", "first_memory_block"]


def first_memory_block(n_blocks: int, layer_fraction: float) -> int:
    """Index of the first block with fast weights: the last ``layer_fraction`` of the blocks."""
    return min(int(n_blocks * (1.0 - layer_fraction)), n_blocks - 1)


class MemoryParams(FastWeights):
    """Fast weights for the target linears of a model's last blocks.

    Args:
        model: the backbone model (unwrapped: not a DDP wrapper).
        config: where the fast weights go and their shape (default: the MemDLM preset).
        backbone: the adapter (detected from the model when omitted).
        per_sample: one set of fast weights per sample (leading batch dim) instead of one shared set
            (default: ``config.per_sample``).
        dtype: dtype of the fast weights and of the delta computation (default: ``config.dtype``,
            float32 whatever the base dtype; float64 for finite-difference checks).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MemoryConfig | None = None,
        *,
        backbone: Backbone | None = None,
        per_sample: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.config = config or MemoryConfig()
        self.backbone = backbone or detect_backbone(model)
        self.per_sample = self.config.per_sample if per_sample is None else per_sample
        self.dtype = dtype or getattr(torch, self.config.dtype)
        n_blocks = len(self.backbone.blocks(model))
        self.first_block = first_memory_block(n_blocks, self.config.layer_fraction)
        blocks = list(range(self.first_block, n_blocks))
        self.targets = resolve_targets(self.backbone, model, self._patterns(model), blocks)
        mixing = resolve_targets(self.backbone, model, self.backbone.token_mixing_targets, blocks, strict=False)
        self._token_mixing = frozenset(i for i, path in enumerate(self.targets) if path in mixing)
        if self.per_sample and self._token_mixing and not self.backbone.reports_routed_tokens(model):
            self._refuse_token_mixing(model)
        self.names: tuple[str, ...] = tuple(
            f"{path}.{part}" for path in self.targets for part in self._parts()
        )
        self.device = next(model.parameters()).device
        self._model = model
        self._values: tuple[torch.Tensor, ...] = ()
        self.batch_size: int | None = None
        self._bind_depth = 0
        self._handles: list = []
        # One hook function per target for the memory's lifetime: a compiled model's guards on module hooks
        # (bilevel_dlm.compiled turns them on) then see the same hooks at every bind, so nothing recompiles.
        self._hooks = [self._hook(index, path) for index, path in enumerate(self.targets)]
        # Indices (into ``values``) of the fast weights whose module ran since the last clear: a fast
        # weight that was used must receive a gradient (InnerLoop checks).
        self.used_values: set[int] = set()

    # ----- construction ----------------------------------------------------------------------
    def _patterns(self, model: nn.Module) -> tuple[str, ...]:
        targets = self.config.targets
        if targets == "ffn":
            return self.backbone.ffn_target_patterns(model)
        if targets == "ffn+attention":
            return self.backbone.ffn_target_patterns(model) + self.backbone.attention_target_patterns(model)
        return tuple(targets)

    def _refuse_token_mixing(self, model: nn.Module) -> None:
        paths = list(self.targets)
        mixed = sorted(paths[i] for i in self._token_mixing)
        raise ValueError(
            f"per-sample fast weights on modules that see the tokens of several samples mixed together "
            f"({len(mixed)} such targets, e.g. {mixed[0]!r}: MoE experts) need the model to report which "
            f"sample each routed token came from, and this {type(model).__name__} object does not "
            "(bilevel_dlm.routing). Load the checkpoint with the library's native model class, use shared "
            "memory (per_sample=False) and adapt one sample at a time, or choose other targets."
        )


    def _parts(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if self.config.kind == "lora" else ("delta",)

    def _shapes(self, module: nn.Module) -> tuple[tuple[int, int], ...]:
        d_in, d_out, r = module.in_features, module.out_features, self.config.rank
        return ((r, d_in), (d_out, r)) if self.config.kind == "lora" else ((d_out, d_in),)

    def spawn(self, per_sample: bool) -> "MemoryParams":
        """An empty memory with this one's targets, form and dtype (per-prompt memory for ``adapt``)."""
        return MemoryParams(self._model, self.config, backbone=self.backbone, per_sample=per_sample, dtype=self.dtype)

    # ----- state -------------------------------------------------------------------------------
    @property
    def values(self) -> tuple[torch.Tensor, ...]:
        if not self._values:
            raise RuntimeError("memory is empty: call reset() before binding or reading the fast weights")
        return self._values

    def reset(self, batch_size: int | None = None, generator: RandomSource = None,
              initial: Sequence[torch.Tensor] | None = None) -> None:
        """Fresh fast weights: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (delta W = 0); full delta = 0; or
        copies of ``initial`` (one unbatched tensor per name, e.g. a meta-learned initialisation; their
        autograd graph is kept, so an unrolled inner loop differentiates through them).

        Per-sample memory starts every row from the same values, so a batch adapts exactly like each
        of its rows would alone; with a :class:`~bilevel_dlm.rng.KeyedRandom` source each row draws its
        own example's values instead (the same on any batch). Old tensors (and any graph hanging on
        them) are dropped.
        """
        if self.per_sample and batch_size is None:
            raise ValueError("per-sample memory needs reset(batch_size=...)")
        self.batch_size = batch_size if self.per_sample else None
        if initial is None and self.per_sample and isinstance(generator, KeyedRandom):
            self._values = self._draw(batch_size, generator)
            return
        if initial is None:
            initial = self.initial_values(generator)
        elif [tuple(v.shape) for v in initial] != (expected := list(self._value_shapes())):
            raise ValueError(f"initial must be {len(self.names)} unbatched tensors of shapes {expected}, "
                             f"got {[tuple(v.shape) for v in initial]}")
        values = [value.to(self.device, self.dtype) for value in initial]
        if self.per_sample:
            values = [value.expand(batch_size, *value.shape).clone() for value in values]
        self._values = tuple(value if value.requires_grad else value.clone() for value in values)

    def _value_shapes(self) -> Iterator[tuple[int, ...]]:
        for module in self.targets.values():
            yield from self._shapes(module)

    def initial_values(self, generator: RandomSource = None) -> tuple[torch.Tensor, ...]:
        """One fresh draw of the unbatched tensors (kaiming-uniform A, zero B / zero full delta); a keyed
        source draws it from one key for the whole batch."""
        source = generator.pooled() if isinstance(generator, KeyedRandom) else generator
        return tuple(value[0] for value in self._draw(1, source))

    def _draw(self, rows: int, source: RandomSource) -> tuple[torch.Tensor, ...]:
        """``rows`` fresh draws [rows, *shape] of every tensor, row r from ``source``'s row r."""
        if isinstance(source, RowSharedRandom):  # one stream for all tensors: every row draws the same values
            source = source.generator(self.device)
        values = []
        for shape, part in zip(self._value_shapes(), itertools.cycle(self._parts())):
            if part == "lora_A":
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, in]
                draws = row_uniform(rows, math.prod(shape), source, self.device, self.dtype)
                value = (draws.reshape(rows, *shape) * 2 - 1) * bound
            else:
                value = torch.zeros(rows, *shape, device=self.device, dtype=self.dtype)
            values.append(value)
        return tuple(values)

    def clear(self) -> None:
        """Drop the fast weights (and every graph hanging on them)."""
        self._values = ()
        self.batch_size = None

    def set(self, values: Sequence[torch.Tensor]) -> None:
        """Replace the fast weights by new tensors (never modified in place)."""
        values = tuple(values)
        if len(values) != len(self.names):
            raise ValueError(f"expected {len(self.names)} fast-weight tensors, got {len(values)}")
        self._values = values

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state`; names must match exactly."""
        missing = set(self.names) ^ set(state)
        if missing:
            raise KeyError(f"fast-weight names differ from this memory's: {sorted(missing)[:5]}")
        values = tuple(state[name].to(self.device, self.dtype) for name in self.names)
        self.batch_size = values[0].shape[0] if self.per_sample else None
        self._values = values

    def requires_grad_(self, flag: bool = True) -> "MemoryParams":
        """Make the current fast weights leaves that record (or stop recording) gradients."""
        self._values = tuple(v.detach().requires_grad_(flag) for v in self.values)
        return self

    # ----- binding -----------------------------------------------------------------------------
    @contextmanager
    def bind(self) -> Iterator["MemoryParams"]:
        """While active, the target linears add the fast-weight delta to their output.

        Re-entrant: nested binds of the same memory register the hooks once. Keep the memory bound
        until the backward of every forward that used it has run (gradient checkpointing recomputes
        the forward during backward and must see the same fast weights).
        """
        if self._bind_depth == 0:
            self._register()
        self._bind_depth += 1
        try:
            yield self
        finally:
            self._bind_depth -= 1
            if self._bind_depth == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """While active, a bound memory adds nothing (its hooks are off); bound again on exit."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        try:
            yield
        finally:
            if self._bind_depth:
                self._register()

    def _register(self) -> None:
        self._handles = [module.register_forward_hook(hook) for hook, module in zip(self._hooks, self.targets.values())]

    def _hook(self, index: int, path: str):
        lora = self.config.kind == "lora"
        offset = index * len(self._parts())
        scale = self.config.scale
        dropout = self.config.dropout
        routed = self.per_sample and index in self._token_mixing

        used = range(offset, offset + len(self._parts()))

        def add_delta(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self.used_values.update(used)
            x = args[0]
            if self.per_sample and not routed and x.shape[0] != self.batch_size:
                raise RuntimeError(
                    f"per-sample memory for batch size {self.batch_size} got input of shape "
                    f"{tuple(x.shape)} at {path}; reset(batch_size=...) to the batch being run"
                )
            x = x.to(self.dtype)
            if dropout and module.training:
                x = F.dropout(x, dropout)
            weights = self.values[offset : offset + len(self._parts())]
            if routed:
                delta = self._routed_delta(x, weights, path)
            elif lora:
                delta = (x @ weights[0].mT) @ weights[1].mT * scale
            else:
                delta = x @ weights[0].mT
            return output + delta.to(output.dtype)

        return add_delta

    def _routed_delta(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], path: str) -> torch.Tensor:
        """Per-sample delta for routed rows x [n, in]: row i uses the fast weights of its own sample.

        Every sample's projection is formed and all but the row's own zeroed, so the result is one
        matmul of inner size B * r (no per-sample loop, no host sync).
        """
        routed = current_routed_tokens()
        if routed is None:
            raise RuntimeError(
                f"per-sample memory at {path} (a token-mixing target) needs the model to declare the routed "
                "tokens of each expert call (bilevel_dlm.routing.routed_tokens); this forward did not"
            )
        own = F.one_hot(routed.samples, self.batch_size).to(x.dtype)  # [n, B]
        if self.config.kind == "lora":
            a, b = weights  # [B, r, in], [B, out, r]
            projected = torch.einsum("nd,brd->nbr", x, a) * own[:, :, None]
            return projected.flatten(1) @ b.transpose(1, 2).flatten(0, 1) * self.config.scale
        return torch.einsum("nd,bod,nb->no", x, weights[0], own)

