"""Seeded generators of the long-context tasks (RULER multi-value needle, variable tracking, common-words
extraction; bAbI fact tracking in a haystack, as in BABILong).

Every prompt is ``CONTEXT\\nquestion: QUESTION\\nanswer:`` and ``Example.context_tokens`` counts the tokens
of CONTEXT. Haystack tasks (mv, vt, babi) hit ``context_length`` exactly; cwe is a numbered list and falls
short by less than one list item (at most 5 tokens below 10000 items). List answers are joined by ", ".
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .haystack import build_haystack
from .vocab import LOCATIONS, MOVE_PHRASES, NAMES, OBJECTS, VARIABLES, count_tokens

__all__ = [
    "Example",
    "render_prompt",
    "generate_mv",
    "generate_vt",
    "generate_cwe",
    "generate_babi",
    "TASKS",
    "make_dataset",
]

LIST_SEPARATOR = ", "


@dataclass(frozen=True)
class Example:
    """One task instance: the full prompt (context + question), the reference answer and the context size."""

    prompt: str
    answer: str
    task: str
    context_tokens: int


def render_prompt(context: str, question: str) -> str:
    """The prompt layout shared by all tasks; the answer follows ``answer:``."""
    return f"{context}\nquestion: {question}\nanswer:"


def _example(task: str, context: str, question: str, answer: str) -> Example:
    return Example(render_prompt(context, question), answer, task, count_tokens(context))


def generate_mv(
    rng: random.Random, context_length: int, *, num_values: int = 4, num_distractors: int = 2
) -> Example:
    """Multi-value needle: ``num_values`` needles share one key, ``num_distractors`` have other keys.

    The answer is the queried key's values in order of appearance.
    """
    keys = rng.sample(OBJECTS, 1 + num_distractors)
    values = [str(value) for value in rng.sample(range(1000, 10000), num_values + num_distractors)]
    pairs = [(keys[0], value) for value in values[:num_values]]
    pairs += [(key, value) for key, value in zip(keys[1:], values[num_values:])]
    rng.shuffle(pairs)
    needles = [f"the special value for {key} is {value}." for key, value in pairs]
    context = build_haystack(rng, needles, context_length)
    answer = LIST_SEPARATOR.join(value for key, value in pairs if key == keys[0])
    return _example("mv", context, f"what are all the special values for {keys[0]}?", answer)


def _interleave(rng: random.Random, chains: list[list[str]]) -> list[str]:
    """A uniformly random merge of ``chains`` that keeps each chain's own order."""
    pending = [list(reversed(chain)) for chain in chains]
    merged: list[str] = []
    while any(pending):
        weights = [len(chain) for chain in pending]
        merged.append(pending[rng.choices(range(len(pending)), weights=weights)[0]].pop())
    return merged


def generate_vt(rng: random.Random, context_length: int, *, num_hops: int = 4, num_chains: int = 2) -> Example:
    """Variable tracking: chains ``var a = 12345. var b = var a. ...``; the question gives one chain's value.

    The answer is that chain's variable names in order of assignment.
    """
    names = rng.sample(VARIABLES, (num_hops + 1) * num_chains)
    values = [str(value) for value in rng.sample(range(10000, 100000), num_chains)]
    chains = []
    for index, value in enumerate(values):
        chain_names = names[index * (num_hops + 1) : (index + 1) * (num_hops + 1)]
        statements = [f"var {chain_names[0]} = {value}."]
        statements += [f"var {name} = var {source}." for source, name in zip(chain_names, chain_names[1:])]
        chains.append((chain_names, statements))
    context = build_haystack(rng, _interleave(rng, [statements for _, statements in chains]), context_length)
    answer = LIST_SEPARATOR.join(chains[0][0])
    return _example("vt", context, f"which variables are equal to {values[0]}?", answer)


def _item_tokens(number: int) -> int:
    """Tokens of the list item ``NUMBER. WORD``: the digits, the period and the word."""
    return len(str(number)) + 2


def _items_that_fit(context_length: int) -> int:
    n_items, used = 0, 0
    while used + _item_tokens(n_items + 1) <= context_length:
        n_items += 1
        used += _item_tokens(n_items)
    return n_items


def generate_cwe(rng: random.Random, context_length: int, *, top_k: int = 3, common_share: float = 0.5) -> Example:
    """Common-words extraction: a numbered word list where ``top_k`` words fill ``common_share`` of it.

    Each common word appears c >= 2 times and every other word at most c // 2 times. The answer is the
    ``top_k`` most frequent words sorted by count (descending), ties by first appearance in the list; the
    common words have equal counts, so this is their order of first appearance.
    """
    if not 0.0 < common_share < 1.0:
        raise ValueError(f"common_share must lie in (0, 1), got {common_share}")
    n_items = _items_that_fit(context_length)
    if n_items < 4 * top_k:
        minimum = sum(_item_tokens(number) for number in range(1, 4 * top_k + 1))
        raise ValueError(
            f"context_length={context_length} holds only {n_items} list items; cwe with top_k={top_k} needs "
            f"{4 * top_k}; use context_length >= {minimum}"
        )
    words = rng.sample(OBJECTS, len(OBJECTS))
    common, rare = words[:top_k], words[top_k:]
    common_count = min(max(2, round(n_items * common_share / top_k)), n_items // top_k)
    rare_cap = max(1, common_count // 2)
    n_rare = n_items - top_k * common_count
    if n_rare > rare_cap * len(rare):
        raise ValueError(f"common_share={common_share} is too small for {len(rare)} rare words; raise it")
    items = [word for word in common for _ in range(common_count)]
    rare_counts: Counter[str] = Counter()
    available = list(rare)
    for _ in range(n_rare):
        word = rng.choice(available)
        items.append(word)
        rare_counts[word] += 1
        if rare_counts[word] == rare_cap:
            available.remove(word)
    rng.shuffle(items)
    context = " ".join(f"{number}. {word}" for number, word in enumerate(items, start=1))
    answer = LIST_SEPARATOR.join(sorted(common, key=items.index))
    return _example("cwe", context, f"what are the {top_k} most common words in the list above?", answer)


def generate_babi(rng: random.Random, context_length: int, *, num_people: int = 4, num_facts: int = 8) -> Example:
    """bAbI-style fact tracking: movement facts ``mary went to the kitchen.`` for several people in filler.

    The question asks where one person who moved is; the answer is that person's last location.
    """
    people = rng.sample(NAMES, num_people)
    location: dict[str, str] = {}
    facts = []
    for _ in range(num_facts):
        person = rng.choice(people)
        place = rng.choice([place for place in LOCATIONS if place != location.get(person)])
        location[person] = place
        facts.append(f"{person} {rng.choice(MOVE_PHRASES)} the {place}.")
    context = build_haystack(rng, facts, context_length)
    person = rng.choice([person for person in people if person in location])
    return _example("babi", context, f"where is {person}?", location[person])


TASKS: dict[str, Callable[[random.Random, int], Example]] = {
    "mv": generate_mv,
    "vt": generate_vt,
    "cwe": generate_cwe,
    "babi": generate_babi,
}


def make_dataset(task: str, n: int, context_length: int, seed: int) -> list[Example]:
    """``n`` examples of ``task``, a deterministic function of (task, context_length, seed).

    Use different seeds for training and evaluation data.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across processes.
    rng = random.Random(f"{task}:{context_length}:{seed}")
    return [TASKS[task](rng, context_length) for _ in range(n)]
