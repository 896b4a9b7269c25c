"""Block-diffusion decoding of the LLaDA2.x releases (their modeling file's ``generate``), token for token.

Every row's real tokens (prompt, then the new tokens) are cut into blocks of ``block_length`` counted
from the row's first real token, as the release cuts its unpadded canvas, and the canvas runs to the end
of the last block (``whole_blocks``: the extra mask tokens of that block take part in decoding and are
dropped at the end). Attention is block-causal: a query in block i sees the keys of blocks <= i (never
padding). The blocks holding new tokens are filled one after the other. The argmax token of every
position and its confidence come from a softmax over the whole vocabulary, the mask token included
(``softmax_over_mask``: so the argmax can be the mask token, which leaves the position masked).

LLaDA2.0 (``editing_threshold=None``): a block gets ``s = min(steps, max_new_tokens // minimal_topk)``
steps (at least one: the release runs none and returns masks when ``max_new_tokens < minimal_topk``);
step i reveals every masked position whose confidence exceeds ``threshold`` if there are at least ``n_i``
of them, otherwise the ``n_i`` most confident, where ``n`` splits ``block_length`` over the s steps
(remainder first) whatever the block's masked count (``schedule="release"``; ``"masked"`` splits the
block's own masked count instead). A block ends when nothing in it is masked.

LLaDA2.1 (``editing_threshold`` set; the release's defaults are 0.9, ``max_post_steps=16``,
``num_to_transfer=1``): no step schedule. Each pass over the block reveals every masked position above
``threshold`` if at least ``num_to_transfer`` are, else the ``num_to_transfer`` most confident, and, in the
same pass, replaces every already revealed new token of the block whose argmax differs from it with
confidence above ``editing_threshold`` (token editing). Once the block has no mask it makes editing-only
passes until one changes nothing or ``max_post_steps`` of them have run. A pass that changes nothing while
masks remain (the argmax there is the mask token) ends the block for that row at temperature 0, where every
later pass would repeat it (the release loops forever there); at a temperature, after ``4 x block_length``
such passes.

After a block, a row whose new tokens hold EOS is done (``stop_at_eos``); decoding stops when every row is,
and everything after a row's first EOS becomes EOS (the release stops there and cuts after the first EOS;
later blocks never change earlier ones, so the tokens up to it are those of a run without the stop).

Under block-causal attention no position sees a later block, so every forward runs the canvas up to the
end of the current block only (as the release does). With ``cache="prefix"`` the first block's first step
stores every layer's keys and values; a later block's first step computes the previous block (revealed
since it was stored) and the current one, its other steps the current block alone (its prompt tokens
included: they see the block's new tokens; edits stay inside the current block, which every pass
recomputes). The stored entries are those a full forward would compute, so the tokens equal
``cache="none"`` (up to floating-point summation order). When the memory is re-adapted after every block
(``generate(adapt="blocks")``) each block's first step is a full forward again: keys and values computed
under the old memory are stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..kv_cache import KVCache
from .base import GenerationRun, Sampler, even_split, reveal_confident

__all__ = ["BlockDiffusionSampler", "block_causal_mask"]


def block_causal_mask(block_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: query i may attend key j iff j is real and block(j) <= block(i); a padded
    query sees itself only (no empty softmax row)."""
    allowed = (block_ids[:, None, :] <= block_ids[:, :, None]) & real[:, None, :]
    allowed = allowed | torch.eye(block_ids.shape[1], dtype=torch.bool, device=block_ids.device)[None]
    return allowed[:, None]


