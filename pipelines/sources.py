"""Where documents come from: expanding a source path into files and reading their records.

A record that cannot be a training document (bad bytes, bad JSON, no text) is yielded
with a reason instead of a text, so that callers count and skip it and every record
keeps a stable index within its file: the data cursor counts records, not good ones.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from raytron.pipelines.embedded import FORMATS as EMBEDDED_FORMATS
from raytron.pipelines.embedded import embedded_texts

EMBEDDED_PREFIX = "embedded:"
CHAT, PROMPT_COMPLETION = "chat", "prompt_completion"
SAMPLE_FORMATS = (CHAT, PROMPT_COMPLETION)  # fine-tuning samples, in JSONL or Parquet files
FORMATS = ("auto", "text", "jsonl", "parquet", *SAMPLE_FORMATS)  # auto: by extension
DOCUMENTS = ("file", "paragraph")  # what one document of a text file is
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t]*\r?\n")

# Reasons a record is skipped; each becomes a counter in logs and MLflow.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
EMPTY = "empty"
UNREADABLE = "unreadable"
OVERSIZED = "oversized"  # longer than data.max_document_mb: likely not prose
INVALID_SAMPLE = "invalid_sample"  # a chat or prompt-completion sample raytron cannot learn from


class SourceError(ValueError):
    """A source path that cannot be read; the message says what to fix."""


@dataclass(frozen=True)
class Record:
    index: int  # position of the record in its file, bad records included
    text: str | None  # None when the record is skipped
    reason: str = ""  # why it was skipped


def sample_kind(path: str, declared: str) -> str:
    """A source's `format` with `auto` resolved for the embedded corpora, whose records
    are what they are (the reverse-words task is chat)."""
    if declared == "auto" and path.startswith(EMBEDDED_PREFIX):
        return EMBEDDED_FORMATS.get(path.removeprefix(EMBEDDED_PREFIX), declared)
    return declared


def list_files(path: str) -> list[str]:
    """The files of a source, in a stable order: a file, a folder (recursively), a glob."""
    return [name for name, _ in list_file_versions(path)]


def list_file_versions(path: str) -> list[tuple[str, str]]:
    """(file, version) of each file of a source (see `list_files`); the version, size and
    modification time from the same listing, is what the token cache is keyed by."""
    if path.startswith(EMBEDDED_PREFIX):
        name = path.removeprefix(EMBEDDED_PREFIX)
        if name not in EMBEDDED_FORMATS:
            names = ", ".join(EMBEDDED_PREFIX + name for name in EMBEDDED_FORMATS)
            raise SourceError(f"'{path}' is no embedded corpus. Fix: use one of {names}.")
        return [(path, embedded_version(name))]
    if not path.strip():
        raise SourceError("the path is empty. Fix: give a file, folder, glob or URI.")
    try:
        if any(char in path for char in "*?["):
            names = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(path),
                                                                  recursive=True)
                           if os.path.isfile(p))
            files = [(i.path, version(i)) for i in pafs.LocalFileSystem().get_file_info(names)]
        else:
            files = list_with_pyarrow(path)
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise SourceError(f"'{path}' cannot be listed ({error}). Fix: give an existing file, "
                          "folder or glob, or an s3:// or gs:// URI.") from None
    if not files:
        raise SourceError(
            f"'{path}' matches no file. Fix: give an existing file, folder or glob "
            "(relative paths are taken from the current directory)."
        )
    return files


def version(info: pafs.FileInfo) -> str:
    return f"{info.size}:{info.mtime_ns}"


@functools.cache
def embedded_version(name: str) -> str:
    """An embedded corpus's content hash: it comes with the Python (or raytron) in use."""
    return hashlib.sha256("\0".join(embedded_texts(name)).encode()).hexdigest()[:16]


def list_with_pyarrow(path: str) -> list[tuple[str, str]]:
    filesystem, inner = filesystem_and_path(path)
    info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [(path if "://" in path else inner, version(info))]
    if info.type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(inner, recursive=True)
    infos = sorted((i for i in filesystem.get_file_info(selector)
                    if i.type == pafs.FileType.File and not Path(i.path).name.startswith(".")),
                   key=lambda i: i.path)
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    return [(scheme + i.path, version(i)) for i in infos]


def filesystem_and_path(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def file_format(path: str, declared: str) -> str:
    """`text`, `jsonl` or `parquet`: as declared, or by extension (after .gz/.zst/...);
    fine-tuning samples are in Parquet files by their extension, else in JSONL."""
    if declared not in ("auto", *SAMPLE_FORMATS):
        return declared
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) or declared != "auto" else "text"


