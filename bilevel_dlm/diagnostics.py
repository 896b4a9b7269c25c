"""Diagnostics for the two costs that matter beyond time: host syncs and peak tensor memory.

:class:`HostSyncCounter` counts the operations that make the host wait for the device: reads of tensor
data by Python (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.numpy()``), through
a TorchFunctionMode, and operators whose output shape depends on the data (``nonzero``,
``masked_select``, boolean-mask indexing, ``bincount``, ``unique``, ``repeat_interleave`` with tensor
repeats), through a TorchDispatchMode. On a CPU-only machine nothing actually waits, but the same code
on a GPU would, so the count is the number of syncs it would cost there.

:class:`LiveTensorBytes` tracks the peak bytes of tensor storages alive at once (every tensor an op
returns; a kernel's internal scratch buffers are not seen), for memory measurements on CPU, where
there is no allocator peak to read.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "LiveTensorBytes"]

_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}
_DATA_DEPENDENT = {
    torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.bincount.default,
    torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default, torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.repeat_interleave.Tensor, torch.ops.aten._local_scalar_dense.default,
}


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Reads(TorchFunctionMode):
    def __init__(self, owner: "HostSyncCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and self.owner.counts(args):
            self.owner.events[name] += 1
            self.owner.inside_read += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.owner.inside_read -= 1
        return func(*args, **(kwargs or {}))


class _Operators(TorchDispatchMode):
    def __init__(self, owner: "HostSyncCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.owner.inside_read:
            if func in _DATA_DEPENDENT:
                self.owner.events[str(func.overloadpacket.__name__)] += 1
            elif func is torch.ops.aten.index.Tensor and _has_bool_index(args):
                self.owner.events["bool_index"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.count`` (total) and ``c.events`` (by kind).

    ``device_only``: count reads of tensors off the CPU only (on a GPU, where a read of a CPU tensor, such as
    AdamW's step counters, waits for nothing); by default every read counts, as it would cost on a GPU."""

    def __init__(self, *, device_only: bool = False) -> None:
        self.events: Counter[str] = Counter()
        self.inside_read = 0
        self.device_only = device_only
        self._modes = (_Reads(self), _Operators(self))

    def counts(self, args: tuple) -> bool:
        tensor = args[0] if args else None
        return not (self.device_only and isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu")

    @property
    def count(self) -> int:
        return sum(self.events.values())

    def __enter__(self) -> "HostSyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counting every tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out
