"""Short recall tasks that a tiny model learns in minutes on a CPU: the main job's test bed.

Both present ``n_pairs`` key-value pairs and ask for values:

- ``position`` (retrieval by position): the keys come as one block, then the values, and the answer is
  every value in order, so answer token j always copies the token a fixed distance back.
- ``mqar`` (multi-query associative recall, retrieval by content): after the pairs come ``n_queries``
  keys in random order, and the answer is each queried key's value, which the model can only find by
  matching the key's content.

Keys and values come from disjoint word lists, each word one token of the local tokenizer
(:func:`recall_tokenizer`). Every example is a deterministic function of (task, n_pairs, seed, index).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from itertools import product

from .generators import Example
from .tokenizer import build_tokenizer

__all__ = ["RECALL_TASKS", "RECALL_KEYS", "RECALL_VALUES", "recall_vocabulary", "recall_tokenizer",
           "generate_position_recall", "generate_associative_recall", "make_recall_dataset"]

RECALL_KEYS = tuple(f"k{a}{b}" for a, b in product("abcdefgh", "abcdefgh"))
RECALL_VALUES = tuple(f"v{a}{b}" for a, b in product("abcdefgh", "abcdefgh"))
QUERY_MARK, ANSWER_MARK = "query", "answer"


def recall_vocabulary() -> list[str]:
    """Every word the recall tasks emit: keys, values and the two markers (plus ':')."""
    return [*RECALL_KEYS, *RECALL_VALUES, QUERY_MARK, ANSWER_MARK, ":"]


def recall_tokenizer():
    """A word-level tokenizer over :func:`recall_vocabulary` (special tokens at ids 0-4)."""
    return build_tokenizer(recall_vocabulary())


def generate_position_recall(rng: random.Random, n_pairs: int = 8, n_queries: int = 0, *,
                             keys: Sequence[str] = RECALL_KEYS, values: Sequence[str] = RECALL_VALUES) -> Example:
    """``k1 ... kn v1 ... vn answer:`` -> ``v1 ... vn``: answer token j copies the token a fixed
    ``n_pairs + 2`` positions back (the pairs are given as a block of keys, then their values). ``keys`` and
    ``values``: the words to draw from (default: the local tokenizer's)."""
    keys, values = rng.sample(keys, n_pairs), rng.sample(values, n_pairs)
    context = " ".join([*keys, *values])
    return Example(f"{context} {ANSWER_MARK}:", " ".join(values), "position", 2 * n_pairs)


def generate_associative_recall(rng: random.Random, n_pairs: int = 4, n_queries: int = 2, *,
                                keys: Sequence[str] = RECALL_KEYS, values: Sequence[str] = RECALL_VALUES) -> Example:
    """``k1 v1 ... kn vn query: ka kb answer:`` -> ``va vb`` for ``n_queries`` distinct keys in random order."""
    if not 1 <= n_queries <= n_pairs:
        raise ValueError(f"n_queries must be in 1..n_pairs={n_pairs}, got {n_queries}")
    keys, values = rng.sample(keys, n_pairs), rng.sample(values, n_pairs)
    asked = rng.sample(range(n_pairs), n_queries)
    context = " ".join(f"{k} {v}" for k, v in zip(keys, values))
    question = " ".join(keys[i] for i in asked)
    answer = " ".join(values[i] for i in asked)
    return Example(f"{context} {QUERY_MARK}: {question} {ANSWER_MARK}:", answer, "mqar", 2 * n_pairs)


RECALL_TASKS: dict[str, Callable[..., Example]] = {
    "position": generate_position_recall,
    "mqar": generate_associative_recall,
}


def make_recall_dataset(task: str, n: int, seed: int, *, n_pairs: int, n_queries: int = 2) -> list[Example]:
    """``n`` examples of a recall task, a deterministic function of (task, n_pairs, n_queries, seed)."""
    if task not in RECALL_TASKS:
        raise KeyError(f"unknown recall task {task!r}; choose one of {sorted(RECALL_TASKS)}")
    rng = random.Random(f"recall:{task}:{n_pairs}:{n_queries}:{seed}")
    return [RECALL_TASKS[task](rng, n_pairs, n_queries) for _ in range(n)]
