"""The needle training data: lm-eval's own niah_single_1 request format, real prose, digits one token each."""

import random
import re

import pytest

from bilevel_dlm.tasks import build_byte_level_tokenizer
from bilevel_dlm.tasks.needles import NOISE, documentation_prose, generate_needle, prose_sentences
from bilevel_dlm.tasks.recall import generate_associative_recall, generate_position_recall


def skeleton(text: str, key: str, value: str) -> list[str]:
    """The request's lines with the key and value replaced; haystack lines and needle in any order."""
    lines = text.replace(key, "KEY").replace(value, "VALUE").split("\n")
    return [lines[0], *sorted(set(lines[1:-1])), lines[-1]]


def test_a_needle_example_is_shaped_as_lm_eval_s_niah_single_1_request(tmp_path) -> None:
    pytest.importorskip("wonderwords")
    from lm_eval.tasks import TaskManager

    tokenizer = build_byte_level_tokenizer([*documentation_prose()[:200], NOISE], 512, individual_digits=True)
    tokenizer.save_pretrained(tmp_path / "tok")
    manager = TaskManager(metadata={"max_seq_lengths": [512], "tokenizer": str(tmp_path / "tok")})
    task = manager.load(["niah_single_1"])["tasks"]["niah_single_1"]
    task.build_all_requests(limit=3, rank=0, world_size=1)
    for instance in task.instances:
        context, (value,) = instance.args[0], instance.doc["outputs"]
        key = re.search(r"numbers for (\S+) is:", context).group(1)
        ours = generate_needle(random.Random(0), 1, context.count(NOISE), "noise")
        our_key = re.search(r"numbers for (\S+) is:", ours.prompt).group(1)
        assert ours.answer == f" {ours.answer.strip(' .')}." and ours.answer.strip(" .").isdigit()
        assert skeleton(ours.prompt, our_key, ours.answer.strip(" .")) == skeleton(context, key, value)


def test_needles_are_deterministic_and_answer_the_queried_key() -> None:
    for keys in (1, 2, 3):
        for haystack in ("noise", "prose"):
            first = [generate_needle(random.Random(7), keys, 3, haystack) for _ in range(2)]
            assert first[0] == first[1]
            example = first[0]
            pairs = dict(re.findall(r"numbers for (\S+) is: (\d{7})\.", example.prompt))
            asked = re.search(r"number for (\S+) mentioned in the provided text\?", example.prompt).group(1)
            assert len(pairs) == keys and example.answer == f" {pairs[asked]}."
            assert example.prompt.endswith(f"The special magic number for {asked} mentioned in the provided text is")
            filler = [line for line in example.prompt.split("\n")[1:-1] if "special magic" not in line]
            assert len(filler) == 3 and all((line == NOISE) == (haystack == "noise") for line in filler)
            assert haystack == "noise" or set(filler) <= set(prose_sentences())


def test_bad_needle_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="n_keys"):
        generate_needle(random.Random(0), 0)
    with pytest.raises(ValueError, match="haystack"):
        generate_needle(random.Random(0), 1, 2, "essay")


def test_individual_digits_make_every_digit_one_token() -> None:
    corpus = [*documentation_prose()[:100], "numbers 1234567 and 7654321 and 1111111 " * 20]
    split = build_byte_level_tokenizer(corpus, 512, individual_digits=True)
    merged = build_byte_level_tokenizer(corpus, 512)
    for text in (" 1234567.", "x=90210, y=3.14"):
        digits = [t for t in split.tokenize(text) if any(c.isdigit() for c in t)]
        assert all(len(t) == 1 for t in digits) and len(digits) == sum(c.isdigit() for c in text)
        assert split.decode(split(text)["input_ids"]) == text
    assert any(sum(c.isdigit() for c in t) > 1 for t in merged.tokenize(" 1234567")), "BPE alone merges digits"


def test_recall_generators_draw_from_the_given_words() -> None:
    keys, values = ("alpha", "beta", "gamma", "delta"), ("one", "two", "three", "four")
    position = generate_position_recall(random.Random(1), 3, keys=keys, values=values)
    assert set(position.prompt.split()[:3]) <= set(keys) and set(position.answer.split()) <= set(values)
    mqar = generate_associative_recall(random.Random(1), 4, 2, keys=keys, values=values)
    words = mqar.prompt.split()
    pairs = dict(zip(words[0:8:2], words[1:8:2]))
    asked = words[9:11]
    assert set(pairs) == set(keys) and mqar.answer.split() == [pairs[k] for k in asked]
