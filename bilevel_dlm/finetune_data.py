"""Fine-tuning data: records from local files, ``save_to_disk`` folders or the hub (through HF ``datasets``),
in the formats the field uses, encoded as dllm's SFT pipeline encodes them, under a length policy.

Record formats (``detect_format`` names the one a record has):

- ``messages``: a chat, ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
  ending with an assistant turn;
- ``alpaca``: ``{"instruction", "input", "output"}``, the chat ``[user: instruction (+ "\\n\\n" + input when
  non-empty), assistant: output]``, each stripped (dllm ``data/alpaca.py``);
- ``prompt_completion``: ``{"prompt", "completion"}`` (or today's ``{"prompt", "answer"}``), a one-turn chat;
- ``text``: ``{"text"}``, continued pretraining: documents joined with EOS into rows of ``max_length``,
  every token supervised (:func:`pack_documents`);
- ``tokens``: ``{"input_ids", "labels"?, "attention_mask"?}``, already encoded.

A chat is encoded with the tokenizer's own chat template (dllm ``default_sft_map_fn``): ``input_ids`` is the
whole chat rendered without a generation prompt; the prompt, every turn before the last rendered with the
generation prompt, is labelled -100 (never masked, never supervised). With ``supervise="all"`` every
assistant turn is supervised, each bounded the same way. Without a template (``chat_template=False``, base
models) the row is ``<bos>? prompt response <eos>``. The length policy (``max_length``) is ``filter`` (drop a
longer record: the paper's LongAlpaca <= 4096), ``right`` (keep the prompt, clip the response; a prompt
longer than ``max_length`` is dropped) or ``error``; the counts are kept in a :class:`LengthReport`.
Batches are padded with supervised EOS (:func:`eos_pad_collate`, LLaDA's SFT: the model learns to stop).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import KEY_FIELDS

__all__ = ["FORMATS", "TRUNCATIONS", "DataError", "EncodingOptions", "LengthReport", "load_records",
           "detect_format", "to_messages", "encode_messages", "encode_record", "encode_records", "encode_dataset",
           "pack_documents", "eos_pad_collate"]

FORMATS = ("messages", "alpaca", "prompt_completion", "text", "tokens")
TRUNCATIONS = ("filter", "right", "error")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
ROW_FIELDS = ("input_ids", "labels", "attention_mask")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A record that cannot be used, named by its source, row and field."""


