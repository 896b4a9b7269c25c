"""Rule-based reference solvers that read only the prompt text, and the exact-match metric.

The solvers know the public text format of each task (the sentence shapes and the question wording) but
nothing of how the generators build examples; a solver scoring 100% shows every answer is recoverable
from its prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from .generators import Example
from .vocab import split_tokens

__all__ = ["split_prompt", "solve", "exact_match", "token_accuracy"]

_QUESTION = re.compile(r"\nquestion:(?P<question>[^\n]*)\nanswer:\s*$")


def split_prompt(prompt: str) -> tuple[str, str]:
    """(context, question) of a prompt laid out as ``CONTEXT\\nquestion: QUESTION\\nanswer:``."""
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError("prompt does not end with '\\nquestion: ...\\nanswer:'")
    return prompt[: match.start()], match["question"].strip()


def _search(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"question {text!r} does not match the expected form {pattern!r}")
    return match


def _solve_mv(context: str, question: str) -> str:
    key = _search(r"special values for (\w+)\s*\?", question)[1]
    return ", ".join(re.findall(rf"\bthe special value for {key} is (\d+)\s*\.", context))


def _solve_vt(context: str, question: str) -> str:
    target = _search(r"equal to (\d+)\s*\?", question)[1]
    value_of: dict[str, str | None] = {}
    for name, source, number in re.findall(r"\bvar (\w+) = (?:var (\w+)|(\d+))\s*\.", context):
        value_of[name] = number or value_of.get(source)
    return ", ".join(name for name, value in value_of.items() if value == target)


def _solve_cwe(context: str, question: str) -> str:
    top_k = int(_search(r"the (\d+) most common words", question)[1])
    words = re.findall(r"\d+\s*\.\s*([a-z]+)", context)
    counts = Counter(words)
    first_seen = {word: index for index, word in reversed(list(enumerate(words)))}
    ranked = sorted(counts, key=lambda word: (-counts[word], first_seen[word]))
    return ", ".join(ranked[:top_k])


def _solve_babi(context: str, question: str) -> str:
    person = _search(r"where is (\w+)\s*\?", question)[1]
    places = re.findall(rf"\b{person} (?:went|moved|travelled|journeyed)(?: back)? to the (\w+)\s*\.", context)
    if not places:
        raise ValueError(f"the context never says where {person} went")
    return places[-1]


_SOLVERS: dict[str, Callable[[str, str], str]] = {
    "mv": _solve_mv,
    "vt": _solve_vt,
    "cwe": _solve_cwe,
    "babi": _solve_babi,
}


def solve(example: Example) -> str:
    """The answer to ``example`` computed from its prompt text alone."""
    if example.task not in _SOLVERS:
        raise KeyError(f"no solver for task {example.task!r}; known tasks: {sorted(_SOLVERS)}")
    return _SOLVERS[example.task](*split_prompt(example.prompt))


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` and ``answer`` are the same token sequence.

    Whitespace is normalised at token boundaries: digits are single tokens, so a decoded ``4 8 2 1 , 7 7``
    matches ``4821, 77``. Decode model output with ``skip_special_tokens=True`` before comparing.
    """
    return split_tokens(prediction) == split_tokens(answer)


def token_accuracy(prediction: str, answer: str) -> float:
    """Fraction of the answer's tokens that the prediction has at the same position (partial credit:
    a wrong or missing token counts as wrong, extra tokens after the answer are ignored)."""
    predicted, reference = split_tokens(prediction), split_tokens(answer)
    if not reference:
        return float(not predicted)
    return sum(p == r for p, r in zip(predicted, reference)) / len(reference)
