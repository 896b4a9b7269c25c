"""Small tokenizers built locally (nothing is downloaded): a word-level one for the synthetic suite and a
byte-level BPE for any text; and the encoding of one (prompt, answer) pair into a supervised training row."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .vocab import TOKEN_REGEX, split_tokens, vocabulary

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "build_byte_level_tokenizer", "encode_example", "IGNORE_INDEX"]

# Fixed order: these take ids 0..4 in every tokenizer built here.
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
IGNORE_INDEX = -100


def build_tokenizer(vocabulary_words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: special tokens first (ids 0-4), then ``vocabulary_words`` in order.

    ``vocabulary_words`` defaults to every token the generators can emit. Text is split on whitespace,
    then into single digits, single punctuation characters and runs of letters. ``tok(text)`` prepends
    ``<bos>`` (so a prompt encodes as it does inside ``encode_example``); pass ``add_special_tokens=False``
    for the bare tokens. Duplicate words are kept once, at their first position.
    """
    words = list(dict.fromkeys(vocabulary() if vocabulary_words is None else vocabulary_words))
    specials = list(SPECIAL_TOKENS.values())
    for word in words:
        if split_tokens(word) != [word]:
            raise ValueError(
                f"vocabulary word {word!r} is not a single token under the splitting rule {TOKEN_REGEX!r}; "
                "use one digit, one punctuation character or one run of letters per entry"
            )
        if word in specials:
            raise ValueError(f"vocabulary word {word!r} is a special token; leave special tokens out of the list")
    vocab = {token: index for index, token in enumerate(specials + words)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(TOKEN_REGEX), behavior="isolated")]
    )
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def build_byte_level_tokenizer(corpus: Iterable[str], vocab_size: int = 512, *, individual_digits: bool = False
                               ) -> PreTrainedTokenizerFast:
    """Byte-level BPE (the GPT-2 / Qwen scheme: any string encodes, a space belongs to the next word's token,
    " Paris" -> "ĠParis") trained on ``corpus``; special tokens ``<pad>`` (0), ``<eos>`` (1), ``<mask>`` (2)
    and no BOS, like Dream's and Qwen's tokenizers. ``individual_digits``: every digit is its own token (as
    in LLaMA's and Qwen's tokenizers), so a number of n digits is n tokens whatever its value."""
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if individual_digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    specials = {"pad_token": "<pad>", "eos_token": "<eos>", "mask_token": "<mask>"}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def encode_example(
    tokenizer: PreTrainedTokenizerFast, prompt: str, answer: str, max_length: int
) -> dict[str, torch.Tensor]:
    """One training row of length ``max_length``: ``<bos> prompt answer <eos> <eos> ...``.

    As in LLaDA's supervised fine-tuning, the response is the answer followed by EOS up to
    ``max_length`` and all of it is supervised: ``labels`` equals ``input_ids`` on the answer and the EOS
    padding and is -100 on ``<bos>`` and the prompt. The EOS padding is part of the sequence the model
    sees, so ``attention_mask`` is one everywhere. Returns 1-D int64 tensors.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id in prompt_ids + answer_ids:
        known = tokenizer.get_vocab()
        unknown = sorted({word for word in split_tokens(f"{prompt} {answer}") if word not in known})
        raise ValueError(
            f"words outside the tokenizer's vocabulary: {unknown}; "
            "build the tokenizer with a vocabulary that covers them"
        )
    needed = 1 + len(prompt_ids) + len(answer_ids) + 1
    if needed > max_length:
        raise ValueError(
            f"example needs {needed} tokens (<bos> + {len(prompt_ids)} prompt + {len(answer_ids)} answer + <eos>) "
            f"but max_length is {max_length}; raise max_length or use a shorter context_length"
        )
    prefix = [tokenizer.bos_token_id, *prompt_ids]
    response = answer_ids + [tokenizer.eos_token_id] * (max_length - len(prefix) - len(answer_ids))
    input_ids = prefix + response
    labels = [IGNORE_INDEX] * len(prefix) + response
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.ones(max_length, dtype=torch.long),
    }