@dataclass(frozen=True)
class EncodingOptions:
    """How records become training rows.

    Attributes:
        format: one of :data:`FORMATS`; None detects it from each record.
        max_length: the length policy's limit (None: no limit; ``text`` needs one, it is the row length).
        truncation: ``filter``, ``right`` or ``error`` for a record longer than ``max_length``.
        chat_template: True: the tokenizer's chat template (an error when it has none); False: plain
            ``<bos>? prompt response <eos>``; None: the template when the tokenizer has one.
        supervise: ``last`` assistant turn, or ``all`` assistant turns.
        document_mask: packed ``text`` rows carry ``document_ids``, so that each document attends only to
            itself (a block-diagonal attention mask; the native models take it), as if it ran alone.
    """

    format: str | None = None
    max_length: int | None = None
    truncation: str = "filter"
    chat_template: bool | None = None
    supervise: str = "last"
    document_mask: bool = False

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"unknown record format {self.format!r}; choose one of {FORMATS} (or None to detect)")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {self.truncation!r}; choose one of {TRUNCATIONS}")
        if self.supervise not in ("last", "all"):
            raise ValueError(f"supervise must be 'last' or 'all', got {self.supervise!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass
class LengthReport:
    """What the length policy did: records read, kept whole, clipped (``right``) and dropped."""

    records: int = 0
    kept: int = 0
    clipped: int = 0
    dropped: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    def count(self, status: str, index: int) -> None:
        """One more record, ``kept``, ``clipped`` or ``dropped`` (row ``index``)."""
        self.records += 1
        setattr(self, status, getattr(self, status) + 1)
        if status == "dropped":
            self.dropped_rows.append(index)

    def line(self) -> str:
        return (f"{self.records} records: {self.kept} kept, {self.clipped} clipped, {self.dropped} dropped "
                "(longer than max_length)")

    def write(self, path: str | Path) -> None:
        """Record the counts in a run folder (JSON)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))


# ----- sources ---------------------------------------------------------------------------------------------
def load_records(source: str | Path, *, split: str = "train", streaming: bool = False) -> Any:
    """A ``datasets`` Dataset (IterableDataset with ``streaming``) of the records at ``source``: a local
    ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file, a ``save_to_disk`` folder, or a hub name (where the
    machine is online). ``split`` picks the split of a folder or hub dataset."""
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FILE_BUILDERS)}")
        if split != "train":
            raise DataError(f"{path} is one file, one split: split={split!r} applies to a save_to_disk folder or a "
                            "hub dataset; hold out a fraction of the file instead (--eval-fraction) or give another "
                            "file (--eval-data)")
        if path.suffix.lower() == ".jsonl":
            _check_json_lines(path)
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json",
                                                                   "state.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} has splits {sorted(loaded)}, not {split!r}; pass one of them as the split")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    if path.exists():
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk; give a data file")
    return datasets.load_dataset(str(source), split=split, streaming=streaming)


def _check_json_lines(path: Path) -> None:
    """Name the line of a JSON-lines file that does not parse (datasets' own error names neither)."""
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None


# ----- formats -----------------------------------------------------------------------------------------------
def detect_format(record: Mapping[str, Any], where: str = "record") -> str:
    """The format of one record, from its fields."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a record is a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "answer" in record):
        return "prompt_completion"
    if "text" in record:
        return "text"
    if "input_ids" in record:
        return "tokens"
    raise DataError(f"{where}: no known record format in fields {sorted(record)}; expected 'messages', "
                    "'instruction'/'input'/'output' (alpaca), 'prompt'/'completion', 'text' or 'input_ids'")


def _text(record: Mapping[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(record: Mapping[str, Any], fmt: str, where: str = "record") -> list[dict[str, str]]:
    """The chat of a ``messages``, ``alpaca`` or ``prompt_completion`` record, checked: known roles, string
    contents, at least one turn before the last, and a last turn by the assistant that is not empty."""
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where).strip()
        extra = _text(record, "input", where, required=False).strip()
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": _text(record, "output", where).strip()}]
    elif fmt == "prompt_completion":
        response = "completion" if "completion" in record else "answer"
        messages = [{"role": "user", "content": _text(record, "prompt", where)},
                    {"role": "assistant", "content": _text(record, response, where)}]
    elif fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        messages = [dict(m) for m in messages]
    else:
        raise DataError(f"{where}: a {fmt!r} record is not a chat")
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{index}] has role {message.get('role')!r}; roles are {ROLES}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{index}] needs a string 'content'")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: a chat needs a prompt turn and must end with an assistant turn to supervise")
    empty = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        raise DataError(f"{where}: messages[{empty[0]}] is an empty assistant turn; there is nothing to supervise")
    return messages


# ----- encoding ----------------------------------------------------------------------------------------------
def _ids(rendered: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)``'s ids: a list, or a mapping with ``input_ids`` (transformers 5)."""
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def _uses_template(tokenizer: Any, chat_template: bool | None, where: str) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and not has:
        raise DataError(f"{where}: the tokenizer has no chat template; give it one (tokenizer.chat_template = ...) "
                        "or encode without (chat_template=False, --no-chat-template) for a base model")
    return has if chat_template is None else chat_template


def encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, chat_template: bool | None = None,
                    supervise: str = "last", where: str = "record") -> dict[str, Any]:
    """``input_ids``, ``labels`` (-100 off the supervised turns) and ``prompt_len`` of one chat; text the
    tokenizer can only encode as its unknown token is refused."""
    for message in messages:
        _check_known(tokenizer, message["content"], where)
    return _encode_chat(tokenizer, messages, chat_template, supervise, where)


def _check_known(tokenizer: Any, text: str, where: str) -> list[int]:
    """The ids of ``text``, refused when the tokenizer could only encode part of it as its unknown token (a
    byte-level tokenizer never does; special tokens the template adds are not looked at)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None and unknown in ids and tokenizer.unk_token not in text:
        raise DataError(f"{where}: words outside the tokenizer's vocabulary (encoded as {tokenizer.unk_token!r}); "
                        "use a tokenizer that covers the text")
    return ids


def _encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], chat_template: bool | None, supervise: str,
                 where: str) -> dict[str, Any]:
    if _uses_template(tokenizer, chat_template, where):
        def render(turns: Sequence[Mapping[str, str]], generation_prompt: bool) -> list[int]:
            return _ids(tokenizer.apply_chat_template(list(turns), tokenize=True,
                                                      add_generation_prompt=generation_prompt))

        input_ids = render(messages, False)
        labels = [IGNORE_INDEX] * len(input_ids)
        turns = [len(messages) - 1] if supervise == "last" else [i for i, m in enumerate(messages)
                                                                  if m["role"] == "assistant" and i > 0]
        for turn in turns:
            start = render(messages[:turn], True)
            end = render(messages[: turn + 1], False) if turn + 1 < len(messages) else input_ids
            for prefix in (start, end):
                if input_ids[: len(prefix)] != prefix:
                    raise DataError(
                        f"{where}: the chat template renders the turns before messages[{turn}] as a sequence that "
                        "is not a prefix of the whole chat's, so the prompt / response boundary is undefined; use a "
                        "template whose renderings extend each other (or chat_template=False)")
            labels[len(start): len(end)] = input_ids[len(start): len(end)]
        prompt_len = len(render(messages[:turns[-1]], True))
        return {"input_ids": input_ids, "labels": labels, "prompt_len": prompt_len}
    if supervise == "all":
        raise DataError(f"{where}: supervise='all' bounds each assistant turn with the chat template; without one a "
                        "row has one response (the last turn)")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = bos + tokenizer("\n\n".join(m["content"] for m in messages[:-1]), add_special_tokens=False)["input_ids"]
    response = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response,
            "prompt_len": len(prompt)}


def _token_record(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    ids = record["input_ids"]
    if not isinstance(ids, list) or not ids or not all(type(v) is int for v in ids):
        raise DataError(f"{where}: 'input_ids' must be a non-empty list of integers")
    row = {"input_ids": list(ids), "labels": list(record.get("labels") or ids), "prompt_len": 0}
    if record.get("attention_mask") is not None:
        row["attention_mask"] = list(record["attention_mask"])
    for name in ("labels", "attention_mask"):
        if name in row and len(row[name]) != len(ids):
            raise DataError(f"{where}: {name!r} has {len(row[name])} entries, 'input_ids' {len(ids)}")
    return row


def _apply_length(row: dict[str, Any], options: EncodingOptions, where: str) -> tuple[dict[str, Any] | None, str]:
    """The row under the length policy and what happened to it: ``kept``, ``clipped`` or ``dropped``."""
    limit = options.max_length
    if limit is None or len(row["input_ids"]) <= limit:
        return row, "kept"
    if options.truncation == "error":
        raise DataError(f"{where}: {len(row['input_ids'])} tokens but max_length is {limit}; raise max_length, or "
                        "drop such records (truncation='filter') or clip their response (truncation='right')")
    if options.truncation == "right" and row["prompt_len"] <= limit:
        return {**row, **{name: row[name][:limit] for name in ROW_FIELDS if name in row}}, "clipped"
    return None, "dropped"


def encode_record(record: Mapping[str, Any], index: int, tokenizer: Any, options: EncodingOptions,
                  source: str = "data") -> dict[str, Any]:
    """One record that is not ``text``: its row (``input_ids``, ``labels``, ``attention_mask`` or None),
    ``record_index`` and ``status`` (``kept`` / ``clipped`` / ``dropped``: then the row is empty)."""
    where = f"{source} row {index}"
    if isinstance(record, Mapping):  # datasets gives a file's records one schema: absent fields are None
        record = {name: value for name, value in record.items() if value is not None}
    fmt = options.format or detect_format(record, where)
    if fmt == "text":
        raise DataError(f"{where}: text records are packed across records; encode them with encode_records")
    row = (_token_record(record, where) if fmt == "tokens"
           else encode_messages(tokenizer, to_messages(record, fmt, where), chat_template=options.chat_template,
                                supervise=options.supervise, where=where))
    row, status = _apply_length(row, options, where)
    row = row or {"input_ids": [], "labels": []}
    return {"input_ids": row["input_ids"], "labels": row["labels"], "attention_mask": row.get("attention_mask"),
            "record_index": index, "status": status}


def _is_text(record: Mapping[str, Any], options: EncodingOptions, where: str) -> bool:
    if options.format is not None:
        return options.format == "text"
    return detect_format({k: v for k, v in record.items() if v is not None}, where) == "text"


def encode_records(records: Iterable[Mapping[str, Any]], tokenizer: Any, options: EncodingOptions, *,
                   source: str = "data", report: LengthReport | None = None) -> Iterator[dict[str, Any]]:
    """Training rows (``input_ids``, ``labels`` as lists, ``attention_mask`` when given, and ``record_index``:
    the record a row came from) of ``records`` in order, under the length policy (counted in ``report``);
    ``text`` records are packed (:func:`pack_documents`). Lazy: a streamed source is encoded as it is read,
    with the same rows as in memory."""
    report = report if report is not None else LengthReport()
    documents: list[list[int]] = []
    for index, record in enumerate(records):
        if isinstance(record, Mapping) and _is_text(record, options, f"{source} row {index}"):
            where = f"{source} row {index}"
            documents.append(_check_known(tokenizer, _text(record, "text", where), where))
            report.count("kept", index)  # a document is never dropped: it is packed
            continue
        encoded = encode_record(record, index, tokenizer, options, source)
        report.count(encoded["status"], index)
        if encoded["status"] != "dropped":
            yield _row(encoded)
    if documents:
        if options.max_length is None:
            raise DataError(f"{source}: text records are packed into rows of max_length; give max_length")
        for row in pack_documents(documents, options.max_length, tokenizer.eos_token_id):
            yield row if options.document_mask else {k: v for k, v in row.items() if k != "document_ids"}


def _row(encoded: Mapping[str, Any]) -> dict[str, Any]:
    """A training row of :func:`encode_record`'s output (no status; an absent attention mask left out)."""
    return {name: encoded[name] for name in (*ROW_FIELDS, "record_index") if encoded.get(name) is not None}


# datasets fingerprints a mapped function by its name: this module's source joins the key, so that a cache
# written by another version of the encoding is never read back.
_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _encode_for_map(record: Mapping[str, Any], index: int, *, tokenizer: Any, options: EncodingOptions, source: str,
                    code: str) -> dict[str, Any]:
    return encode_record(record, index, tokenizer, options, source)


def encode_dataset(dataset: Any, tokenizer: Any, options: EncodingOptions, *, source: str = "data",
                   num_proc: int | None = None) -> tuple[list[dict[str, Any]], LengthReport]:
    """:func:`encode_records` of an in-memory ``datasets.Dataset`` through ``Dataset.map``: the encoding is
    cached by datasets (a rerun on the same file and settings reads it back), runs on ``num_proc`` processes
    and shows its progress; the same rows in the same order. A source with a ``text`` field takes the lazy
    path (packing crosses records)."""
    has_text = options.format == "text" or (options.format is None and "text" in dataset.column_names)
    if len(dataset) == 0 or has_text:
        report = LengthReport()
        return list(encode_records(dataset, tokenizer, options, source=source, report=report)), report
    encoded = dataset.map(_encode_for_map, with_indices=True, num_proc=num_proc, remove_columns=dataset.column_names,
                          fn_kwargs={"tokenizer": tokenizer, "options": options, "source": source, "code": _CODE},
                          desc=f"encoding {source}")
    report = LengthReport()
    for index, status in enumerate(encoded["status"]):
        report.count(status, index)
    return [_row(row) for row in encoded if row["status"] != "dropped"], report


def pack_documents(documents: Iterable[Sequence[int]], length: int, eos_token_id: int) -> Iterator[dict[str, Any]]:
    """Continued pretraining rows: every document followed by EOS, concatenated and cut into rows of
    ``length`` (the last one shorter when the tokens run out: no token lost or repeated), every token
    supervised; ``document_ids`` numbers the document each token belongs to."""
    tokens: list[int] = []
    owners: list[int] = []
    for number, document in enumerate(documents):
        tokens += [*document, eos_token_id]
        owners += [number] * (len(document) + 1)
        while len(tokens) >= length:
            yield {"input_ids": tokens[:length], "labels": tokens[:length], "document_ids": owners[:length]}
            tokens, owners = tokens[length:], owners[length:]
    if tokens:
        yield {"input_ids": tokens, "labels": list(tokens), "document_ids": owners}


def eos_pad_collate(examples: Sequence[Mapping[str, Any]], eos_token_id: int, length: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (or ``length``) with EOS that is attended and supervised (LLaDA's
    SFT: the model learns to end its answer); an example's own ``attention_mask`` is kept (a token record's
    padding stays hidden), ``example_index`` / ``epoch`` when every example has them."""
    width = max(length or 0, *(len(example["input_ids"]) for example in examples))
    batch = {"input_ids": torch.full((len(examples), width), eos_token_id, dtype=torch.long),
             "labels": torch.full((len(examples), width), eos_token_id, dtype=torch.long)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"])
        batch["labels"][row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]))
        if example.get("attention_mask") is not None:  # a token record's own padding stays hidden
            batch["attention_mask"][row, :n] = torch.as_tensor(example["attention_mask"])
    if all(example.get("document_ids") is not None for example in examples):  # the EOS padding: its own block
        batch["document_ids"] = torch.full_like(batch["input_ids"], -1)
        for row, example in enumerate(examples):
            batch["document_ids"][row, : len(example["input_ids"])] = torch.as_tensor(example["document_ids"])
    for name in KEY_FIELDS:
        if all(example.get(name) is not None for example in examples):
            batch[name] = torch.as_tensor([int(example[name]) for example in examples], dtype=torch.long)
    return batch
