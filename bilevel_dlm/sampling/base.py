"""What every sampler shares: the interface, the output, one generation run, and the reveal schedules.

A sampler is a frozen pydantic model (its fields are its settings, validated at construction) with a
``sample`` method. Generation starts from the prompt followed by ``max_new_tokens`` mask tokens and only
ever writes those new positions. The model is reached only through ``ModelView.logits``, so fast weights
bound by the caller (``with memory.bind(): sampler.sample(...)``) apply to every call.
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..forward import ModelView
from ..kv_cache import KVCache, supports_kv_cache

__all__ = ["Sampler", "BlockSampler", "SampleOutput", "GenerationRun", "even_split", "top_per_row", "reveal_confident",
           "reveal_fast_dllm", "reveal_share", "factor_count", "REVEAL_RULES"]


@dataclass
class SampleOutput:
    """``sequences`` [B, P + max_new_tokens] (prompt + generated); ``history``: the canvas [B, L] after
    every step when asked for; ``model_calls``: the number of forward passes (NFE)."""

    sequences: torch.Tensor
    history: list[torch.Tensor] | None = None
    model_calls: int = 0


@dataclass
class GenerationRun:
    """State of one ``sample`` call: the view, the canvas's attention mask, the random source and records."""

    view: ModelView
    attention_mask: torch.Tensor | None
    generator: torch.Generator | None
    forbidden: tuple[int, ...]
    history: list[torch.Tensor] | None = None
    model_calls: int = 0
    full_logits: bool = False
    on_block_end: Callable[[torch.Tensor, int], None] | None = None

    @property
    def model_changes_at_block_end(self) -> bool:
        """Whether ``on_block_end`` may change the model (memory re-adapted): stored keys and values go stale."""
        return self.on_block_end is not None

    def block_done(self, canvas: torch.Tensor, end: int) -> None:
        """Tell the caller that every new token before column ``end`` is committed (memory refresh)."""
        if self.on_block_end is not None:
            self.on_block_end(canvas, end)

    def logits(
        self,
        canvas: torch.Tensor,
        mask_ratio: torch.Tensor | None = None,
        *,
        unconditional: torch.Tensor | None = None,
        cfg_scale: float = 0.0,
        attention_mask: torch.Tensor | None = None,
        columns: slice | None = None,
        kv_cache: KVCache | None = None,
        allow_mask: bool = False,
    ) -> torch.Tensor:
        """Aligned logits [B, L, V] of the canvas (or [B, n, V] at ``columns``; the sampler's ``full_logits``
        applies the head everywhere first), forbidden tokens (the mask first, unless ``allow_mask``) at -inf.
        With ``kv_cache`` the model computes the cache's window only (:meth:`ModelView.logits`).

        With ``unconditional`` (the canvas with its prompt masked) a second forward gives u and the result
        is classifier-free guided: ``u + (cfg_scale + 1) (c - u)``. The two passes are separate forwards so
        that per-sample memory, bound for a batch of B rows, applies to both. ``attention_mask`` replaces
        the canvas's padding mask for this call (a sampler's own attention pattern).
        """
        attention = self.attention_mask if attention_mask is None else attention_mask
        logits = self.view.logits(canvas, attention, mask_ratio, columns, kv_cache, self.full_logits)
        self.model_calls += 1
        if unconditional is not None:
            plain = self.view.logits(unconditional, attention, mask_ratio, columns, head_everywhere=self.full_logits)
            self.model_calls += 1
            logits = plain + (cfg_scale + 1) * (logits - plain)
        forbidden = self.forbidden[1:] if allow_mask else self.forbidden
        return logits.index_fill(-1, torch.tensor(forbidden, device=logits.device, dtype=torch.long), float("-inf"))

    def open_cache(self, sampler: str, mode: str) -> KVCache | None:
        """A fresh :class:`KVCache` for ``mode`` other than ``"none"``; refuses a model whose forward takes none."""
        if mode == "none":
            return None
        if not supports_kv_cache(self.view.model):
            raise ValueError(f"{type(self.view.model).__name__}.forward takes no kv_cache parameter, so {sampler} "
                             f"cannot reuse keys and values (cache={mode!r}); use cache='none', or a native model that "
                             "supports it (the native LLaDA, LLaDA-MoE, Dream and LLaDA2 classes of "
                             "bilevel_dlm.integrations)")
        return KVCache()

    def cache_step(self, cache: KVCache | None, refresh: bool, start: int, stop: int) -> None:
        """Before a cached forward: a full forward that stores every layer's keys and values (``refresh``),
        or one computing columns ``start`` to ``stop`` only (and the adapter's ``hidden_lookback`` columns
        before ``start``, whose hidden states predict the tokens from ``start`` on)."""
        if cache is not None:
            cache.window = None if refresh else (max(start - self.view.backbone.hidden_lookback, 0), stop)

    def uniform(
        self, shape: torch.Size | tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device, dtype=dtype)

    def gumbel(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Standard Gumbel noise in float64: ``argmax(log p + g)`` draws from ``p``."""
        u = self.uniform(shape, device, torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
        return -torch.log(-torch.log(u))

    def record(self, canvas: torch.Tensor) -> None:
        if self.history is not None:
            self.history.append(canvas.clone())


class Sampler(BaseModel):
    """Base class: settings as validated fields, ``sample`` for the shared set-up, ``_generate`` per family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Samplers that commit the new tokens block by block call GenerationRun.block_done after each block.
    decodes_in_blocks: ClassVar[bool] = False

    steps: int | None = Field(None, gt=0, description="denoising steps; None = one step per new token")
    suppress_tokens: tuple[int, ...] = Field((), description="token ids never generated (e.g. EOS)")
    full_logits: bool = Field(False, description="apply the head at every position (the plain path), not only "
                                                  "where tokens can be revealed")

    @property
    def canvas_margin(self) -> int:
        """Columns the sampler may add after the new tokens at most (to complete a block): a prompt plus
        ``max_new_tokens`` plus this must fit in the model's length."""
        return 0

    @property
    def draws_random_numbers(self) -> bool:
        """Whether decoding draws from the generator (sampling): then a batch row's draws depend on the
        rows beside it, and only deterministic decoding makes a batch row equal to the row alone."""
        return getattr(self, "temperature", 0.0) > 0

    @torch.no_grad()
    def sample(
        self,
        view: ModelView,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        return_history: bool = False,
        on_block_end: Callable[[torch.Tensor, int], None] | None = None,
    ) -> SampleOutput:
        """Generate ``max_new_tokens`` tokens after each prompt of ``input_ids`` [B, P].

        ``attention_mask`` [B, P] (1 = keep) marks padding; batched prompts of different lengths are
        left-padded, so every row continues at column P. Random draws come from ``generator`` (on the
        device of ``input_ids``). Put the model in eval mode first: dropout would make decoding random.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt_length], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        batch, prompt_length = input_ids.shape
        new = input_ids.new_full((batch, max_new_tokens), view.mask_token_id)
        canvas = torch.cat([input_ids, new], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(new, dtype=attention_mask.dtype)], dim=1)
        forbidden = (view.mask_token_id, *self.suppress_tokens)
        if on_block_end is not None and not self.decodes_in_blocks:
            raise ValueError(f"{type(self).__name__} does not decode in blocks, so it has no block ends to report; "
                             "use a block sampler (llada, dream, block_diffusion) for memory refreshed while decoding")
        run = GenerationRun(view, attention_mask, generator, forbidden, [] if return_history else None,
                            full_logits=self.full_logits, on_block_end=on_block_end)
        sequences = self._generate(run, canvas, prompt_length, self.steps or max_new_tokens)
        return SampleOutput(sequences, run.history, run.model_calls)

    @abstractmethod
    def _generate(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, steps: int) -> torch.Tensor:
        """Fill the mask tokens after column ``prompt_length`` of ``canvas`` [B, L] (may be edited in place)."""


class BlockSampler(Sampler):
    """A sampler that fills the new tokens block by block, with the options its families share: parallel
    decoding (``threshold`` or ``factor``: a step may reveal more than its share) and a KV cache rebuilt
    at each block's first step."""

    decodes_in_blocks: ClassVar[bool] = True

    block_length: int | None = Field(None, gt=0, description="tokens per block, filled left to right; None = one block")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="parallel decoding: also reveal the masked "
                                    "tokens of the block this confident (see threshold_rule); None = the share only")
    factor: float | None = Field(None, gt=0.0, description="factor-based parallel decoding: reveal the n most "
                                 "confident, (i + 1)(1 - c_i) <= factor for each (see threshold_rule)")
    threshold_rule: Literal["fast_dllm", "share"] = Field(
        "fast_dllm", description="with threshold / factor: 'fast_dllm' (Fast-dLLM's rule: the most confident masked "
        "token plus every one >= threshold, or the factor count, at least one and all when only the last fails, each "
        "step until the block is full; the step schedule and steps are unused) or 'share' (every one > threshold, or "
        "the factor count, if at least the step's share are, else the share; at least one; at most steps forwards "
        "per block)")
    cache: Literal["none", "prefix", "dual"] = Field("none", description="reuse keys and values between the "
                                                     "steps of a block: of the prefix, or of prefix and suffix")
    cache_refresh: int | None = Field(None, gt=0, description="with a cache: a full forward every this many steps "
                                      "of a block; None = at the block's first step only")

    @model_validator(mode="after")
    def _check_block_options(self) -> "BlockSampler":
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold= and factor= are two rules for how many tokens a step reveals; set one of them")
        if self.cache_refresh is not None and self.cache == "none":
            raise ValueError("cache_refresh sets how often a KV cache is rebuilt; choose a cache (cache='prefix'), "
                             "or leave cache_refresh out")
        return self

    @property
    def decodes_in_parallel(self) -> bool:
        """Whether a step may reveal more than its share (threshold or factor decoding is set)."""
        return self.threshold is not None or self.factor is not None

    def _block_steps(self, per_block: int) -> Iterable[int]:
        """The step indices of one block: ``per_block`` of them, or until the block is full under Fast-dLLM's
        rule, which ignores the schedule (every step reveals at least one token, so it ends)."""
        return itertools.count() if self.decodes_in_parallel and self.threshold_rule == "fast_dllm" else range(per_block)

    def _reveal(self, confidence: torch.Tensor, masked: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """The masked positions [B, N] to reveal in one step whose schedule gives ``share`` [B] tokens a row."""
        if not self.decodes_in_parallel:
            return reveal_confident(confidence, masked, share)
        return REVEAL_RULES[self.threshold_rule](confidence, masked, share, self.threshold, self.factor)

    def _blocks(self, prompt_length: int, length: int, steps: int) -> tuple[list[slice], int]:
        """The blocks of new tokens (canvas columns) and the steps each gets; refused unless the new tokens
        and the steps both split evenly over the blocks."""
        new_tokens = length - prompt_length
        block_length = self.block_length or new_tokens
        if new_tokens % block_length:
            raise ValueError(f"max_new_tokens={new_tokens} is not a multiple of block_length={block_length}; "
                             "choose a block_length that divides it")
        blocks = [slice(start, start + block_length) for start in range(prompt_length, length, block_length)]
        if steps % len(blocks):
            raise ValueError(f"steps={steps} cannot be split evenly over {len(blocks)} blocks; use a multiple of "
                             f"{len(blocks)} steps")
        return blocks, steps // len(blocks)

    def _cache_step(self, run: GenerationRun, cache: KVCache | None, step: int, block: slice, length: int) -> None:
        """Before ``step`` of ``block``: a full forward every ``cache_refresh`` steps of the block (at its
        first), otherwise the block and what follows it (prefix) or the block alone (dual)."""
        run.cache_step(cache, refreshes(step, self.cache_refresh), block.start,
                       length if self.cache == "prefix" else block.stop)


def even_split(total: torch.Tensor, parts: int) -> torch.Tensor:
    """Split each count of ``total`` [B] into ``parts`` near-equal integers [B, parts], remainder first."""
    base, remainder = total // parts, total % parts
    return base[:, None] + (torch.arange(parts, device=total.device) < remainder[:, None]).long()


def top_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: the ``counts[b]`` highest ``scores`` of row b (ties go to the leftmost position)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks < counts[:, None]


def reveal_confident(confidence: torch.Tensor, masked: torch.Tensor, minimum: torch.Tensor,
                     threshold: float | None = None, factor: float | None = None) -> torch.Tensor:
    """Bool [B, N] of the masked positions to reveal in one step.

    Without ``threshold`` or ``factor``: the ``minimum[b]`` most confident masked positions of each row.
    With ``threshold``: every masked position whose confidence exceeds it when a row has at least
    ``minimum[b]`` of them, otherwise that row's ``minimum[b]`` most confident (confidence-threshold
    parallel decoding). With ``factor``: the ``max(n, minimum[b])`` most confident, n from
    :func:`factor_count` (Fast-dLLM's factor-based parallel decoding).
    """
    confidence = confidence.masked_fill(~masked, float("-inf"))
    if factor is not None:
        return top_per_row(confidence, torch.maximum(factor_count(confidence, masked, factor), minimum)) & masked
    scheduled = top_per_row(confidence, minimum) & masked
    if threshold is None:
        return scheduled
    above = masked & (confidence > threshold)
    return torch.where((above.sum(1) >= minimum)[:, None], above, scheduled)


def reveal_share(confidence: torch.Tensor, masked: torch.Tensor, share: torch.Tensor, threshold: float | None = None,
                 factor: float | None = None) -> torch.Tensor:
    """Parallel decoding bounded by the schedule: :func:`reveal_confident` with at least one token a step (a
    share of 0, which Dream's schedule and a block with more steps than tokens give, would waste the forward)."""
    return reveal_confident(confidence, masked, share.clamp_min(1), threshold, factor)


def reveal_fast_dllm(confidence: torch.Tensor, masked: torch.Tensor, share: torch.Tensor | None = None,
                     threshold: float | None = None, factor: float | None = None) -> torch.Tensor:
    """Fast-dLLM's ``get_transfer_index`` with a threshold: the most confident masked position of each row
    plus every masked position with confidence >= ``threshold``. With ``factor``, its
    ``get_transfer_index_dynamic``: the :func:`factor_count` most confident (at least one), and all of them
    when only the last one fails the bound (its code's rule, kept for parity). The schedule's ``share`` is
    ignored, as Fast-dLLM ignores it."""
    if threshold is None and factor is None:
        raise ValueError("Fast-dLLM's rule needs a threshold or a factor")
    masked_count = masked.sum(-1)
    confidence = confidence.masked_fill(~masked, float("-inf"))
    if factor is not None:
        count = torch.maximum(factor_count(confidence, masked, factor), masked.any(-1).long())
        count = torch.where(count == masked_count - 1, masked_count, count)
        return top_per_row(confidence, count) & masked
    return (top_per_row(confidence, masked.any(-1).long()) | (confidence >= threshold)) & masked


REVEAL_RULES = {"share": reveal_share, "fast_dllm": reveal_fast_dllm}


def factor_count(confidence: torch.Tensor, masked: torch.Tensor, factor: float) -> torch.Tensor:
    """[B]: the largest n such that the i-th most confident masked position of the row has
    ``(i + 1) (1 - confidence) <= factor`` for every i <= n; the most confident one always counts (0 for
    a row with nothing masked). Fast-dLLM's rule (its code's last-position exception is
    :func:`reveal_fast_dllm`'s)."""
    ranked = confidence.masked_fill(~masked, float("-inf")).sort(-1, descending=True).values
    rank = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device, dtype=ranked.dtype)
    within = ((rank + 1) * (1 - ranked) <= factor) & (ranked > float("-inf"))
    within[:, 0] = masked.any(-1)
    return within.long().cumprod(-1).sum(-1)


def refreshes(step: int, every: int | None) -> bool:
    """Whether a cached sampler's ``step`` (counted from its last forced refresh) runs the full forward:
    every ``every`` steps, or only step 0 when ``every`` is None."""
    return step % every == 0 if every else step == 0
