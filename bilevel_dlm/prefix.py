"""Share the blocks below the first fast weight between passes that see the same input.

The anchor stage of the inner loop and the outer pass both run on x_t, and the blocks below the
first fast weight do not depend on the memory, so their outputs are identical. ``PrefixReplay``
records those block outputs (with their autograd graph into theta) during the first pass and, in
the later pass, temporarily puts stand-ins into the block list that return the recorded outputs
instead of recomputing them. The model's own forward code runs unchanged.

Sharing is exact only when recomputing would give the same outputs. A prefix that draws random
numbers (dropout in the embeddings or the early blocks, an outer LoRA's dropout) would give the outer
pass other masks than the recorded pass, so a recording during which the random state advanced is
discarded (:attr:`PrefixReplay.recorded` is then false) and the outer pass recomputes the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["PrefixReplay", "frozen", "random_state", "same_random_state"]


@contextmanager
def frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop recording gradients for these parameters."""
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)


def _detached(value: Any, known: dict[int, torch.Tensor], add: bool) -> Any:
    """``value`` with its tensors detached: every tensor when ``add`` (recording them in ``known`` by
    identity), otherwise only tensors already in ``known``."""
    if isinstance(value, torch.Tensor):
        if add:
            known.setdefault(id(value), value.detach())
        return known.get(id(value), value)
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v, known, add) for v in value)
    return value


def random_state(device: torch.device) -> list[torch.Tensor]:
    """The host and (for an accelerator) the device's default generator state; host-side reads only."""
    states = [torch.random.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state(device))
    return states


def same_random_state(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    """True when no random number was drawn from the default generators in between."""
    return all(torch.equal(a, b) for a, b in zip(before, after))


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
        """True once an exact recording exists (none was made, or it drew random numbers: recompute)."""
        return self.outputs is not None

    @contextmanager
    def record(self, theta: Sequence[nn.Parameter] = (), *, graph_above: bool = True) -> Iterator[None]:
        """Record the first forward's prefix outputs (later calls, e.g. checkpoint recomputation, are ignored).

        With ``graph_above=False`` (first-order inner loop) only the prefix keeps theta's graph: once the
        prefix has run, the parameters ``theta`` stop recording gradients, the first block above gets
        detached inputs, and later blocks get the same detached tensors for the inputs they share with it
        (an MDLM's time conditioning, rotary tables); their hidden-state input carries the memory's graph
        and stays. The rest of the pass builds the graph of the fast weights alone.
        """
        outputs: list[Any] = [None] * self.n
        seen = [False] * self.n
        parameters = next(self.blocks.parameters(), None)
        device = parameters.device if parameters is not None else torch.device("cpu")
        start = random_state(device)
        exact = [True]
        above, frozen_above = ExitStack(), [False]

        def keep(index: int):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if seen[index]:
                    return
                seen[index], outputs[index] = True, output
                if index == self.n - 1:
                    exact[0] = same_random_state(start, random_state(device))
            return hook

        known: dict[int, torch.Tensor] = {}

        def detach_inputs(first: bool):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if first and not frozen_above[0]:
                    frozen_above[0] = True
                    above.enter_context(frozen(theta))
                return _detached(args, known, first), _detached(kwargs, known, first)
            return hook

        handles = [self.blocks[i].register_forward_hook(keep(i)) for i in range(self.n)]
        if not graph_above:
            handles += [self.blocks[i].register_forward_pre_hook(detach_inputs(i == self.n), with_kwargs=True)
                        for i in range(self.n, len(self.blocks))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            above.close()
        self.outputs = outputs if all(seen) and exact[0] else None

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
