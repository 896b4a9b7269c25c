"""The closed word lists of the synthetic suite and the one rule that splits text into tokens.

Every word a generator can emit comes from the lists below, so a word-level tokenizer built from
``vocabulary()`` never meets an unknown word. Each list has one role (names, locations, keys, ...) and the
role lists are disjoint, which is what lets a rule-based solver tell needles from filler.
"""

from __future__ import annotations

import re

__all__ = [
    "TOKEN_REGEX",
    "split_tokens",
    "count_tokens",
    "vocabulary",
    "DIGITS",
    "PUNCTUATION",
    "TEMPLATE_WORDS",
    "NAMES",
    "LOCATIONS",
    "MOVE_PHRASES",
    "VARIABLES",
    "OBJECTS",
    "FILLER_NOUNS",
    "FILLER_ADJECTIVES",
    "FILLER_VERBS",
    "FILLER_ADVERBS",
]

# A token is one digit, one punctuation character, or a run of letters. Numbers are spelled digit by digit
# so ten tokens cover every number. The tokenizer's pre-tokenizer uses this same pattern after splitting on
# whitespace, so counting with ``split_tokens`` equals counting with the tokenizer.
TOKEN_REGEX = r"\d|[^\w\s]|[^\W\d]+"
_TOKEN_PATTERN = re.compile(TOKEN_REGEX)

DIGITS = tuple("0123456789")
PUNCTUATION = (".", ",", "?", ":", "=")
TEMPLATE_WORDS = (
    "question", "answer", "what", "are", "all", "the", "special", "value", "values", "for", "is",
    "which", "variables", "equal", "to", "var", "most", "common", "words", "in", "list", "above", "where",
)
NAMES = (
    "mary", "john", "sandra", "daniel", "emma", "lucas", "olivia", "noah", "ava", "liam",
    "mia", "ethan", "sofia", "james", "chloe", "henry", "grace", "jack", "lily", "oscar",
    "ruby", "leo", "ella", "max", "zoe", "adam", "nora", "sam", "ivy", "ben",
    "anna", "tom", "eva", "paul", "rose", "mark", "kate", "luke", "jane", "fred",
)
LOCATIONS = ("kitchen", "garden", "office", "bedroom", "bathroom", "hallway", "cellar", "balcony")
# bAbI-style movement verbs; every phrase is followed by "the LOCATION".
MOVE_PHRASES = ("went to", "moved to", "travelled to", "journeyed to", "went back to")
VARIABLES = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
    "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega",
)
# Keys of the multi-value needles and the words of the common-words list.
OBJECTS = (
    "apple", "lamp", "chair", "clock", "mirror", "pencil", "basket", "candle", "kettle", "ladder",
    "rocket", "violin", "wallet", "hammer", "pillow", "bucket", "button", "jacket", "carpet", "marble",
    "needle", "saddle", "tunnel", "anchor", "barrel", "cactus", "dragon", "falcon", "helmet", "lantern",
)
FILLER_NOUNS = (
    "grass", "sky", "sun", "river", "tree", "hill", "wind", "rain",
    "stone", "cloud", "field", "road", "bird", "leaf", "sea", "moon",
)
FILLER_ADJECTIVES = ("green", "blue", "old", "quiet", "warm", "bright", "small", "tall", "calm", "soft", "dark", "wide")
FILLER_VERBS = ("touches", "follows", "meets", "passes", "crosses", "finds", "watches", "holds")
FILLER_ADVERBS = ("slowly", "softly", "again", "today", "often")


def split_tokens(text: str) -> list[str]:
    """The tokens of ``text`` under the suite's tokenization rule (see ``TOKEN_REGEX``)."""
    return _TOKEN_PATTERN.findall(text)


def count_tokens(text: str) -> int:
    """Number of tokens of ``text``; equal to the tokenizer's count without special tokens."""
    return len(split_tokens(text))


def vocabulary() -> list[str]:
    """Every token the generators can emit, each once, in a fixed order (so token ids are deterministic)."""
    move_words = (word for phrase in MOVE_PHRASES for word in phrase.split())
    groups = (
        DIGITS, PUNCTUATION, TEMPLATE_WORDS, move_words, NAMES, LOCATIONS, VARIABLES, OBJECTS,
        FILLER_NOUNS, FILLER_ADJECTIVES, FILLER_VERBS, FILLER_ADVERBS,
    )
    return list(dict.fromkeys(word for group in groups for word in group))
