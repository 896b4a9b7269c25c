"""How a log-likelihood request is tokenized and which Monte Carlo masks score it: the published rules of
LLaDA's evaluation (``eval_llada.py``; dllm's MDLM / LLaDA harness draws the same masks) and of dllm's
Dream evaluation.

Both estimate ``log p(continuation | context)`` by the masked-diffusion ELBO: for draw d with masked set
M_d of the continuation and masked fraction p_d, ``-(1 / D) sum_d sum_{i in M_d} CE_i / p_d``. They
differ in how the masks are drawn:

- ``llada``: the draws come in groups of ``rows`` (one forward each); a group picks k ~ U{1..T} once and
  row i masks exactly ``x_i = ((round(k + i T / rows) - 1) mod T) + 1`` of the T continuation tokens, chosen
  by a random permutation; p = x_i / T (at least one token masked in every draw).
- ``dream``: a group draws u ~ U(0, 1) once; row i has t_i = (u + i / rows) mod 1 and
  p_i = (1 - eps) t_i + eps, and masks every continuation token independently with probability p_i; the
  sequence's first and last positions are never masked (dllm's ``log_type="ftb"``, ``sampling_eps=1e-3``).

and in how a pair is tokenized: ``llada`` is lm-eval's ``TemplateLM._encode_pair`` (the context's trailing
whitespace moves into the continuation; the whole string is encoded and split at the context's length),
``dream`` is dllm's variant of it, which appends EOS to the whole string (so the last, never-masked
position is EOS) and can prefix the BOS text (``add_bos_token``). An empty context is lm-eval's prefix
token for both (dllm's Dream harness would leave it empty, so that its first, never-masked position would
be the continuation's first token).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from lm_eval.api.model import TemplateLM

__all__ = ["LikelihoodProtocol", "LLaDAProtocol", "DreamProtocol", "PROTOCOLS", "fit_to_length"]


class LikelihoodProtocol(ABC):
    """One reference's tokenization of a (context, continuation) pair and its Monte Carlo masks."""

    name: ClassVar[str]
    checks_greedy: ClassVar[bool]  # the reference's default for computing is_greedy
    guides: ClassVar[bool]  # whether the reference applies classifier-free guidance to log-likelihoods

    @abstractmethod
    def group_sizes(self, mc_num: int, batch_size: int) -> list[int]:
        """How many draws each forward scores, for ``mc_num`` draws ``batch_size`` at a time."""

    @abstractmethod
    def encode_pair(self, lm: TemplateLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a non-empty context and of the continuation."""

    def encode(self, lm: TemplateLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context and of the continuation; an empty context is lm-eval's prefix token
        (``TemplateLM.loglikelihood``: BOS, else EOS, unless the continuation starts with it)."""
        if context:
            return self.encode_pair(lm, context, continuation)
        target = self.encode_target(lm, continuation)
        return ([lm.prefix_token_id], target) if target[:1] != [lm.prefix_token_id] else (target[:1], target[1:])

    def encode_target(self, lm: TemplateLM, continuation: str) -> list[int]:
        """The continuation alone, for an empty context."""
        return lm.tok_encode(continuation, add_special_tokens=False)

    @abstractmethod
    def draw(self, context_length: int, target_length: int, rows: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One group of ``rows`` draws: masks [rows, context_length + target_length] (bool, True only on
        continuation positions) and the masked fraction p [rows] that weighs each draw's CE by 1 / p."""


class LLaDAProtocol(LikelihoodProtocol):
    """LLaDA's ``_forward_process``: a stratified count of masked continuation tokens per draw."""

    name = "llada"
    checks_greedy = True  # LLaDAEvalHarness(is_check_greedy=True)
    guides = True  # its cfg

    def group_sizes(self, mc_num: int, batch_size: int) -> list[int]:
        """``mc_num / batch_size`` groups (LLaDA asserts that it divides; here the last group is smaller)."""
        return [min(batch_size, mc_num - first) for first in range(0, mc_num, batch_size)]

    def encode_pair(self, lm: TemplateLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return TemplateLM._encode_pair(lm, context, continuation)

    def draw(self, context_length: int, target_length: int, rows: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(torch.randint(1, target_length + 1, (), generator=generator))
        counts = torch.round(torch.linspace(float(k), k + (rows - 1) * (target_length / rows), steps=rows)).long()
        counts = (counts - 1) % target_length + 1
        masks = torch.zeros(rows, context_length + target_length, dtype=torch.bool)
        for row, count in enumerate(counts.tolist()):
            chosen = torch.randperm(target_length, generator=generator)[:count]
            masks[row, context_length + chosen] = True
        return masks, counts.float() / target_length


class DreamProtocol(LikelihoodProtocol):
    """dllm's Dream harness: Bernoulli masks at stratified times, first and last positions kept."""

    name = "dream"
    checks_greedy = False  # dllm's Dream harness returns is_greedy=False
    guides = False  # dllm's Dream harness guides only its sampler

    def group_sizes(self, mc_num: int, batch_size: int) -> list[int]:
        """``max(mc_num // batch_size, 1)`` full groups, as dllm runs them."""
        return [batch_size] * max(mc_num // batch_size, 1)

    def __init__(self, sampling_eps: float = 1e-3, add_bos_token: bool = False) -> None:
        if not 0 < sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps}")
        self.sampling_eps, self.add_bos_token = sampling_eps, add_bos_token

    def encode_pair(self, lm: TemplateLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
        tokenizer = lm.tokenizer
        if self.add_bos_token:
            if tokenizer.bos_token is None:
                raise ValueError("add_bos_token=True but the tokenizer has no BOS token; leave add_bos_token off")
            context = tokenizer.bos_token + context
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if tokenizer.eos_token_id is None:
            raise ValueError("the dream protocol appends EOS to each scored string, but the tokenizer has no EOS token")
        whole = lm.tok_encode(context + continuation) + [tokenizer.eos_token_id]
        context_ids = lm.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    def encode_target(self, lm: TemplateLM, continuation: str) -> list[int]:
        """With EOS appended, as every scored string here: the last, never-masked position is EOS, not a
        token of the continuation."""
        return super().encode_target(lm, continuation) + [lm.tokenizer.eos_token_id]

    def draw(self, context_length: int, target_length: int, rows: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        length = context_length + target_length
        start = torch.rand(1, generator=generator)
        t = (start + torch.arange(rows) / rows) % 1
        ratio = (1 - self.sampling_eps) * t + self.sampling_eps
        masks = torch.rand(rows, length, generator=generator) < ratio[:, None]
        masks[:, 0] = masks[:, -1] = False
        masks[:, :context_length] = False
        return masks, ratio


PROTOCOLS: dict[str, type[LikelihoodProtocol]] = {"llada": LLaDAProtocol, "dream": DreamProtocol}


def fit_to_length(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """(context, continuation, truncated): the pair cut from the left to ``max_length`` tokens in all, the
    context first, then the continuation's start (lm-eval's left truncation, as dllm's Dream harness cuts)."""
    excess = len(context) + len(continuation) - max_length
    if excess <= 0:
        return context, continuation, False
    if excess < len(context):
        return context[excess:], continuation, True
    return [], continuation[-max_length:], True
