"""Offline synthetic long-context tasks (RULER-style and bAbI-style) with a small local tokenizer."""

from .corpus import build_corpus
from .generators import TASKS, Example, generate_babi, generate_cwe, generate_mv, generate_vt, make_dataset
from .solvers import exact_match, solve, split_prompt, token_accuracy
from .tokenizer import SPECIAL_TOKENS, build_byte_level_tokenizer, build_tokenizer, encode_example
from .vocab import count_tokens, split_tokens, vocabulary

__all__ = [
    "TASKS",
    "Example",
    "SPECIAL_TOKENS",
    "build_byte_level_tokenizer",
    "build_corpus",
    "build_tokenizer",
    "count_tokens",
    "encode_example",
    "exact_match",
    "generate_babi",
    "generate_cwe",
    "generate_mv",
    "generate_vt",
    "make_dataset",
    "solve",
    "split_prompt",
    "split_tokens",
    "token_accuracy",
    "vocabulary",
]
