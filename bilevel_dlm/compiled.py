"""torch.compile and fast weights: what a compiled model needs so that the hooks binding fast weights take part.

Compile the model in place (``model.compile()``, or ``model.forward = torch.compile(model.forward)``), before or
after wrapping it. The fast weights are added by forward hooks bound for each step, after the model was
compiled; dynamo by default does not guard on module hooks (``skip_nnmodule_hook_guards``), so a graph traced
without them would run on, silently without memory. Importing this module (``bilevel_dlm.memory`` does) turns
those guards on, process-wide, so every graph compiled after ``import bilevel_dlm...`` checks the hooks it was
traced with; each memory keeps one hook function per target for its lifetime, so the guards see the same hooks
at every step and training stops compiling after its second step. Unrolled inner loops differentiate twice,
which torch.compile's AOTAutograd does not support: they are refused.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_compiled", "refuse_compiled_wrapper", "refuse_unrolled_if_compiled"]

torch._dynamo.config.skip_nnmodule_hook_guards = False


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules runs through torch.compile: compiled in place, or a forward
    replaced by a compiled one."""
    return any(getattr(module, "_compiled_call_impl", None) is not None
               or hasattr(module.forward, "_torchdynamo_orig_callable") for module in model.modules())


def refuse_compiled_wrapper(model: nn.Module) -> None:
    """A ``torch.compile(model)`` wrapper hides the model's modules (their layout is what the adapters read)."""
    if type(model).__name__ == "OptimizedModule":
        raise TypeError("MemoryWrapper got the wrapper torch.compile(model) returns, whose layout hides the model's "
                        "modules; compile the model in place instead (model.compile(), the same options) and pass it")


def refuse_unrolled_if_compiled(model: nn.Module, unrolled: bool) -> None:
    """Unrolled inner loops differentiate twice, which a compiled model cannot."""
    if unrolled and is_compiled(model):
        raise NotImplementedError("inner.mode='unrolled' differentiates through the inner updates (double backward), "
                                  "which torch.compile does not support; use mode='first_order' with a compiled "
                                  "model, or an eager one")
