"""Fine-tuning data (bilevel_dlm.finetune_data): chat records encoded as dllm's SFT pipeline encodes them
(checked against a plain implementation of that rule written here from its description), Alpaca records,
the length policy, streaming == in memory, packing, clear errors, and the README recipe end to end on a
50-record LongAlpaca-format file through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.cli import FORMATS as CLI_FORMATS
from bilevel_dlm.cli import TRUNCATIONS as CLI_TRUNCATIONS
from bilevel_dlm.cli import main
from bilevel_dlm.finetune_data import (FORMATS, TRUNCATIONS, DataError, EncodingOptions, LengthReport,
                                       encode_messages, encode_records, eos_pad_collate, load_records, pack_documents)
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.tasks import build_byte_level_tokenizer

LLADA_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                  "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                  "\n\n{% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. Paris is the capital of France, 1889.",
          "Summarise the text below in one sentence. Question: what is 12 + 30? Answer: 42!",
          "Unicode: café, naïve, 東京, emoji 🙂 and symbols <> [] {}."] * 20


def tokenizer(template: str | None = LLADA_TEMPLATE):
    tok = build_byte_level_tokenizer(CORPUS, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                          "<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def tiny_llada(tok, length: int) -> LLaDAModelLM:
    """A tiny LLaDA sized to ``tok``'s vocabulary."""
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_config(vocab_size=len(tok), embedding_size=len(tok), mask_token_id=tok.mask_token_id,
                                    max_sequence_length=length))


def model_folder(tmp_path, tok, length: int) -> Path:
    """A model folder the command line loads: the tiny LLaDA and its tokenizer."""
    folder = tmp_path / "model"
    tiny_llada(tok, length).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ids(rendered) -> list[int]:
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def reference_row(tok, messages):
    """dllm's default_sft_map_fn as its description states it: the whole chat without a generation prompt;
    the prompt (every turn but the last, with the generation prompt) labelled -100."""
    full = ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False))
    prompt = ids(tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
    return full, [-100] * len(prompt) + full[len(prompt):]


def reference_alpaca(record):
    """dllm's data/alpaca.py as described: instruction (+ blank line + input when non-empty), stripped."""
    instruction, extra = record["instruction"].strip(), (record.get("input") or "").strip()
    return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": record["output"].strip()}]


CHATS = {
    "single turn": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    "multi turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                   {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And the year?"},
                   {"role": "assistant", "content": "1889!"}],
    "unicode": [{"role": "user", "content": "Café in 東京? 🙂"}, {"role": "assistant", "content": "naïve: oui, 東京."}],
}
ALPACA = [{"instruction": "  Summarise the text below.  ", "input": "The quick brown fox.", "output": " A fox. "},
          {"instruction": "What is 12 + 30?", "input": "", "output": "42"},
          {"instruction": "Answer in one word.", "output": "Paris"}]


def test_cli_choices_match_the_module():
    assert CLI_FORMATS == FORMATS and CLI_TRUNCATIONS == TRUNCATIONS


@pytest.mark.parametrize("template", [LLADA_TEMPLATE, CHATML_TEMPLATE], ids=["llada", "chatml"])
@pytest.mark.parametrize("chat", CHATS, ids=list(CHATS))
def test_chat_rows_equal_the_reference_convention(template, chat):
    tok = tokenizer(template)
    row = encode_messages(tok, CHATS[chat])
    expected_ids, expected_labels = reference_row(tok, CHATS[chat])
    assert row["input_ids"] == expected_ids and row["labels"] == expected_labels
    answer = tok.decode([t for t in row["labels"] if t != -100])
    assert answer.startswith(CHATS[chat][-1]["content"])


@pytest.mark.parametrize("template", [LLADA_TEMPLATE, CHATML_TEMPLATE], ids=["llada", "chatml"])
def test_alpaca_records_are_the_reference_chats(template, tmp_path):
    tok = tokenizer(template)
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in ALPACA))
    rows = list(encode_records(load_records(path), tok, EncodingOptions(format="alpaca")))
    for row, record in zip(rows, ALPACA, strict=True):
        assert (row["input_ids"], row["labels"]) == reference_row(tok, reference_alpaca(record))


