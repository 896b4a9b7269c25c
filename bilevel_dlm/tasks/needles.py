"""Needle-in-a-haystack training data in the format of RULER's ``niah`` tasks as lm-eval builds them, over
real English prose that every Python install ships (the standard library's ``pydoc_data.topics``).

A model fine-tuned on :func:`generate_needle` sees prompts shaped exactly like lm-eval's ``niah_single_1``
request (the task's instruction, needles "One of the special magic numbers for KEY is: VALUE.", the
question, then lm-eval's ``gen_prefix`` after one space) and answers `` VALUE.``; the keys, values and
haystack are drawn here, not by lm-eval, so training never sees an evaluation example. With ``n_keys``
> 1 the other needles carry other keys and only the queried key's value is right: retrieval by content.
"""

from __future__ import annotations

import random
import re
from functools import cache

from .generators import Example

__all__ = ["NOISE", "documentation_prose", "prose_sentences", "key_words", "generate_needle"]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_INSTRUCTION = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the number afterwards.")
_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
_ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"


@cache
def documentation_prose() -> tuple[str, ...]:
    """The paragraphs of Python's own documentation topics (about 465k characters of English prose,
    offline on every CPython), whitespace-normalised, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = (re.sub(r"\s+", " ", p).strip() for name in sorted(topics) for p in topics[name].split("\n\n"))
    return tuple(p for p in paragraphs if len(p) > 40)


@cache
def prose_sentences() -> tuple[str, ...]:
    """Sentences of :func:`documentation_prose` of 5 to 30 words that end with a full stop."""
    sentences = (s.strip() for p in documentation_prose() for s in re.split(r"(?<=\.)\s+", p))
    return tuple(s for s in sentences if s.endswith(".") and 5 <= len(s.split()) <= 30)


@cache
def key_words() -> tuple[str, ...]:
    """Lower-case words of 4 to 9 letters from the prose, sorted: halves of RULER-style ``adj-noun`` keys."""
    return tuple(sorted({w for p in documentation_prose() for w in re.findall(r"\b[a-z]{4,9}\b", p)}))


def generate_needle(rng: random.Random, n_keys: int = 1, haystack_sentences: int = 2, haystack: str = "noise"
                    ) -> Example:
    """One RULER-format needle example; ``haystack`` is ``"noise"`` (niah_single_1's repeated sentence) or
    ``"prose"`` (random documentation sentences). ``n_keys`` needles with distinct keys go at random
    sentence boundaries; the queried key is one of them."""
    if n_keys < 1 or haystack_sentences < 0:
        raise ValueError(f"need n_keys >= 1 and haystack_sentences >= 0, got {n_keys} and {haystack_sentences}")
    if haystack not in ("noise", "prose"):
        raise ValueError(f"haystack must be 'noise' or 'prose', got {haystack!r}")
    words = key_words()
    keys: list[str] = []
    while len(keys) < n_keys:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in keys:
            keys.append(key)
    values = [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in keys]
    filler = [NOISE if haystack == "noise" else rng.choice(prose_sentences()) for _ in range(haystack_sentences)]
    lines = list(filler)
    for key, value in zip(keys, values):
        lines.insert(rng.randint(0, len(lines)), _NEEDLE.format(key=key, value=value))
    asked = rng.randrange(n_keys)
    prompt = "\n".join([_INSTRUCTION, *lines, _QUESTION.format(key=keys[asked])])
    prompt = f"{prompt} {_ANSWER_PREFIX.format(key=keys[asked])}"
    return Example(prompt, f" {values[asked]}.", f"niah{n_keys}", haystack_sentences + n_keys)