@dataclass(frozen=True)
class CorpusFile:
    """One file of a source and how to read it."""

    path: str
    format: str = "auto"
    text_field: str = "text"
    document: str = "file"  # text files: one document per file, or per paragraph
    max_document_bytes: int = 64 * 2**20
    messages_field: str = "messages"  # format chat
    prompt_field: str = "prompt"  # format prompt_completion
    completion_field: str = "completion"
    version: str = ""  # size and modification time when listed; empty: never cached

    @property
    def fields(self) -> list[str]:
        """The fields of a JSON object or Parquet row that make one record."""
        if self.format == CHAT:
            return [self.messages_field]
        if self.format == PROMPT_COMPLETION:
            return [self.prompt_field, self.completion_field]
        return [self.text_field]

    def value(self, row: dict):
        """A row's record: its text field, or a fine-tuning sample as JSON text (which the
        tokenizer stage decodes); None when a field is missing or of the wrong type."""
        if self.format == CHAT:
            messages = row.get(self.messages_field)
            return json.dumps(messages) if isinstance(messages, list) and messages else None
        if self.format == PROMPT_COMPLETION:
            prompt, completion = row.get(self.prompt_field), row.get(self.completion_field)
            if isinstance(prompt, str) and isinstance(completion, str):
                return json.dumps({"prompt": prompt, "completion": completion})
            return None
        return row.get(self.text_field)


def read_records(file: CorpusFile, start: int = 0) -> Iterator[Record]:
    """Records of one file from index `start` on; an unreadable file yields one skipped
    record. Compressed files (.gz, .zst or .zstd, .bz2, .lz4) are decompressed on the fly."""
    if file.path.startswith(EMBEDDED_PREFIX):
        yield from embedded_records(file.path.removeprefix(EMBEDDED_PREFIX), start)
        return
    try:
        filesystem, inner = filesystem_and_path(file.path)
        with filesystem.open_input_stream(inner, compression=compression(file.path)) as stream:
            raw = stream.read()
    except (OSError, ValueError):
        yield Record(0, None, UNREADABLE)
        return
    fmt = file_format(file.path, file.format)
    if fmt == "jsonl":
        records = jsonl_records(raw, file, start)
    elif fmt == "parquet":
        records = parquet_records(raw, file, start)
    elif file.document == "paragraph":
        blocks = [b.strip() for b in PARAGRAPH_BREAK.split(raw) if b.strip()] or [b""]
        records = (text_record(i, block, file.max_document_bytes)  # an empty file: one
                   for i, block in enumerate(blocks) if i >= start)  # empty record
    else:
        records = iter([text_record(0, raw, file.max_document_bytes)] if start == 0 else [])
    yield from records


def compression(path: str) -> str | None:
    """The codec of a compressed file, by its extension (pyarrow's own detection does not
    know `.zstd`); None for a plain file."""
    return next((codec for suffix, codec in COMPRESSIONS.items()
                 if path.lower().endswith(suffix)), None)


def text_record(index: int, raw: bytes, max_bytes: int) -> Record:
    if len(raw) > max_bytes:
        return Record(index, None, OVERSIZED)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Record(index, None, INVALID_UTF8)
    return Record(index, text) if text.strip() else Record(index, None, EMPTY)


def field_record(index: int, value, max_bytes: int) -> Record:
    """A record from a JSON object or a Parquet cell: a non-empty string, or a reason."""
    if not isinstance(value, str):
        return Record(index, None, MISSING_FIELD)
    if not value.strip():
        return Record(index, None, EMPTY)
    if len(value) > max_bytes:  # characters: at least as many bytes
        return Record(index, None, OVERSIZED)
    return Record(index, value)


def jsonl_records(raw: bytes, file: CorpusFile, start: int) -> Iterator[Record]:
    lines = (line for line in raw.split(b"\n") if line.strip())
    for index, line in enumerate(lines):
        if index < start:
            continue
        if len(line) > file.max_document_bytes:
            yield Record(index, None, OVERSIZED)
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield Record(index, None, INVALID_UTF8)
            continue
        except json.JSONDecodeError:
            yield Record(index, None, MALFORMED_JSON)
            continue
        yield field_record(index, file.value(value) if isinstance(value, dict) else None,
                           file.max_document_bytes)


def parquet_records(raw: bytes, file: CorpusFile, start: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(pa.BufferReader(raw))
    except (pa.ArrowException, OSError):
        yield Record(0, None, UNREADABLE)
        return
    rows = table.metadata.num_rows
    if any(name not in table.schema_arrow.names for name in file.fields):
        yield from (Record(i, None, MISSING_FIELD) for i in range(start, rows))
        return
    values = table.read(columns=file.fields).slice(start).to_pylist()
    for index, row in enumerate(values, start=start):
        yield field_record(index, file.value(row), file.max_document_bytes)


def embedded_records(name: str, start: int = 0) -> Iterator[Record]:
    for index, text in enumerate(embedded_texts(name)):
        if index >= start:
            yield Record(index, text)


def split_point(text: str) -> float:
    """Where a document falls in [0, 1) by a hash of its text: held out below `val_share`."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(text: str, share: float) -> bool:
    """Stable split by content hash, so a document never moves between train and validation."""
    return share > 0 and split_point(text) < share