def test_every_assistant_turn_can_be_supervised():
    tok = tokenizer()
    chat = CHATS["multi turn"]
    row = encode_messages(tok, chat, supervise="all")
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label == -100:
            if current:
                spans.append(tok.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(tok.decode(current))
    assert [span.split("<|eot_id|>")[0] for span in spans] == ["Paris.", "1889!"]
    assert encode_messages(tok, chat)["labels"].count(-100) > row["labels"].count(-100)


def test_without_a_template_rows_are_bos_prompt_response_eos():
    tok = tokenizer(None)
    row = encode_messages(tok, CHATS["single turn"])
    prompt = tok("What is 12 + 30?", add_special_tokens=False)["input_ids"]
    response = tok("42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == prompt + response  # this tokenizer has no BOS, like Dream's
    assert row["labels"] == [-100] * len(prompt) + response


def test_filter_and_right_truncation_count_and_cut_as_stated():
    tok = tokenizer()
    chats = [CHATS["single turn"], CHATS["multi turn"],
             [{"role": "user", "content": "Summarise. " * 30}, {"role": "assistant", "content": "ok"}]]
    lengths = [len(encode_messages(tok, chat)["input_ids"]) for chat in chats]
    prompt_lengths = [encode_messages(tok, chat)["prompt_len"] for chat in chats]
    limit = prompt_lengths[1] + 2  # the multi-turn chat's prompt fits, its whole response does not
    assert lengths[0] <= limit < lengths[1] and prompt_lengths[2] > limit
    records = [{"messages": chat} for chat in chats]

    report = LengthReport()
    kept = list(encode_records(records, tok, EncodingOptions(max_length=limit, truncation="filter"), report=report))
    assert [row["record_index"] for row in kept] == [0]
    assert (report.records, report.kept, report.clipped, report.dropped, report.dropped_rows) == (3, 1, 0, 2, [1, 2])

    report = LengthReport()
    clipped = list(encode_records(records, tok, EncodingOptions(max_length=limit, truncation="right"), report=report))
    assert [row["record_index"] for row in clipped] == [0, 1]
    full = encode_messages(tok, chats[1])
    assert clipped[1]["input_ids"] == full["input_ids"][:limit] and clipped[1]["labels"] == full["labels"][:limit]
    assert (report.kept, report.clipped, report.dropped, report.dropped_rows) == (1, 1, 1, [2])

    with pytest.raises(DataError, match=r"data row 1: \d+ tokens but max_length is"):
        list(encode_records(records, tok, EncodingOptions(max_length=limit, truncation="error")))


def test_streaming_gives_the_rows_of_the_in_memory_dataset(tmp_path):
    tok = tokenizer()
    path = tmp_path / "mixed.jsonl"
    records = [{"messages": chat} for chat in CHATS.values()] + [{"prompt": "Capital?", "completion": "Paris"}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records * 3))
    options = EncodingOptions(max_length=60, truncation="right")
    in_memory = list(encode_records(load_records(path), tok, options))
    streamed = list(encode_records(load_records(path, streaming=True), tok, options))
    assert in_memory == streamed and len(in_memory) == 9  # the multi-turn prompt (74 tokens) is dropped


def test_packing_loses_no_token_and_separates_documents_with_eos():
    documents = [[5, 6, 7], [8], [9, 10, 11, 12, 13], []]
    rows = list(pack_documents(documents, 4, eos_token_id=1))
    assert [len(row["input_ids"]) for row in rows] == [4, 4, 4, 1]  # the last row keeps what is left
    flat = [token for row in rows for token in row["input_ids"]]
    assert flat == [5, 6, 7, 1, 8, 1, 9, 10, 11, 12, 13, 1, 1]  # an empty document is its EOS
    assert all(row["labels"] == row["input_ids"] for row in rows)
    assert [owner for row in rows for owner in row["document_ids"]] == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3]
    tok = tokenizer()
    text_rows = list(encode_records([{"text": "Paris is the capital."}, {"text": "1889!"}], tok,
                                    EncodingOptions(max_length=5)))
    joined = [token for row in text_rows for token in row["input_ids"]]
    expected = (tok("Paris is the capital.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                + tok("1889!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert joined == expected


def test_eos_padding_keeps_a_token_records_own_padding_hidden():
    batch = eos_pad_collate([{"input_ids": [3, 4, 0], "labels": [3, 4, -100], "attention_mask": [1, 1, 0]},
                             {"input_ids": [6], "labels": [6]}], eos_token_id=1)
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_eos_padding_is_attended_and_supervised():
    batch = eos_pad_collate([{"input_ids": [3, 4, 5], "labels": [-100, 4, 5], "example_index": 7, "epoch": 1},
                             {"input_ids": [6], "labels": [6], "example_index": 2, "epoch": 1}], eos_token_id=1)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [6, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 4, 5], [6, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["example_index"].tolist() == [7, 2]


@pytest.mark.parametrize("record, message", [
    ({"conversation": []}, r"row 0: no known record format in fields \['conversation'\]"),
    ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     r"row 0: messages\[0\] has role 'human'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"row 0: messages\[1\] is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant turn"),
    ({"instruction": "hi", "output": 3}, "field 'output' must be a string"),
])
def test_bad_records_are_named_by_row_and_field(record, message):
    with pytest.raises(DataError, match=message):
        list(encode_records([record], tokenizer(), EncodingOptions(), source="data"))


def test_a_template_that_does_not_extend_its_prompt_and_a_missing_template_are_refused():
    reversed_template = ("{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="not a prefix of the whole chat"):
        encode_messages(tokenizer(reversed_template), CHATS["multi turn"])
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        encode_messages(tokenizer(None), CHATS["single turn"], chat_template=True)


def test_the_data_order_of_a_datasets_source_is_fixed_by_the_seed_and_a_resume_continues_it(tmp_path):
    tok = tokenizer()
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}: what is {i} + 30?", "output": str(i + 30)})
                            + "\n" for i in range(12)))
    rows = [{"input_ids": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"])}
            for r in encode_records(load_records(path), tok, EncodingOptions(format="alpaca"))]
    config = MemDLMConfig(memory=MemoryConfig(rank=2, layer_fraction=0.5), outer=OuterConfig(lr=1e-3), seed=4)

    def model():
        return tiny_llada(tok, 128)

    full = MemoryWrapper(model(), config, tokenizer=tok)
    full.fit(rows, max_steps=5, batch_size=4, save_every=2, output_dir=tmp_path / "run", progress=False)
    resumed = MemoryWrapper(model(), config, tokenizer=tok)
    resumed.fit(rows, max_steps=5, batch_size=4, resume_from=tmp_path / "run" / "checkpoint-2", progress=False)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_the_readme_recipe_runs_on_a_50_record_longalpaca_file(tmp_path, capsys):
    """The paper's data pipeline at toy scale: LongAlpaca-format records, the chat template, --truncation
    filter at --max-length, the MemDLM preset with an outer LoRA, through the command line."""
    tok = tokenizer()
    folder = model_folder(tmp_path, tok, 256)
    records = [{"instruction": f"Read the passage and answer. Passage: {'The quick brown fox. ' * (4 * (i % 9))}"
                               f"Question: what is {i} + 30?", "input": "", "output": f"{i + 30}."} for i in range(50)]
    data = tmp_path / "longalpaca.json"
    data.write_text(json.dumps(records))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("memory: {rank: 4}\nouter: {lr: 1.0e-3, lora: {apply: true, rank: 4, alpha: 8.0}}\n")
    code = main(["train", "--model", str(folder), "--data", str(data), "--format", "alpaca", "--max-length", "160",
                 "--truncation", "filter", "--config", str(recipe), "--steps", "3", "--batch-size", "4",
                 "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    lengths = [len(encode_messages(tok, reference_alpaca(r))["input_ids"]) for r in records]
    kept = sum(length <= 160 for length in lengths)
    assert 0 < kept < 50, "the file must exercise the filter"
    assert code == 0, err
    counts = f"50 records: {kept} kept, 0 clipped, {50 - kept} dropped"
    assert counts in err

    example = Path(__file__).parents[1] / "examples" / "memdlm_trainer.py"
    result = subprocess.run([sys.executable, str(example), "--model", str(folder), "--train_file", str(data),
                             "--format", "alpaca", "--max_length", "160", "--truncation", "filter",
                             "--memdlm", str(recipe), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                             "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
                             "--save_strategy", "no", "--disable_tqdm", "true"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert counts in result.stdout


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe", "mdlm", "llada2"])
def test_the_document_mask_runs_each_packed_document_as_if_alone(family):
    """A row packing three documents, with document_ids: every document's hidden states equal those of the
    document run alone (the native models take the block-diagonal mask; rotary positions are relative)."""
    from bilevel_dlm.integrations import tiny_model
    from bilevel_dlm.tasks import build_tokenizer

    torch.manual_seed(0)
    model = tiny_model(family, build_tokenizer()).double().eval()
    with torch.no_grad():  # MDLM's adaLN-zero initialisation gates attention off: perturb every weight
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    wrapper = MemoryWrapper(model)
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(5, 100, (n,), generator=generator).tolist() for n in (5, 3, 7)]
    row = next(pack_documents(documents, 64, eos_token_id=1))
    batch = wrapper.prepare({"input_ids": torch.tensor([row["input_ids"]]),
                             "document_ids": torch.tensor([row["document_ids"]])})
    with torch.no_grad():
        packed = wrapper.view.hidden(batch.x0, batch.model_attention_mask)[0]
        unmasked = wrapper.view.hidden(batch.x0, None)[0]
        start = 0
        for document in documents:
            ids = torch.tensor([[*document, 1]])
            alone = wrapper.view.hidden(ids, None)[0]
            # Dream predicts a token from the position before it, so a document's first prediction reads the
            # previous document's last position (in use that position is Dream's protected BOS, never masked).
            skip = 1 if family == "dream" else 0
            torch.testing.assert_close(packed[start + skip:start + ids.shape[1]], alone[skip:], atol=1e-6, rtol=0)
            start += ids.shape[1]
    assert (packed - unmasked).abs().max() > 1e-3, "control: without the mask the documents see each other"


def test_text_rows_carry_document_ids_only_when_asked():
    tok = tokenizer()
    records = [{"text": "Paris is the capital."}, {"text": "1889!"}]
    plain = list(encode_records(records, tok, EncodingOptions(max_length=64)))
    masked = list(encode_records(records, tok, EncodingOptions(max_length=64, document_mask=True)))
    assert "document_ids" not in plain[0] and set(masked[0]["document_ids"]) == {0, 1}
    batch = eos_pad_collate(masked + [{"input_ids": [5], "labels": [5], "document_ids": [0]}], tok.eos_token_id)
    assert batch["document_ids"][1].tolist()[1:] == [-1] * (batch["input_ids"].shape[1] - 1)


def test_cart_refuses_packed_documents_kept_apart():
    model = LLaDAModelLM(tiny_config())
    wrapper = MemoryWrapper(model, MemDLMConfig(outer=OuterConfig(objective="cart")))
    batch = {"input_ids": torch.randint(2, 120, (2, 10)), "document_ids": (torch.arange(10) >= 4).long().expand(2, -1)}
    with pytest.raises(NotImplementedError, match="use objective='mdlm' for such batches"):
        wrapper.step(batch)


def test_the_cached_parallel_encoding_gives_the_rows_of_the_plain_one(tmp_path):
    """encode_dataset (datasets.map: cached, num_proc workers) == encode_records, rows and counts; a second
    call reads datasets' cache (its file is not rewritten), and the cache key holds the encoder's code."""
    import bilevel_dlm.finetune_data as module
    from bilevel_dlm.finetune_data import encode_dataset

    tok = tokenizer()
    path = tmp_path / "mixed.jsonl"
    records = [{"messages": chat} for chat in CHATS.values()] + [{"prompt": "Capital?", "completion": "Paris"},
                                                                 {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records * 4))
    options = EncodingOptions(max_length=60, truncation="right")
    report = LengthReport()
    plain = list(encode_records(load_records(path), tok, options, report=report))
    dataset = load_records(path)
    cache = Path(dataset.cache_files[0]["filename"]).parent
    before = {file: file.stat().st_mtime_ns for file in cache.glob("cache-*.arrow")}
    for num_proc in (None, 2):
        rows, counted = encode_dataset(dataset, tok, options, num_proc=num_proc)
        assert rows == plain and counted == report
    written = {file: file.stat().st_mtime_ns for file in cache.glob("cache-*.arrow") if file not in before}
    assert written, "the encoding was not cached"
    encode_dataset(dataset, tok, options)
    assert {file: file.stat().st_mtime_ns for file in written} == written, "the second encoding was recomputed"
    module._CODE = "another version of the encoder"
    try:
        encode_dataset(dataset, tok, options)
    finally:
        module._CODE = __import__("hashlib").sha256(Path(module.__file__).read_bytes()).hexdigest()
    assert len(set(cache.glob("cache-*.arrow")) - set(before)) > len(written), "a new encoder read the old cache"


def test_a_file_mixing_chats_and_text_encodes_alike_both_ways(tmp_path):
    from bilevel_dlm.finetune_data import encode_dataset

    tok = tokenizer()
    path = tmp_path / "mixed.jsonl"
    records = [{"messages": CHATS["single turn"]}, {"text": "Paris is the capital."}, {"text": "1889!"}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    options = EncodingOptions(max_length=64)
    report = LengthReport()
    plain = list(encode_records(load_records(path), tok, options, report=report))
    rows, counted = encode_dataset(load_records(path), tok, options)
    assert rows == plain and counted == report
    assert (report.records, report.kept) == (3, 3), "documents are counted as records, not as packed rows"


def test_a_tokenizer_whose_unknown_token_is_its_eos_encodes_plain_chats():
    """GPT-2's (and MDLM's) tokenizer: one token for unk, BOS and EOS; only the text is checked for it."""
    tok = tokenizer(None)
    tok.unk_token = tok.eos_token
    row = encode_messages(tok, CHATS["single turn"])
    assert row["input_ids"][-1] == tok.eos_token_id == tok.unk_token_id


def test_a_data_file_has_one_split(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(DataError, match="one file, one split"):
        load_records(path, split="test")


def test_fit_batches_with_the_collate_function_it_is_given():
    """eos_pad_collate in fit: the batches of the global order, padded with supervised EOS."""
    from functools import partial

    from bilevel_dlm.data import EpochOrder, iterate_batches

    tok = tokenizer()
    rows = [dict(r) for r in encode_records([{"messages": chat} for chat in CHATS.values()], tok, EncodingOptions())]
    collate = partial(eos_pad_collate, eos_token_id=tok.eos_token_id)
    batch = next(iterate_batches(rows, 3, seed=4, collate_fn=collate))
    order = [index for _, index in EpochOrder(3, 4)]
    expected = eos_pad_collate([{**rows[i], "example_index": i, "epoch": 0} for i in order], tok.eos_token_id)
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    assert (batch["labels"] == tok.eos_token_id).sum() > len(order), "EOS padding is supervised"


def test_the_command_line_holds_out_a_fraction_or_a_split_for_evaluation(tmp_path, capsys):
    import datasets

    tok = tokenizer()
    folder = model_folder(tmp_path, tok, 128)
    records = [{"instruction": f"What is {i} + 30?", "output": str(i + 30)} for i in range(20)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["train", "--model", str(folder), "--steps", "2", "--batch-size", "4", "--no-progress",
              "--device", "cpu", "--eval-every", "2"]
    assert main([*common, "--data", str(data), "--eval-fraction", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "15 records: 15 kept" in err and "5 records: 5 kept" in err  # training part, then the held-out part

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:12]),
                          "test": datasets.Dataset.from_list(records[12:])}).save_to_disk(str(splits))
    assert main([*common, "--data", str(splits), "--eval-split", "test"]) == 0
    err = capsys.readouterr().err
    assert "12 records: 12 kept" in err and "8 records: 8 kept" in err
    assert main([*common, "--data", str(splits), "--split", "validation"]) == 2
    assert "not 'validation'" in capsys.readouterr().err
