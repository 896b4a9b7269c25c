"""Filler text of an exact token length with needle sentences placed at random depths."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .vocab import FILLER_ADJECTIVES, FILLER_ADVERBS, FILLER_NOUNS, FILLER_VERBS, count_tokens

__all__ = ["MIN_SENTENCE_TOKENS", "filler_sentence", "build_haystack"]

# "the NOUN VERB the NOUN ." is the shortest filler sentence.
MIN_SENTENCE_TOKENS = 6
_MEAN_SENTENCE_TOKENS = 9


def filler_sentence(rng: random.Random, n_tokens: int) -> str:
    """A filler sentence of exactly ``n_tokens`` tokens (at least ``MIN_SENTENCE_TOKENS``).

    The words beyond the minimal sentence become adjectives of the subject and object and trailing adverbs.
    """
    if n_tokens < MIN_SENTENCE_TOKENS:
        raise ValueError(f"a filler sentence needs at least {MIN_SENTENCE_TOKENS} tokens, got {n_tokens}")
    extra = n_tokens - MIN_SENTENCE_TOKENS
    cut_a, cut_b = sorted(rng.randint(0, extra) for _ in range(2))
    subject = rng.choices(FILLER_ADJECTIVES, k=cut_a) + [rng.choice(FILLER_NOUNS)]
    obj = rng.choices(FILLER_ADJECTIVES, k=cut_b - cut_a) + [rng.choice(FILLER_NOUNS)]
    adverbs = rng.choices(FILLER_ADVERBS, k=extra - cut_b)
    words = ["the", *subject, rng.choice(FILLER_VERBS), "the", *obj, *adverbs]
    return " ".join(words) + "."


def _sentence_lengths(rng: random.Random, budget: int) -> list[int]:
    """Random sentence lengths, each at least ``MIN_SENTENCE_TOKENS``, summing exactly to ``budget``."""
    count = max(1, min(budget // MIN_SENTENCE_TOKENS, round(budget / _MEAN_SENTENCE_TOKENS)))
    lengths = [MIN_SENTENCE_TOKENS] * count
    for _ in range(budget - MIN_SENTENCE_TOKENS * count):
        lengths[rng.randrange(count)] += 1
    return lengths


def build_haystack(rng: random.Random, needles: Sequence[str], context_length: int) -> str:
    """Filler sentences with ``needles`` inserted, in the given order, at random sentence boundaries.

    The result has exactly ``context_length`` tokens. Raises ``ValueError`` if the needles leave fewer
    than ``MIN_SENTENCE_TOKENS`` tokens of filler.
    """
    needle_tokens = sum(count_tokens(needle) for needle in needles)
    budget = context_length - needle_tokens
    if budget < MIN_SENTENCE_TOKENS:
        raise ValueError(
            f"context_length={context_length} is too small: the {len(needles)} needles take {needle_tokens} tokens "
            f"and the filler needs at least {MIN_SENTENCE_TOKENS}; use context_length >= "
            f"{needle_tokens + MIN_SENTENCE_TOKENS} or fewer needles"
        )
    sentences = [filler_sentence(rng, length) for length in _sentence_lengths(rng, budget)]
    depths = sorted(rng.randint(0, len(sentences)) for _ in needles)
    pieces: list[str] = []
    next_needle = 0
    for boundary in range(len(sentences) + 1):
        while next_needle < len(needles) and depths[next_needle] == boundary:
            pieces.append(needles[next_needle])
            next_needle += 1
        if boundary < len(sentences):
            pieces.append(sentences[boundary])
    return " ".join(pieces)
