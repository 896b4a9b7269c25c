"""Iterative denoising generation for masked diffusion LMs, one sampler per backbone family.

``make_sampler("llada", steps=64, block_length=32)`` builds a sampler by name; ``default_sampler(backbone)``
the one of a backbone family. Bind adapted memory around ``sample`` to generate with it::

    with memory.bind():
        out = sampler.sample(view, input_ids, attention_mask, max_new_tokens=64)
"""

from __future__ import annotations

from typing import Any

from ..backbone import Backbone
from .base import BlockSampler, GenerationRun, Sampler, SampleOutput
from .block import BlockDiffusionSampler
from .dream import DreamSampler
from .llada import LLaDASampler
from .mdlm import MDLMSampler

__all__ = [
    "SAMPLERS",
    "BlockDiffusionSampler",
    "BlockSampler",
    "DreamSampler",
    "GenerationRun",
    "LLaDASampler",
    "MDLMSampler",
    "SampleOutput",
    "Sampler",
    "default_sampler",
    "make_sampler",
]

SAMPLERS: dict[str, type[Sampler]] = {"llada": LLaDASampler, "dream": DreamSampler, "mdlm": MDLMSampler,
                                      "block_diffusion": BlockDiffusionSampler}


def make_sampler(name: str, **settings: Any) -> Sampler:
    """The sampler registered as ``name``, built from keyword settings (validated; unknown keys raise)."""
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
    return SAMPLERS[name](**settings)


def default_sampler(backbone: Backbone, **settings: Any) -> Sampler:
    """The generation algorithm of a backbone family (``backbone.default_sampler``)."""
    return make_sampler(backbone.default_sampler, **settings)
