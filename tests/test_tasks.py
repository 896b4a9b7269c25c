"""Synthetic long-context suite: generators, reference solvers, tokenizer and training-row encoding."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from bilevel_dlm.tasks import (
    TASKS,
    build_corpus,
    build_tokenizer,
    encode_example,
    exact_match,
    make_dataset,
    solve,
    split_prompt,
    vocabulary,
)
from bilevel_dlm.tasks import vocab as task_vocab

TOKENIZER = build_tokenizer()
LENGTHS = (256, 1024)
# Haystack tasks are exact; cwe is a numbered list that stops before the item that would overflow (<= 5 tokens).
SHORTFALL = {"mv": 0, "vt": 0, "babi": 0, "cwe": 5}


def bare_ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def test_vocabulary_is_small_and_ids_are_fixed() -> None:
    again = build_tokenizer()
    assert TOKENIZER.get_vocab() == again.get_vocab()
    assert len(TOKENIZER) <= 300
    ids = [TOKENIZER.pad_token_id, TOKENIZER.eos_token_id, TOKENIZER.bos_token_id]
    ids += [TOKENIZER.unk_token_id, TOKENIZER.mask_token_id]
    assert ids == [0, 1, 2, 3, 4]
    assert [TOKENIZER.convert_ids_to_tokens(i) for i in ids] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert TOKENIZER.convert_tokens_to_ids(vocabulary()) == list(range(5, 5 + len(vocabulary())))


def test_word_roles_are_disjoint() -> None:
    roles = {
        "names": task_vocab.NAMES,
        "locations": task_vocab.LOCATIONS,
        "variables": task_vocab.VARIABLES,
        "objects": task_vocab.OBJECTS,
        "filler": task_vocab.FILLER_NOUNS + task_vocab.FILLER_ADJECTIVES + task_vocab.FILLER_VERBS
        + task_vocab.FILLER_ADVERBS,
        "template": task_vocab.TEMPLATE_WORDS + tuple(" ".join(task_vocab.MOVE_PHRASES).split()),
    }
    seen: dict[str, str] = {}
    for role, words in roles.items():
        for word in words:
            assert seen.setdefault(word, role) == role, f"{word!r} is both {seen[word]} and {role}"


def test_tokenizer_splits_digits_and_punctuation() -> None:
    tokens = TOKENIZER.convert_ids_to_tokens(TOKENIZER("var alpha = 4821.\nanswer:")["input_ids"])
    assert tokens == ["<bos>", "var", "alpha", "=", "4", "8", "2", "1", ".", "answer", ":"]
    assert bare_ids("zebra") == [TOKENIZER.unk_token_id]


def test_build_tokenizer_rejects_multi_token_words() -> None:
    with pytest.raises(ValueError, match="single token"):
        build_tokenizer(["hello", "12"])


def test_save_load_round_trip(tmp_path) -> None:
    TOKENIZER.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == TOKENIZER.get_vocab()
    assert loaded.mask_token_id == TOKENIZER.mask_token_id
    assert loaded.bos_token_id == TOKENIZER.bos_token_id
    for task in TASKS:
        example = make_dataset(task, 1, 200, seed=5)[0]
        text = f"{example.prompt} {example.answer}"
        assert loaded(text)["input_ids"] == TOKENIZER(text)["input_ids"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_data_other_seed_other_data(task: str) -> None:
    first = make_dataset(task, 5, 200, seed=11)
    assert first == make_dataset(task, 5, 200, seed=11)
    assert all(a != b for a, b in zip(first, make_dataset(task, 5, 200, seed=12)))
    assert len({example.prompt for example in first}) == 5


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_suite_properties(task: str, length: int) -> None:
    """Solver scores 100%, contexts have the requested size, nothing is out of vocabulary."""
    examples = make_dataset(task, 50, length, seed=0)
    assert all(exact_match(solve(example), example.answer) for example in examples)
    for example in examples:
        assert example.task == task
        context, _ = split_prompt(example.prompt)
        context_tokens = len(bare_ids(context))
        assert context_tokens == example.context_tokens
        assert 0 <= length - context_tokens <= SHORTFALL[task]
        ids = bare_ids(f"{example.prompt} {example.answer}")
        assert TOKENIZER.unk_token_id not in ids
    assert len({example.answer for example in examples}) > 1


@settings(max_examples=30, deadline=None)
@given(task=st.sampled_from(sorted(TASKS)), length=st.integers(80, 700), seed=st.integers(0, 2**32))
def test_suite_properties_over_seeds_and_lengths(task: str, length: int, seed: int) -> None:
    example = make_dataset(task, 1, length, seed)[0]
    assert exact_match(solve(example), example.answer)
    context, _ = split_prompt(example.prompt)
    assert 0 <= length - len(bare_ids(context)) <= SHORTFALL[task]
    assert TOKENIZER.unk_token_id not in bare_ids(f"{example.prompt} {example.answer}")


def test_mv_answer_is_queried_values_in_order_and_needles_spread() -> None:
    depths, queried_first = [], 0
    for example in make_dataset("mv", 50, 512, seed=3):
        context, question = split_prompt(example.prompt)
        key = question.split()[-1].rstrip("?")
        queried_first += re.search(r"special value for (\w+)", context)[1] == key
        sentences = [s.strip() for s in context.split(".") if s.strip()]
        values = [s.split()[-1] for s in sentences if s.startswith(f"the special value for {key} is")]
        assert example.answer == ", ".join(values) and len(values) == 4
        depths += [match.start() / len(context) for match in re.finditer("special value", context)]
    quarters = Counter(int(4 * depth) for depth in depths)
    assert all(quarters[quarter] > 0.1 * len(depths) for quarter in range(4))
    assert 0 < queried_first < 50  # distractor needles are mixed in, not appended


def test_vt_answer_follows_the_chain() -> None:
    for example in make_dataset("vt", 20, 300, seed=4):
        context, question = split_prompt(example.prompt)
        names = example.answer.split(", ")
        value = re.search(r"\d+", question)[0]
        assert f"var {names[0]} = {value}." in context
        for source, name in zip(names, names[1:]):
            assert f"var {name} = var {source}." in context
            assert context.index(f"var {source} =") < context.index(f"var {name} =")


@pytest.mark.parametrize("length", [45, 400])
def test_cwe_answer_words_are_strictly_most_frequent(length: int) -> None:
    for example in make_dataset("cwe", 20, length, seed=5):
        context, _ = split_prompt(example.prompt)
        words = context.split()[1::2]
        counts = Counter(words)
        answer = example.answer.split(", ")
        assert len(answer) == 3
        weakest_answer = min(counts[word] for word in answer)
        assert all(counts[word] < weakest_answer for word in counts if word not in answer)
        assert sorted(answer, key=words.index) == answer


def test_babi_answer_is_last_location() -> None:
    for example in make_dataset("babi", 20, 300, seed=6):
        context, question = split_prompt(example.prompt)
        person = question.split()[-1].rstrip("?")
        mentions = [s.split() for s in context.split(".") if s.split()[:1] == [person]]
        assert mentions and mentions[-1][-1] == example.answer


def test_exact_match_normalises_token_spacing_only() -> None:
    assert exact_match(" 4 8 2 1 ,  7 7 ", "4821, 77")
    assert exact_match("psi, kappa", "psi , kappa")
    assert not exact_match("4821, 77", "4821")
    assert not exact_match("kappa, psi", "psi, kappa")


def test_too_short_context_is_rejected() -> None:
    for task in TASKS:
        with pytest.raises(ValueError, match="context_length"):
            make_dataset(task, 1, 20, seed=0)


def test_encode_example_labels() -> None:
    example = make_dataset("vt", 1, 120, seed=7)[0]
    prompt_ids, answer_ids = bare_ids(example.prompt), bare_ids(example.answer)
    max_length = len(prompt_ids) + len(answer_ids) + 10
    row = encode_example(TOKENIZER, example.prompt, example.answer, max_length)
    n_prefix = 1 + len(prompt_ids)
    eos = TOKENIZER.eos_token_id
    expected_ids = [TOKENIZER.bos_token_id, *prompt_ids, *answer_ids] + [eos] * 9
    assert row["input_ids"].tolist() == expected_ids
    assert row["labels"].tolist() == [-100] * n_prefix + expected_ids[n_prefix:]
    assert row["attention_mask"].tolist() == [1] * max_length
    assert all(t.dtype == torch.long and t.shape == (max_length,) for t in row.values())
    decoded = TOKENIZER.decode(row["input_ids"][n_prefix:], skip_special_tokens=True)
    assert exact_match(decoded, example.answer)


def test_encode_example_errors() -> None:
    example = make_dataset("babi", 1, 100, seed=8)[0]
    exact = 2 + len(bare_ids(example.prompt)) + len(bare_ids(example.answer))
    assert encode_example(TOKENIZER, example.prompt, example.answer, exact)["input_ids"][-1] == TOKENIZER.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        encode_example(TOKENIZER, example.prompt, example.answer, exact - 1)
    with pytest.raises(ValueError, match="zebra"):
        encode_example(TOKENIZER, "where is the zebra?", "garden", 64)


def test_build_corpus_mixes_tasks_and_lengths() -> None:
    tasks, lengths = ["mv", "babi", "cwe"], [100, 200]
    rows = build_corpus(TOKENIZER, tasks, 5, lengths, seed=1, max_length=260)
    assert len(rows) == 15
    assert all(row["input_ids"].shape == (260,) for row in rows)
    task_of_question = {"special": "mv", "where": "babi", "common": "cwe"}
    order, prompt_sizes = [], []
    for row in rows:
        prompt_ids = row["input_ids"][row["labels"] == -100]
        question = TOKENIZER.decode(prompt_ids, skip_special_tokens=True).rsplit("question :", 1)[1]
        order.append(next(task for word, task in task_of_question.items() if word in question.split()))
        prompt_sizes.append(len(prompt_ids))
    assert Counter(order) == {"mv": 5, "babi": 5, "cwe": 5}
    assert sum(a != b for a, b in zip(order, order[1:])) > len(tasks) - 1  # shuffled, not in task blocks
    assert min(prompt_sizes) < 150 < max(prompt_sizes)
    again = build_corpus(TOKENIZER, tasks, 5, lengths, seed=1, max_length=260)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, again))