class BlockDiffusionSampler(Sampler):
    """LLaDA2.x block diffusion; the defaults are the LLaDA2.0 release's ``generate`` (see the module
    docstring), ``editing_threshold=0.9`` gives LLaDA2.1's. ``steps`` counts the steps of one block (None:
    ``block_length``, the release's 32 for blocks of 32)."""

    decodes_in_blocks: ClassVar[bool] = True

    block_length: int = Field(32, gt=0, description="tokens per block (LLaDA2 releases: 32)")
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="reveal every masked token above this confidence")
    temperature: float = Field(0.0, ge=0.0, description="token sampling temperature; 0 = argmax")
    cache: Literal["none", "prefix"] = Field("none", description="reuse the committed blocks' keys and values "
                                             "between the steps of a block (exact under block-causal attention)")
    minimal_topk: int = Field(1, gt=0, description="LLaDA2.0: at most max_new_tokens // minimal_topk steps a block")
    schedule: Literal["release", "masked"] = Field("release", description="LLaDA2.0's reveals per step: "
                                                   "block_length split over the steps (the release) or the block's "
                                                   "masked count split over them")
    whole_blocks: bool = Field(True, description="decode the last block whole (the release), its tokens past "
                               "max_new_tokens dropped at the end; False: the canvas ends at max_new_tokens")
    softmax_over_mask: bool = Field(True, description="argmax and confidence over the whole vocabulary, the mask "
                                    "token included (the release); False: the mask token is never proposed")
    stop_at_eos: bool = Field(True, description="a row is done after a block that holds EOS, and every token after "
                              "its first EOS becomes EOS (the release's stop and cut)")
    eos_token_id: int | None = Field(None, description="EOS for stop_at_eos; None: the model config's eos_token_id")
    editing_threshold: float | None = Field(None, gt=0.0, le=1.0, description="LLaDA2.1: replace revealed tokens "
                                            "whose argmax differs with a confidence above this; None: LLaDA2.0")
    max_post_steps: int = Field(16, ge=0, description="LLaDA2.1: editing-only passes after a block is full, at most")
    num_to_transfer: int = Field(1, gt=0, description="LLaDA2.1: tokens a pass reveals when fewer are above threshold")

    @model_validator(mode="after")
    def _check(self) -> "BlockDiffusionSampler":
        if self.editing_threshold is not None and (self.steps is not None or self.schedule != "release"
                                                   or self.minimal_topk != 1):
            raise ValueError("LLaDA2.1's editing loop (editing_threshold=) has no step schedule: leave steps, schedule "
                             "and minimal_topk out, or set editing_threshold=None for LLaDA2.0's scheduled steps")
        return self

    @property
    def canvas_margin(self) -> int:
        """Up to ``block_length - 1`` mask tokens complete the last block with ``whole_blocks``."""
        return self.block_length - 1 if self.whole_blocks else 0

    def _generate(self, run: GenerationRun, canvas: torch.Tensor, prompt_length: int, steps: int) -> torch.Tensor:
        mask_id = run.view.mask_token_id
        length = canvas.shape[1]
        real = torch.ones_like(canvas, dtype=torch.bool) if run.attention_mask is None else run.attention_mask.bool()
        if self.whole_blocks:
            canvas, real = self._to_whole_blocks(canvas, real, mask_id)
        position = real.long().cumsum(1) - 1
        block_ids = torch.where(real, torch.div(position, self.block_length, rounding_mode="floor"), -1)
        attention = block_causal_mask(block_ids, real)
        new = real.clone()
        new[:, :prompt_length] = False
        first_block = block_ids[:, prompt_length]  # the block of each row's first new token
        blocks = int((block_ids.max(1).values - first_block).max()) + 1
        per_block = min(self.steps or self.block_length, max((length - prompt_length) // self.minimal_topk, 1))
        eos = self._eos_ids(run)
        done = torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.device)
        cache = run.open_cache(type(self).__name__, self.cache)
        # Where a block's first step starts computing: the previous block's first column (revealed since it was
        # stored); None = a full forward (the first block, or a memory re-adapted after every block).
        previous_start = None
        for offset in range(blocks):
            in_block = block_ids == (first_block + offset)[:, None]
            block_start = int(in_block.any(0).nonzero()[0, 0])  # prompt tokens of the block: recomputed too
            current = new & in_block
            columns = current.any(0).nonzero()[:, 0]  # the span of the rows' current blocks: logits there only
            span = slice(int(columns[0]), int(columns[-1]) + 1)
            block = _Block(canvas, attention, current[:, span], span, block_start, previous_start, cache,
                           self.softmax_over_mask)
            if self.editing_threshold is None:
                self._scheduled_block(run, block, per_block, mask_id)
            else:
                self._editing_block(run, block, mask_id)
            if self.stop_at_eos and eos:
                done |= torch.isin(canvas[:, prompt_length:span.stop], torch.tensor(eos, device=canvas.device)).any(1)
                if bool(done.all()):
                    break
            if offset < blocks - 1:
                run.block_done(canvas, span.stop)
            previous_start = None if run.model_changes_at_block_end else block_start
        sequences = canvas[:, :length]
        return self._cut_after_eos(sequences, prompt_length, eos) if self.stop_at_eos and eos else sequences

    def _scheduled_block(self, run: GenerationRun, block: "_Block", per_block: int, mask_id: int) -> None:
        """LLaDA2.0: at most ``per_block`` steps, each revealing by the threshold or the step's count."""
        canvas, span = block.canvas, block.span
        if self.schedule == "release":
            counts = even_split(torch.full((canvas.shape[0],), self.block_length, device=canvas.device), per_block)
        else:
            counts = even_split((block.current & (canvas[:, span] == mask_id)).sum(1), per_block)
        for step in range(per_block):
            masked = block.current & (canvas[:, span] == mask_id)
            if not bool(masked.any()):
                break
            proposal, confidence = self._propose(run, block.logits(run, step))
            reveal = reveal_confident(confidence, masked, counts[:, step], self.threshold)
            canvas[:, span] = torch.where(reveal, proposal, canvas[:, span])
            run.record(canvas)

    def _editing_block(self, run: GenerationRun, block: "_Block", mask_id: int) -> None:
        """LLaDA2.1: passes that reveal (joint threshold) and edit, then editing-only passes (per row)."""
        canvas, span = block.canvas, block.span
        rows = canvas.shape[0]
        working = block.current.any(1)  # rows with new tokens in this block
        post_steps = torch.zeros(rows, dtype=torch.long, device=canvas.device)
        idle = torch.zeros(rows, dtype=torch.long, device=canvas.device)  # passes in a row that changed nothing
        patience = 1 if self.temperature == 0 else 4 * self.block_length
        minimum = torch.full((rows,), self.num_to_transfer, device=canvas.device)
        step = 0
        while True:
            old = canvas[:, span].clone()
            masked = block.current & (old == mask_id)
            full = ~masked.any(1)
            post_steps += (full & working).long()
            working &= ~(full & (post_steps > self.max_post_steps))
            if not bool(working.any()):
                break
            proposal, confidence = self._propose(run, block.logits(run, step))
            reveal = reveal_confident(confidence, masked, minimum, self.threshold)
            editable = block.current & ~masked
            edit = editable & (confidence > self.editing_threshold) & (proposal != old)
            change = (reveal | edit) & working[:, None]
            canvas[:, span] = torch.where(change, proposal, old)
            run.record(canvas)
            changed = (canvas[:, span] != old).any(1)
            idle = torch.where(changed, 0, idle + 1)
            working &= ~(full & ~(edit & working[:, None]).any(1)) & (idle < patience)
            step += 1

    def _propose(self, run: GenerationRun, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, L] (argmax, or Gumbel-max in float64 at ``temperature``) and their probability."""
        if self.temperature > 0:
            proposal = (logits.double() / self.temperature + run.gumbel(logits.shape, logits.device)).argmax(-1)
        else:
            proposal = logits.argmax(-1)
        scaled = logits.float() if self.temperature == 0 else logits.float() / self.temperature
        return proposal, scaled.softmax(-1).gather(-1, proposal[..., None]).squeeze(-1)

    def _to_whole_blocks(self, canvas: torch.Tensor, real: torch.Tensor, mask_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The canvas extended with mask tokens to the end of each row's last block (columns past a row's own
        last block are padding: not real)."""
        first = real.long().argmax(1)  # each row's first real column (left padding)
        ends = first + (real.sum(1) + self.block_length - 1) // self.block_length * self.block_length
        extra = int(ends.max()) - canvas.shape[1]
        if extra <= 0:
            return canvas, real
        columns = torch.arange(canvas.shape[1], canvas.shape[1] + extra, device=canvas.device)
        canvas = torch.cat([canvas, canvas.new_full((canvas.shape[0], extra), mask_id)], 1)
        return canvas, torch.cat([real, columns[None] < ends[:, None]], 1)

    def _eos_ids(self, run: GenerationRun) -> tuple[int, ...]:
        """The EOS ids that end a row (the setting, else the model config's), or () without any."""
        configured = getattr(getattr(run.view.model, "config", None), "eos_token_id", None)
        value = self.eos_token_id if self.eos_token_id is not None else configured
        return tuple(value) if isinstance(value, (list, tuple)) else (() if value is None else (int(value),))

    @staticmethod
    def _cut_after_eos(sequences: torch.Tensor, prompt_length: int, eos: tuple[int, ...]) -> torch.Tensor:
        """Every new token after a row's first EOS set to that EOS."""
        generated = sequences[:, prompt_length:]
        is_eos = torch.isin(generated, torch.tensor(eos, device=generated.device))
        after = is_eos.long().cumsum(1) - is_eos.long() > 0
        first = generated.gather(1, is_eos.long().argmax(1, keepdim=True)).expand_as(generated)
        sequences[:, prompt_length:] = torch.where(after, first, generated)
        return sequences


@dataclass
class _Block:
    """One block being decoded: the canvas, its block-causal attention, the rows' new positions in the
    block's column ``span``, where its cached forwards start, and whether the mask token keeps its logit."""

    canvas: torch.Tensor
    attention: torch.Tensor
    current: torch.Tensor
    span: slice
    block_start: int
    previous_start: int | None
    cache: KVCache | None
    allow_mask: bool

    def logits(self, run: GenerationRun, step: int) -> torch.Tensor:
        """Logits [B, span, V] of the canvas up to the block's end; cached forwards compute from the previous
        block (first step) or the block's start (later steps) only."""
        start = self.block_start if step else self.previous_start
        run.cache_step(self.cache, start is None, start or 0, self.span.stop)
        seen = self.canvas[:, : self.span.stop]
        seen_attention = self.attention[:, :, : self.span.stop, : self.span.stop]
        return run.logits(seen, attention_mask=seen_attention, columns=self.span, kv_cache=self.cache,
                          allow_mask=self.allow_mask)
