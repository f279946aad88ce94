"""dataset → sequences: load with ``datasets``, render, tokenise, mask labels, truncate or pack.

Three shapes of example, detected per row (or forced with ``DataConfig.format``):

- ``text``: a plain text field; every token is a label.
- ``prompt`` + ``completion``: loss only on the completion.
- ``messages``: a chat rendered with the tokenizer's chat template; loss only on the assistant
  turns' content (the role header the template inserts before it is not a label).

A ``Sequence`` is one row of the cache: ``input_ids``, ``labels`` (-100 where ignored, not yet
shifted) and ``position_ids``. Packing (``DataConfig.packing``) concatenates whole examples into
rows of at most ``max_length`` tokens; each example keeps its own ``position_ids`` from 0 and the
first token of every example is never a label, so no label is predicted across an example
boundary. Precompute runs the base on each example separately, so no attention crosses a
boundary in what is cached either (see ``Sequence.segments``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from geocache.config import check_option_types
from geocache.signals import IGNORE_INDEX

FORMATS = ("auto", "text", "prompt_completion", "messages")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}


class BadRowError(ValueError):
    """A malformed example; the message names its row number."""


@dataclass
class DataConfig:
    """How examples become cached sequences. Every field changes which tokens are cached, so all
    of them are part of the cache fingerprint."""

    format: str = field(default="auto", metadata={"help": "auto | text | prompt_completion | messages."})
    text_field: str = field(default="text", metadata={"help": "Field holding plain text."})
    prompt_field: str = field(default="prompt", metadata={"help": "Field holding the prompt (no loss)."})
    completion_field: str = field(default="completion", metadata={"help": "Field holding the completion (loss)."})
    messages_field: str = field(default="messages", metadata={"help": "Field holding chat messages [{role, content}]."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per cached sequence; longer examples are truncated."})
    packing: bool = field(default=False, metadata={"help": "Pack whole examples into rows of up to max_length tokens."})
    add_eos: bool = field(default=True, metadata={"help": "Append the EOS token to text and completions."})
    add_bos: bool = field(default=True, metadata={
        "help": "Start text and prompts with the special tokens the tokenizer puts before text by default (BOS for "
                "Llama, Mistral or Gemma; nothing for Qwen), as the model saw in pretraining. Chat rows take what "
                "their template renders."})
    max_sequences: Optional[int] = field(default=None, metadata={"help": "Stop after this many cached sequences."})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Stop once this many tokens are cached."})
    split: str = field(default="train", metadata={
        "help": "Dataset split to read, or a slice of it (datasets' syntax: 'train[:1000]', 'train[10%:20%]'). Local files "
                "form one split, 'train'."})
    subset: Optional[str] = field(default=None, metadata={
        "help": "Hub dataset configuration (subset) name, e.g. 'en' for allenai/c4 or 'main' for openai/gsm8k."})
    text_sample_by: str = field(default="line", metadata={
        "help": "Examples of .txt files: one per line (as datasets reads them; blank lines skipped), paragraph or document."})
    data_revision: Optional[str] = field(default=None, metadata={
        "help": "Hub dataset revision (branch, tag or commit); default: the commit the hub resolves now, recorded and pinned."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Count and skip malformed rows instead of failing."})

    def __post_init__(self) -> None:
        check_option_types(self)
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} must be one of {', '.join(FORMATS)}")
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(f"text_sample_by={self.text_sample_by!r} must be one of {', '.join(TEXT_SAMPLE_BY)}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r} must be an integer >= 2")
        for name in ("max_sequences", "max_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name}={v!r} must be a positive integer or null")

    def fingerprint_fields(self, tokenizer=None) -> dict:
        """The settings that decide which tokens are cached (``skip_bad_rows`` included: it
        changes which rows survive). With the ``tokenizer``, ``add_bos`` is what it does there:
        False for a tokenizer that puts nothing before a text (Qwen's), whatever was asked."""
        fields = asdict(self)
        if tokenizer is not None:
            fields["add_bos"] = bool(self.add_bos and text_prefix(tokenizer))
        return fields


# The preprocessing fields that shape each example's tokens (not which rows are read): a training
# and an eval cache must agree on these, while their data, split, caps and bad-row policy differ.
TOKEN_SHAPING_FIELDS = ("format", "text_field", "prompt_field", "completion_field", "messages_field", "max_length", "packing",
                        "add_eos", "add_bos", "text_sample_by")


def token_shaping(preprocessing: dict) -> dict:
    return {k: preprocessing.get(k) for k in TOKEN_SHAPING_FIELDS}


@dataclass
class Sequence:
    """One cached row. ``segments`` are (start, end) token spans of the examples packed in it;
    ``rows_read``: how many input rows had been read when it was complete (for progress)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segments: list[tuple[int, int]]
    rows_read: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _local_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _EXTENSIONS)
        else:
            files.append(p)
    return files


def _split_name(split: str) -> str:
    """The split a split expression reads: 'train' for 'train', 'train[:100]' or 'train[10%:20%]'."""
    return split.split("[", 1)[0].strip()


def _row_slice(split: str) -> Optional[tuple[int, Optional[int]]]:
    """(start, stop) of a slice by row numbers, 'train[100:200]' or 'train[:1000]'; None for a whole
    split or a slice in percent (which needs the split's length)."""
    import re

    m = re.fullmatch(r"\s*[\w.-]+\[(\d*):(\d*)\]\s*", split)
    if not m:
        return None
    start, stop = int(m.group(1) or 0), int(m.group(2)) if m.group(2) else None
    if stop is not None and stop < start:
        raise ValueError(f"split={split!r} is an empty slice: its end comes before its start")
    return start, stop


def slice_bounds(data: str | list[str], split: str) -> Optional[tuple[int, Optional[int]]]:
    """Absolute (start, stop) rows of a split expression: a slice by row numbers as written; a
    slice in percent of local JSONL or Parquet files resolved as ``datasets`` resolves it
    (``ReadInstruction``, its rounding) from their exact row count; None otherwise (a whole split,
    or a percent slice of data whose rows cannot be counted cheaply and exactly)."""
    bounds = _row_slice(split)
    if bounds is not None or "%" not in split:
        return bounds
    paths = [Path(s) for s in ([data] if isinstance(data, str) else data)]
    if not all(p.exists() for p in paths):
        return None
    files = [f for f in _local_files(paths) if f.stat().st_size > 0]
    if not files or not (all(f.suffix == ".jsonl" for f in files) or all(f.suffix == ".parquet" for f in files)):
        return None
    if files[0].suffix == ".parquet":
        import pyarrow.parquet as pq

        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    else:  # rows are the non-blank lines, as the line-by-line reader gives them
        total = 0
        for f in files:
            with f.open("rb") as fh:
                total += sum(1 for line in fh if line.strip())
    import datasets

    (absolute,) = datasets.ReadInstruction.from_spec(split).to_absolute({_split_name(split): total})
    if absolute.to <= absolute.from_:  # as datasets refuses it
        raise ValueError(f"split={split!r} selects none of the {total} rows of the data: an empty slice")
    return absolute.from_, absolute.to


def _take(rows, bounds: Optional[tuple[int, Optional[int]]]):
    """A row-number slice of a streamed dataset (skip, then take): nothing past it is read."""
    if bounds is None:
        return rows
    start, stop = bounds
    rows = rows.skip(start) if start else rows
    return rows.take(stop - start) if stop is not None else rows


def load_examples(data: str | list[str], split: str = "train", streaming: bool = True, text_sample_by: str = "line",
                  revision: Optional[str] = None, subset: Optional[str] = None) -> Iterable[dict]:
    """Rows of local JSONL/JSON/Parquet/CSV/text files (or directories of them), or a hub dataset id
    (its ``subset``, at ``revision``).

    All local files must share one format and form one split, ``train``; ``split`` may slice it
    (``'train[:1000]'``, ``'train[10%:20%]'``). Text files give one row per line (``datasets``'
    default; blank lines, which separate rather than hold examples, are skipped), per paragraph or
    per file (``text_sample_by``). CSV columns are read as text (a completion ``42`` is the string
    ``"42"``, not a wrong type). Streaming by default, so large inputs never load whole; a slice by
    row numbers streams too (rows before it are skipped, none after it read), a slice in percent
    loads the split non-streaming (its length is needed; on the hub that downloads all of it).
    """
    import datasets

    bounds = slice_bounds(data, split) if streaming else None
    streaming = streaming and ("[" not in split or bounds is not None)
    whole = _split_name(split) if bounds is not None else split  # what datasets is asked for
    sources = [data] if isinstance(data, str) else list(data)
    paths = [Path(s) for s in sources]
    if all(p.exists() for p in paths):
        files = _local_files(paths)
        if not files:
            raise FileNotFoundError(f"no data files ({', '.join(sorted(_EXTENSIONS))}) found in {', '.join(sources)}")
        kinds = {_EXTENSIONS.get(f.suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(
                f"data files must all be one of {', '.join(sorted(_EXTENSIONS))} and share a format; got {sorted({f.suffix for f in files})}"
            )
        builder = kinds.pop()
        check_hub_options(sources, subset, revision)
        if builder != "text":
            _only_text(text_sample_by, f"data {', '.join(sources)} holds {builder} files")
        files = [f for f in files if f.stat().st_size > 0]  # datasets refuses empty files with an obscure error
        if not files:
            raise ValueError(f"data {', '.join(sources)} holds only empty files: there is nothing to read")
        if _split_name(split) != "train":
            raise ValueError(f"split={split!r}: local data files form one split, 'train' (or a slice of it, e.g. 'train[:1000]')")
        kwargs = {"data_files": [str(f) for f in files], "split": whole, "streaming": streaming}
        if builder == "csv":  # every column as text: datasets would infer 42 as an integer
            kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in _csv_header(files[0])})
            # ... and every cell as written: pandas reads NA, null, nan, N/A, None and an empty cell as
            # missing (a row "NA" was "missing field 'text'", naming the field it listed).
            kwargs.update(keep_default_na=False, na_filter=False)
        if builder == "json" and streaming and all(_json_layout(f) for f in files):
            # Read as written, row by row: a line that is not JSON is a bad row naming its file and
            # line (skippable with skip_bad_rows), not a parse error that ends the whole run; and
            # nested values stay as they are (datasets' streamed JSON reader turns a field whose
            # shape differs between rows, a tool's parameters, into a JSON string).
            return _take(datasets.IterableDataset.from_generator(_json_rows, gen_kwargs={"files": [str(f) for f in files]}), bounds)
        if builder != "text":
            return _as_written(_take(datasets.load_dataset(builder, **kwargs), bounds))
        rows = datasets.load_dataset(builder, sample_by=text_sample_by, **kwargs)
        return _take(rows.filter(lambda row: bool(row["text"].strip())), bounds)
    missing = [s for s, p in zip(sources, paths) if not p.exists()]
    if len(sources) == 1 and "/" in sources[0] and not sources[0].startswith((".", "/")):
        _only_text(text_sample_by, f"data {sources[0]!r} is a hub dataset")
        try:
            rows = datasets.load_dataset(sources[0], name=subset, split=whole, streaming=streaming, revision=revision)
        except Exception as exc:  # datasets raises many types; the user needs one sentence
            raise FileNotFoundError(f"data {sources[0]!r} is neither a local path nor a loadable hub dataset ({exc})") from None
        return _as_written(_take(rows, bounds))
    raise FileNotFoundError(f"data path(s) {missing} do not exist")


def check_hub_options(data: str | list[str], subset: Optional[str], revision: Optional[str]) -> None:
    """Refuse a hub dataset's options (its configuration, its commit) for local data, where they
    would be ignored without a word."""
    sources = [data] if isinstance(data, str) else list(data)
    if not sources or not all(Path(s).exists() for s in sources):
        return
    for option, value in (("subset", subset), ("data_revision", revision)):
        if value is not None:
            raise ValueError(f"{option}={value!r} selects a hub dataset's configuration or commit, but data {', '.join(map(str, sources))} "
                             "is local: drop the option")


def _only_text(text_sample_by: str, what: str) -> None:
    """Refuse a ``text_sample_by`` other than the default where no .txt file is read: it would be
    ignored, and the user would get line-by-line rows they did not ask for without a word."""
    if text_sample_by != "line":
        raise ValueError(f"text_sample_by={text_sample_by!r} splits .txt files only, but {what}: drop the option")


# A JSONL line that does not parse to an object arrives as a row holding only this key (and the
# reason); ``tokenize_example`` turns it into a ``BadRowError`` with the row's number.
_UNREADABLE = "__geocache_unreadable__"


def _json_layout(path: Path) -> Optional[str]:
    """"array" for a file holding one JSON array, "lines" for JSON Lines (a ``.jsonl``, or a ``.json``
    whose first line is a whole object), None for anything else (left to ``datasets``' reader)."""
    if path.suffix == ".jsonl":
        return "lines"
    with path.open("rb") as f:
        first = f.readline(1 << 20)  # a minified array may be one line of gigabytes: its start is enough
    if first.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "array"
    try:
        return "lines" if isinstance(json.loads(first.decode("utf-8-sig")), dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _json_rows(files: list[str]) -> Iterator[dict]:
    for name in files:
        if _json_layout(Path(name)) == "array":
            yield from _json_array_rows(name)
            continue
        with open(name, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:  # -sig: a byte-order mark (Windows editors) is not data
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield {_UNREADABLE: f"line {line_no} of {name} is not UTF-8 text ({exc.reason} at byte {exc.start})"}
                    continue
                if not line.strip():
                    continue  # as datasets' JSON reader: blank lines hold no row
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {_UNREADABLE: f"line {line_no} of {name} is not valid JSON ({exc.msg} at column {exc.colno})"}
                    continue
                yield row if isinstance(row, dict) else {_UNREADABLE: f"line {line_no} of {name} holds a {type(row).__name__}, not an object"}


def _json_array_rows(name: str) -> Iterator[dict]:
    # One array is parsed whole, as datasets' reader does too.
    try:
        with open(name, encoding="utf-8-sig") as f:
            rows = json.load(f)
    except UnicodeDecodeError as exc:
        yield {_UNREADABLE: f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})"}
        return
    except json.JSONDecodeError as exc:
        yield {_UNREADABLE: f"{name} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"}
        return
    for i, row in enumerate(rows):
        yield row if isinstance(row, dict) else {_UNREADABLE: f"element {i} of {name} holds a {type(row).__name__}, not an object"}


def _as_written(rows):
    """Rows of an Arrow-typed source (Parquet, datasets' JSON reader, the hub) without the nulls
    Arrow adds: one table has one schema, so a key that some row's nested dict holds (one tool's
    parameter, one call's argument) appears in every other row's as None, and a chat template
    would render it ("city": null in another tool's schema). As TRL does for tools, None-valued keys
    of nested dicts are dropped (top-level fields stay: a missing field is still a bad row)."""
    for row in rows:
        yield {k: _without_nulls(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _csv_header(path: Path) -> list[str]:
    import csv

    with path.open(newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a byte-order mark
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"CSV file {str(path)!r} has no header row naming its columns")
    return header


def data_fingerprint(data: str | list[str], revision: Optional[str] = None) -> dict:
    """Identity of the input data: sha256 of every local file (read in chunks: a file larger than
    memory is fine), or the hub id and the commit ``revision`` resolves to (None when the hub cannot
    be asked, offline: then nothing pins the data, and the record says so)."""
    sources = [data] if isinstance(data, str) else list(data)
    paths = [Path(s) for s in sources]
    if all(p.exists() for p in paths):
        h = hashlib.sha256()
        files = _local_files(paths)
        for f in files:
            h.update(f.name.encode())
            file_hash = hashlib.sha256()
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    file_hash.update(chunk)
            h.update(file_hash.digest())
        return {"kind": "local", "files": [str(f) for f in files], "sha256": h.hexdigest()}
    return {"kind": "hub", "id": sources[0], "revision": revision, "commit": _hub_commit(sources[0], revision)}


def _hub_commit(dataset_id: str, revision: Optional[str]) -> Optional[str]:
    """The commit sha a hub dataset's revision points at now, or None when the hub cannot be asked.
    Precompute loads that commit, so a resume never mixes two versions of the data."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset_id, revision=revision).sha
    except Exception:  # offline, unknown id (load_examples names it), no hub client
        return None


# ----------------------------------------------------------------------------------------------
# Rendering and tokenisation
# ----------------------------------------------------------------------------------------------


def _detect(row: dict, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    # Files mixing shapes load with every column in every row, None where absent.
    if row.get(cfg.messages_field) is not None:
        return "messages"
    if row.get(cfg.prompt_field) is not None or row.get(cfg.completion_field) is not None:
        return "prompt_completion"
    return "text"


def _field(row: dict, name: str, index: int) -> str:
    if name not in row or row[name] is None:
        raise BadRowError(f"row {index}: missing field {name!r} (fields: {sorted(row)})")
    value = row[name]
    if not isinstance(value, str):
        raise BadRowError(f"row {index}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def text_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (``add_special_tokens=True``):
    BOS for Llama, Mistral or Gemma tokenizers, nothing for Qwen's. Read off the tokenizer itself, so
    that whatever it appends after the text (some append EOS) is not taken with it."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i])
    return []


def tokenize_example(row: dict, index: int, tokenizer, cfg: DataConfig, prefix: Optional[list[int]] = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; labels are -100 where no loss is taken. Text and prompts
    start with ``prefix`` (default: ``text_prefix(tokenizer)`` when ``cfg.add_bos``), which is
    never a label.

    Raises ``BadRowError`` naming ``index`` for a missing field, a wrong type or empty text.
    """
    if not isinstance(row, dict):
        raise BadRowError(f"row {index}: expected a mapping, got {type(row).__name__}")
    if _UNREADABLE in row:
        raise BadRowError(f"row {index}: {row[_UNREADABLE]}")
    kind = _detect(row, cfg)
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    if kind != "messages" and prefix is None:
        prefix = text_prefix(tokenizer) if cfg.add_bos else []
    if kind == "text":
        # A .txt file's byte-order mark (Windows editors) is not text: datasets' text reader keeps it
        # on the first row (the JSONL and CSV readers here drop it).
        text = _field(row, cfg.text_field, index).removeprefix("\ufeff")
        if not text.strip():
            raise BadRowError(f"row {index}: field {cfg.text_field!r} is empty")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        return prefix + ids, [IGNORE_INDEX] * len(prefix) + ids
    if kind == "prompt_completion":
        prompt, completion = _decoded(row.get(cfg.prompt_field)), _decoded(row.get(cfg.completion_field))
        if isinstance(prompt, list) and isinstance(completion, list):
            # TRL's conversational prompt-completion: the conversation rendered whole by the chat
            # template, the loss on the completion's assistant turns only (never on the prompt's).
            if not completion:
                raise BadRowError(f"row {index}: field {cfg.completion_field!r} is an empty list of messages")
            return _tokenize_chat({**row, cfg.messages_field: prompt + completion}, index, tokenizer, cfg, first_labelled=len(prompt))
        if isinstance(prompt, list) or isinstance(completion, list):
            raise BadRowError(f"row {index}: fields {cfg.prompt_field!r} and {cfg.completion_field!r} must be both text or both lists "
                              "of messages (conversational, as TRL's), not one of each")
        prompt, completion = _field(row, cfg.prompt_field, index), _field(row, cfg.completion_field, index)
        if not completion.strip():
            raise BadRowError(f"row {index}: field {cfg.completion_field!r} is empty")
        p = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        return p + c, [IGNORE_INDEX] * len(p) + c
    return _tokenize_chat(row, index, tokenizer, cfg)


def _assistant_spans_by_content(messages: list[dict], text: str, tokenizer, index: int, first_labelled: int = 0) -> list[tuple[int, int]]:
    """Assistant spans of a conversation whose template renders a turn differently once later
    turns follow (Qwen3 drops the ``<think>`` block of every assistant turn before the last user
    message, so no prefix of the conversation renders as the start of the whole): each message's
    content is found in the whole rendering, in order, and an assistant span is its content plus
    the template's end of turn (what follows the content when a conversation ends on it, e.g.
    ``<|im_end|>\\n``). The role header and anything the template adds before the content (an
    empty ``<think>`` block) stay unlabelled, as they are with TRL's assistant masks."""
    probe = "\u2063geocache-probe\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], tokenize=False)
    close = rendered[rendered.index(probe) + len(probe):] if probe in rendered else ""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if _calls_tools(m):  # the rendered calls are the template's own text: nothing to search for
            raise BadRowError(f"row {index}: message {i} (assistant) calls tools, and this chat template renders the conversation so "
                              "that its turns cannot be read off its prefixes, so the calls' labels cannot be placed")
        content = m["content"] if m["content"] in text[cursor:] else m["content"].strip()
        at = text.find(content, cursor) if content else cursor
        if at < 0 and m["role"] == "assistant" and "</think>" in content:
            # Qwen3-style templates drop the reasoning of the turns before the last user message:
            # what is rendered of them, and labelled, is the answer after it.
            content = content.split("</think>")[-1].lstrip("\n")
            at = text.find(content, cursor) if content else cursor
        if at < 0:
            raise BadRowError(f"row {index}: message {i} ({m['role']}) is not in the chat template's rendering of the conversation, so its labels cannot be placed")
        end = at + len(content)
        if m["role"] == "assistant" and i >= first_labelled:
            end += len(close) if close and text.startswith(close, end) else 0
            spans.append((at, end))
        cursor = end
    return spans


def _decoded(value):
    """``value`` parsed if it is a JSON-encoded list or object (``datasets`` streams a ``.json``
    array of chat rows whose messages mix types, e.g. ``"tool_calls": null``, as one JSON string
    per message), else unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _calls_tools(message: dict) -> bool:
    """An assistant turn in the OpenAI/transformers tool-call form: ``tool_calls`` a non-empty list
    (its ``content`` may be null); the template renders the calls, and they are labelled with it."""
    return message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list) and len(message["tool_calls"]) > 0


def _tokenize_chat(row: dict, index: int, tokenizer, cfg: DataConfig, first_labelled: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: the chat template's rendering, labelled on the
    assistant turns from message ``first_labelled`` on (a conversational completion's)."""
    messages = row.get(cfg.messages_field)
    messages = _decoded(messages)  # streamed JSON without a schema: messages (or each one) may arrive still encoded
    if isinstance(messages, list):
        messages = [_decoded(m) for m in messages]
    if not isinstance(messages, list) or not messages:
        raise BadRowError(f"row {index}: field {cfg.messages_field!r} must be a non-empty list of messages")
    # tool calls may arrive JSON-encoded too (a copy: the caller's row stays as it was)
    messages = [{**m, "tool_calls": _decoded(m["tool_calls"])} if isinstance(m, dict) and m.get("tool_calls") is not None else m
                for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (isinstance(m.get("content"), str) or _calls_tools(m)):
            raise BadRowError(f"row {index}: message {i} must have string 'role' and 'content' (or, for an assistant turn, a list of 'tool_calls')")
    if not any(m["role"] == "assistant" and ((m.get("content") or "").strip() or _calls_tools(m)) for m in messages[first_labelled:]):
        where = " in its completion" if first_labelled else ""
        raise BadRowError(f"row {index}: no non-empty assistant turn to learn from{where}")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template, so chat `messages` rows cannot be rendered")
    # Tool definitions beside the messages, as TRL's conversational datasets carry them ("tools").
    tools = _decoded(row.get("tools"))
    if tools is not None and not isinstance(tools, list):
        raise BadRowError(f"row {index}: field 'tools' must be a list of tool definitions, got {type(tools).__name__}")
    from jinja2.exceptions import TemplateError, TemplateSyntaxError, UndefinedError

    def render(msgs, generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateSyntaxError as exc:
            raise ValueError(f"the tokenizer's chat template does not compile: {exc}") from None
        except (UndefinedError, TypeError) as exc:  # e.g. a template that reads a tool-call turn's absent content
            raise BadRowError(f"row {index}: the chat template cannot render this conversation ({exc})") from None
        except TemplateError as exc:  # the template's own raise_exception: a conversation it refuses
            raise BadRowError(f"row {index}: the chat template refuses this conversation ({exc})") from None

    text = render(messages)
    # Assistant spans in characters: from the end of the prompt that asks for that turn (the
    # template's generation prompt, i.e. the role header) to the end of the turn as rendered.
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i >= first_labelled:
            if i == 0:  # nothing before it to render (transformers refuses an empty conversation)
                spans = _assistant_spans_by_content(messages, text, tokenizer, index, first_labelled)
                break
            asking = render(messages[:i], generation_prompt=True)
            prefix = render(messages[: i + 1])
            # A template that rewrites earlier turns, or has no generation prompt (the role header
            # would be labelled): the spans are found by content instead.
            if not text.startswith(prefix) or (i and asking == render(messages[:i])):
                spans = _assistant_spans_by_content(messages, text, tokenizer, index, first_labelled)
                break
            spans.append((len(asking), len(prefix)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        # A token ending inside a span: also the one that carries its first characters across the
        # span's start (BPE's " sure" after a header's ":"), as TRL's char-to-token assistant masks.
        inside = any(s < b <= e for s, e in spans) and b > a
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels


# ----------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------


def iter_sequences(rows: Iterable[dict], tokenizer, cfg: DataConfig, bad_rows: Optional[list] = None,
                   unlabelled_rows: Optional[list] = None, truncated_rows: Optional[list] = None,
                   first_row: int = 0) -> Iterator[Sequence]:
    """Cached sequences from example rows, in order, truncated or packed, capped by the config.

    ``bad_rows`` collects the messages of skipped rows when ``cfg.skip_bad_rows``;
    ``unlabelled_rows`` the numbers of rows left with nothing to learn (no label after the first
    token once truncated to ``max_length``: a prompt longer than it), which are never cached;
    ``truncated_rows`` the numbers of the cached rows that were longer than ``max_length`` and lost
    their end (with or without packing: an example is never split across rows). Rows are numbered
    from ``first_row`` (where a slice of the data starts), 0-based, in messages and lists.
    """
    prefix = text_prefix(tokenizer) if cfg.add_bos else []
    n_seq = n_tok = 0
    pending: list[tuple[list[int], list[int], bool, int]] = []  # (ids, labels, truncated, row index)
    pending_len = 0

    def emit(examples, rows_read):
        ids, labels, pos, segs = [], [], [], []
        for e_ids, e_labels, cut, row in examples:
            segs.append((len(ids), len(ids) + len(e_ids)))
            # The first token of an example is never predicted from the example before it.
            first = IGNORE_INDEX if ids else e_labels[0]
            ids += e_ids
            labels += [first] + e_labels[1:]
            pos += list(range(len(e_ids)))
            if cut and truncated_rows is not None:
                truncated_rows.append(row)
        return Sequence(ids, labels, pos, segs, rows_read)

    def capped() -> bool:
        return (cfg.max_sequences is not None and n_seq >= cfg.max_sequences) or (cfg.max_tokens is not None and n_tok >= cfg.max_tokens)

    index = -1
    for index, row in enumerate(rows):
        try:
            ids, labels = tokenize_example(row, first_row + index, tokenizer, cfg, prefix)
        except BadRowError as exc:
            if not cfg.skip_bad_rows:
                raise
            if bad_rows is not None:
                bad_rows.append(str(exc))
            continue
        example = (ids[: cfg.max_length], labels[: cfg.max_length], len(ids) > cfg.max_length, first_row + index)
        if all(label == IGNORE_INDEX for label in example[1][1:]):
            if unlabelled_rows is not None:
                unlabelled_rows.append(first_row + index)
            continue  # nothing to learn after truncation
        if not cfg.packing:
            seq = emit([example], index + 1)
        elif pending_len + len(example[0]) <= cfg.max_length:
            pending.append(example)
            pending_len += len(example[0])
            continue
        else:
            seq = emit(pending, index)
            pending, pending_len = [example], len(example[0])
        yield seq
        n_seq, n_tok = n_seq + 1, n_tok + len(seq)
        if capped():
            return
    if pending:
        yield emit(pending, index + 1)


def count_rows(data: str | list[str], cfg: DataConfig) -> Optional[int]:
    """How many rows ``load_examples`` will give for local data, read cheaply for a progress bar's
    ETA (Parquet metadata; lines of JSONL, CSV and text files, blank ones skipped; paragraphs; files),
    or None where it cannot be known without loading (hub datasets, slices, JSON arrays). CSV
    records with quoted newlines are over-counted: an estimate, never a limit."""
    sources = [data] if isinstance(data, str) else list(data)
    paths = [Path(s) for s in sources]
    if cfg.split != "train" or not all(p.exists() for p in paths):
        return None
    files = [f for f in _local_files(paths) if f.stat().st_size > 0]
    kinds = {_EXTENSIONS.get(f.suffix) for f in files}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if kind == "text" and cfg.text_sample_by == "document":
        return len(files)
    total = 0
    for f in files:
        with f.open("rb") as fh:
            if kind == "json" and fh.read(64).lstrip().startswith(b"["):
                return None  # one JSON array: rows unknown until parsed
            fh.seek(0)
            blank_before, lines, paragraphs = True, 0, 0
            for line in fh:
                blank = not line.strip()
                lines += not blank
                paragraphs += blank_before and not blank
                blank_before = blank
        total += paragraphs if kind == "text" and cfg.text_sample_by == "paragraph" else lines - (kind == "csv")
    return total


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, normaliser, specials,
    chat template)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()

