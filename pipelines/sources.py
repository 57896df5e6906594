"""Where documents come from: expanding a source path into files and reading their records.

A record that cannot be a training document (bad bytes, bad JSON, no text) is yielded
with a reason instead of a text, so that callers count and skip it and every record
keeps a stable index within its file: the data cursor counts records, not good ones.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from raytron.pipelines.embedded import FORMATS as EMBEDDED_FORMATS
from raytron.pipelines.embedded import embedded_texts

EMBEDDED_PREFIX = "embedded:"
CHAT, PROMPT_COMPLETION, PREFERENCE = "chat", "prompt_completion", "preference"
# fine-tuning samples, in JSONL or Parquet files; preference: pairs (prompt, chosen, rejected)
SAMPLE_FORMATS = (CHAT, PROMPT_COMPLETION, PREFERENCE)
FORMATS = ("auto", "text", "jsonl", "parquet", *SAMPLE_FORMATS)  # auto: by extension
DOCUMENTS = ("file", "paragraph")  # what one document of a text file is
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
BLANK_LINE = re.compile(rb"[ \t]*\r?")  # a line of spaces or tabs only ends a paragraph
CHUNK_BYTES = 2**20  # read from a file at a time
RETRY_DELAYS = (0.5, 1.0)  # seconds before each retry of an object-storage read that failed
COMPRESSED_PARQUET_DOCUMENTS = 16  # a compressed Parquet file is held whole: up to this
# many times data.max_document_mb
PARQUET_BATCH_ROWS = 1024  # rows made Python values at a time
MAX_SAMPLE_DEPTH = 32  # a chat sample nesting deeper is no conversation

# Reasons a record is skipped; each becomes a counter in logs and MLflow.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
EMPTY = "empty"
UNREADABLE = "unreadable"
OVERSIZED = "oversized"  # longer than data.max_document_mb: likely not prose
INVALID_SAMPLE = "invalid_sample"  # a fine-tuning sample raytron cannot learn from


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
    return list_source(path).files


# What a listing passes over, as (one, several) for `Listing.summary`.
HIDDEN = ("hidden path", "hidden paths")  # a name starting with '.', not named in the source
LOOP = ("symlink loop", "symlink loops")  # a link to a folder that holds the link
REPEAT = ("folder linked twice", "folders linked twice")  # a folder already listed
SPECIAL = ("broken link or special file", "broken links or special files")  # no file


@dataclass(frozen=True)
class Listing:
    """The files of a source, (file, version) in a stable order, and the counts of what
    the listing passed over (hidden paths, symlink loops, ...): shown when a run starts."""

    files: list[tuple[str, str]]
    skipped: dict[tuple[str, str], int] = field(default_factory=dict)

    def summary(self) -> str:
        """'skipped 3 hidden paths and 1 symlink loop'; empty when nothing was skipped."""
        parts = [f"{n} {what[n != 1]}" for what, n in self.skipped.items() if n]
        if len(parts) > 2:
            parts = [", ".join(parts[:-1]), parts[-1]]
        return "skipped " + " and ".join(parts) if parts else ""


def list_source(path: str) -> Listing:
    """The files of a source: a file, a folder (recursively: each real folder once, hidden
    paths left out unless named), a glob (`**` for any folders) or an object-storage URI."""
    if path.startswith(EMBEDDED_PREFIX):
        name = path.removeprefix(EMBEDDED_PREFIX)
        if name not in EMBEDDED_FORMATS:
            names = ", ".join(EMBEDDED_PREFIX + name for name in EMBEDDED_FORMATS)
            raise SourceError(f"'{path}' is no embedded corpus. Fix: use one of {names}.")
        return Listing([(path, embedded_version(name))])
    if not path.strip():
        raise SourceError("the path is empty. Fix: give a file, folder, glob or URI.")
    try:
        if path.startswith("file://"):  # a local path: it may hold symlinks
            local = list_local(filesystem_and_path(path)[1])
            listing = Listing([("file://" + name, v) for name, v in local.files], local.skipped)
        elif "://" in path:
            listing = list_object_storage(path)
        elif has_wildcard(path):
            listing = list_glob(os.path.expanduser(path))
        else:
            listing = list_local(os.path.abspath(os.path.expanduser(path)))
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise SourceError(f"'{path}' cannot be listed ({error}). Fix: give an existing file, "
                          "folder or glob, or an s3:// or gs:// URI.") from None
    if not listing.files:
        raise SourceError(
            f"'{path}' matches no file. Fix: give an existing file, folder or glob "
            "(relative paths are taken from the current directory)."
        )
    return listing


def has_wildcard(path: str) -> bool:
    return any(char in path for char in "*?[")


def version(info: pafs.FileInfo | os.stat_result) -> str:
    """A file's size and modification time: what changes when the file does."""
    if isinstance(info, os.stat_result):
        return f"{info.st_size}:{info.st_mtime_ns}"
    return f"{info.size}:{info.mtime_ns}"


@functools.cache
def embedded_version(name: str) -> str:
    """An embedded corpus's content hash: it comes with the Python (or raytron) in use."""
    return hashlib.sha256("\0".join(embedded_texts(name)).encode()).hexdigest()[:16]


def list_object_storage(path: str) -> Listing:
    """An object or every object under a prefix; object storage has no links, so pyarrow's
    recursive listing is safe. Objects under a hidden name ('.'...) are left out."""
    filesystem, inner = filesystem_and_path(path)
    info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return Listing([(path, version(info))])
    if info.type != pafs.FileType.Directory:
        return Listing([])
    scheme = path.split("://", 1)[0] + "://"
    files, hidden = [], set()
    for i in filesystem.get_file_info(pafs.FileSelector(inner, recursive=True)):
        parts = i.path.removeprefix(inner.rstrip("/") + "/").split("/")
        first = next((n for n, part in enumerate(parts) if part.startswith(".")), None)
        if first is not None:
            hidden.add("/".join(parts[: first + 1]))
        elif i.type == pafs.FileType.File:
            files.append((scheme + i.path, version(i)))
    return Listing(sorted(files), {HIDDEN: len(hidden)})


def list_local(path: str) -> Listing:
    """A local file, or the files of a local folder (see `walk`)."""
    if os.path.isfile(path):
        return Listing([(path, version(os.stat(path)))])
    if os.path.isdir(path):
        return walk(path, ("**",))
    if os.path.lexists(path):  # a broken link, a pipe or a device: reading it could wait
        return Listing([], {SPECIAL: 1})  # forever
    return Listing([])


def list_glob(pattern: str) -> Listing:
    """The files a glob matches, as Python's glob.glob(recursive=True) finds them (a
    wildcard matches no hidden name) but following each real folder once (see `walk`)."""
    parts = pattern.split(os.sep)
    first = next(n for n, part in enumerate(parts) if has_wildcard(part))
    root = os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else ".")
    if not os.path.isdir(root):
        return Listing([])
    return walk(os.path.abspath(root), tuple(part for part in parts[first:] if part))


@dataclass(frozen=True)
class Visit:
    """A folder to list: its path, where in the pattern it was reached, and the real
    folders above it (to tell a symlink loop from a second link to a folder)."""

    path: str
    states: frozenset[int]
    above: tuple[tuple[int, int], ...]


def walk(root: str, pattern: tuple[str, ...]) -> Listing:
    """The files under `root` whose path below it matches `pattern` (glob components, `**`
    any folders), sorted. Each real folder is listed once for each place in the pattern
    it is reached at, so that symlink loops end; folders linked to are listed after the
    real ones, so that a folder reached both ways is listed under its real path."""
    files: list[tuple[str, str]] = []
    skipped = {HIDDEN: 0, LOOP: 0, REPEAT: 0, SPECIAL: 0}
    seen: set[tuple[tuple[int, int], frozenset[int]]] = set()
    real = [Visit(root, closure(pattern, {0}) - {len(pattern)}, ())]
    linked: collections.deque[Visit] = collections.deque()
    while real or linked:
        visit = real.pop() if real else linked.popleft()
        stat = os.stat(visit.path)
        folder = (stat.st_dev, stat.st_ino)
        if (folder, visit.states) in seen:
            skipped[LOOP if folder in visit.above else REPEAT] += 1
            continue
        seen.add((folder, visit.states))
        with os.scandir(visit.path) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            after = advance(pattern, visit.states, entry.name)
            if not after:
                skipped[HIDDEN] += bool(advance(pattern, visit.states, entry.name, True))
                continue
            kind = entry_kind(entry)
            if kind == "folder" and after - {len(pattern)}:
                below = Visit(entry.path, after - {len(pattern)}, (*visit.above, folder))
                (linked if entry.is_symlink() else real).append(below)
            elif kind != "folder" and len(pattern) in after:
                if kind == "file":
                    files.append((entry.path, version(entry.stat())))
                else:
                    skipped[LOOP if kind == "loop" else SPECIAL] += 1
    return Listing(sorted(files), skipped)


def advance(pattern: tuple[str, ...], states: frozenset[int], name: str,
            hidden: bool = False) -> frozenset[int]:
    """The places in `pattern` after matching one more path component, `name`, from
    `states`; a wildcard matches a hidden name only when `hidden`, as in glob.glob."""
    after = set()
    for state in states:
        if state == len(pattern):
            continue
        part = pattern[state]
        if name.startswith(".") and not hidden and not part.startswith("."):
            continue
        if part == "**":
            after.add(state)
        elif fnmatch.fnmatchcase(name, part):
            after.add(state + 1)
    return closure(pattern, after)


def closure(pattern: tuple[str, ...], states: set[int]) -> frozenset[int]:
    """`states` with each `**` also matching no folder."""
    states = set(states)
    for state in sorted(states):
        while state < len(pattern) and pattern[state] == "**":
            state += 1
            states.add(state)
    return frozenset(states)


def entry_kind(entry: os.DirEntry) -> str:
    """file, folder, loop (a link that resolves to itself) or other (a broken link, a
    pipe, a device), following links."""
    try:
        if entry.is_dir():
            return "folder"
        return "file" if entry.is_file() else "other"
    except OSError as error:
        return "loop" if error.errno == errno.ELOOP else "other"


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
    chosen_field: str = "chosen"  # format preference (with prompt_field)
    rejected_field: str = "rejected"
    version: str = ""  # size and modification time when listed; empty: never cached

    @property
    def fields(self) -> list[str]:
        """The fields of a JSON object or Parquet row that make one record."""
        if self.format == CHAT:
            return [self.messages_field]
        if self.format == PROMPT_COMPLETION:
            return [self.prompt_field, self.completion_field]
        if self.format == PREFERENCE:
            return [self.prompt_field, self.chosen_field, self.rejected_field]
        return [self.text_field]

    @property
    def field_keys(self) -> list[str]:
        """The source's config keys that name `fields`, in their order."""
        if self.format == CHAT:
            return ["messages_field"]
        if self.format == PROMPT_COMPLETION:
            return ["prompt_field", "completion_field"]
        if self.format == PREFERENCE:
            return ["prompt_field", "chosen_field", "rejected_field"]
        return ["text_field"]

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
        if self.format == PREFERENCE:
            pair = dict(zip(("prompt", "chosen", "rejected"), map(row.get, self.fields),
                            strict=True))
            kinds = {type(value) for value in pair.values()}
            return json.dumps(pair) if kinds in ({str}, {list}) else None
        return row.get(self.text_field)


def read_records(file: CorpusFile, start: int = 0) -> Iterator[Record]:
    """Records of one file from index `start` on, read as a stream: memory is bounded by
    `max_document_bytes` (a longer record is skipped as it is read, never held), not by
    the file's size, also for compressed files (.gz, .zst or .zstd, .bz2, .lz4), which
    are decompressed on the fly; Parquet files are read a row group at a time.

    A file that fails to read ends with one UNREADABLE record at the index of the first
    record it did not yield (the records before it are kept). On object storage, a read
    that fails (OSError) is first retried after each of RETRY_DELAYS: the file is opened
    again and read on from the first record not yielded yet, so none comes twice.
    """
    if file.path.startswith(EMBEDDED_PREFIX):
        yield from embedded_records(file.path.removeprefix(EMBEDDED_PREFIX), start)
        return
    delays = iter(RETRY_DELAYS if "://" in file.path else ())
    index = start
    while True:
        try:
            for record in file_records(file, index):
                yield record
                index = record.index + 1
            return
        except OSError:
            delay = next(delays, None)
            if delay is None:
                break
            time.sleep(delay)
        except (ValueError, pa.ArrowException):  # not what its name says: no use retrying
            break
    yield Record(index, None, UNREADABLE)


def file_records(file: CorpusFile, start: int) -> Iterator[Record]:
    """The records of a file from `start` on, by its format; raises what reading raises."""
    fmt = file_format(file.path, file.format)
    if fmt == "parquet":
        yield from parquet_records(file, start)
    elif fmt == "jsonl" or file.document == "paragraph":
        with open_stream(file.path) as stream:
            lines = bounded_lines(stream, file.max_document_bytes)
            if fmt == "jsonl":
                yield from jsonl_records(lines, file, start)
            else:
                yield from paragraph_records(lines, file.max_document_bytes, start)
    elif start == 0:  # a whole file is one document: read one byte more than it may hold
        with open_stream(file.path) as stream:
            raw = read_at_most(stream, file.max_document_bytes + 1)
        yield text_record(0, raw, file.max_document_bytes)


def open_stream(path: str) -> pa.NativeFile:
    """A file's bytes as a stream, decompressed on the fly when its extension says so."""
    filesystem, inner = filesystem_and_path(path)
    return filesystem.open_input_stream(inner, compression=compression(path))


def compression(path: str) -> str | None:
    """The codec of a compressed file, by its extension (pyarrow's own detection does not
    know `.zstd`); None for a plain file."""
    return next((codec for suffix, codec in COMPRESSIONS.items()
                 if path.lower().endswith(suffix)), None)


def read_at_most(stream: pa.NativeFile, limit: int) -> bytes:
    """Up to `limit` bytes of `stream`, read in chunks (never a `limit`-sized buffer)."""
    pieces, size = [], 0
    while size < limit and (piece := stream.read(min(CHUNK_BYTES, limit - size))):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def bounded_lines(stream: pa.NativeFile, max_bytes: int) -> Iterator[bytes | None]:
    """The lines of `stream` without their newline, the last one too (as bytes.split
    gives them). A line longer than `max_bytes` is not held but read past up to its
    newline, and comes as None; or as b"" when it is whitespace only (a blank line)."""
    held: list[bytes] = []  # the current line, while it fits
    size, blank = 0, True  # its length so far; whether it was whitespace only, once too long
    while chunk := stream.read(CHUNK_BYTES):
        for number, piece in enumerate(chunk.split(b"\n")):
            if number:  # a newline ended the line
                yield None if size > max_bytes and not blank else b"".join(held)
                held, size, blank = [], 0, True
            size += len(piece)
            if size <= max_bytes:
                held.append(piece)
            elif held or blank:  # too long: let go of it, remember if it was blank
                blank = blank and not any(part.strip() for part in (*held, piece))
                held = []
    yield None if size > max_bytes and not blank else b"".join(held)


def text_record(index: int, raw: bytes, max_bytes: int) -> Record:
    if len(raw) > max_bytes:
        return Record(index, None, OVERSIZED)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Record(index, None, INVALID_UTF8)
    return Record(index, text) if text.strip() else Record(index, None, EMPTY)


def paragraph_records(lines: Iterator[bytes | None], max_bytes: int,
                      start: int) -> Iterator[Record]:
    """A text file's paragraphs (see `paragraphs`) from `start` on; a file without one is
    one empty record."""
    index = 0
    for block in paragraphs(lines, max_bytes):
        if index >= start:
            yield Record(index, None, OVERSIZED) if block is None else text_record(
                index, block, max_bytes)
        index += 1
    if index == 0 and start == 0:
        yield Record(0, None, EMPTY)


def paragraphs(lines: Iterator[bytes | None], max_bytes: int) -> Iterator[bytes | None]:
    """The blocks of lines between blank lines (BLANK_LINE), stripped, leaving out blocks
    of whitespace; None for a block longer than `max_bytes` once stripped, or with a line
    longer than that (whitespace included), which is read past, not held. (Whitespace
    after `max_bytes` is not held either: more text after it makes the block too long, and
    without it the block is stripped of it.)"""
    held: list[bytes] = []
    size = length = 0  # the block's size so far, and up to its last non-whitespace byte
    for line in lines:
        if line is not None and BLANK_LINE.fullmatch(line):
            yield from ended(held, length, max_bytes)
            held, size, length = [], 0, 0
        elif line is None:  # a line too long
            held, size, length = [], max_bytes + 1, max_bytes + 1
        elif size or line.strip():  # not whitespace before a block
            line = line if size else line.lstrip()
            fits = size <= max_bytes
            size += len(line) + bool(size)
            if line.strip():
                length = size - (len(line) - len(line.rstrip()))
            if length > max_bytes:
                held.clear()
            elif fits:
                held.append(line)
    yield from ended(held, length, max_bytes)


def ended(held: list[bytes], length: int, max_bytes: int) -> Iterator[bytes | None]:
    """The block of the `held` lines, if it has text: None when it was too long."""
    if length > max_bytes:
        yield None
    elif block := b"\n".join(held).strip():
        yield block


def jsonl_records(lines: Iterator[bytes | None], file: CorpusFile,
                  start: int) -> Iterator[Record]:
    """One record per non-blank line; the lines before `start` are counted, not parsed."""
    index = -1
    for line in lines:
        if line is not None and not line.strip():
            continue
        index += 1
        if index >= start:
            yield Record(index, None, OVERSIZED) if line is None else json_record(
                index, line, file)


def json_record(index: int, line: bytes, file: CorpusFile) -> Record:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return Record(index, None, INVALID_UTF8)
    except (json.JSONDecodeError, RecursionError):  # nested deeper than Python recurses
        return Record(index, None, MALFORMED_JSON)
    return row_record(index, file, value)


def row_record(index: int, file: CorpusFile, row) -> Record:
    """The record of a JSON value or a Parquet row: its document or sample, or a reason."""
    if not isinstance(row, dict):
        return Record(index, None, MISSING_FIELD)
    if file.format in (CHAT, PREFERENCE) and any(
            nested_deeper(row.get(name), MAX_SAMPLE_DEPTH) for name in file.fields):
        return Record(index, None, INVALID_SAMPLE)  # no chat; it would overflow json.dumps
    return field_record(index, file.value(row), file.max_document_bytes)


def nested_deeper(value, depth: int) -> bool:
    """Whether lists and dicts nest in `value` more than `depth` levels deep, found level
    by level (not recursively)."""
    level = [value]
    for _ in range(depth):
        level = [child for item in level if isinstance(item, list | dict)
                 for child in (item.values() if isinstance(item, dict) else item)]
    return any(isinstance(item, list | dict) for item in level)


def field_record(index: int, value, max_bytes: int) -> Record:
    """A record from a JSON object or a Parquet cell: a non-empty string, or a reason."""
    if not isinstance(value, str):
        return Record(index, None, MISSING_FIELD)
    if not value.strip():
        return Record(index, None, EMPTY)
    if len(value) > max_bytes:  # characters: at least as many bytes
        return Record(index, None, OVERSIZED)
    return Record(index, value)


def parquet_records(file: CorpusFile, start: int) -> Iterator[Record]:
    """Rows of a Parquet file from `start` on, a batch at a time. A file without the
    columns records are read from is one MISSING_FIELD record (settling a run reports it
    as a config error first); a compressed one too large to hold is one OVERSIZED."""
    import pyarrow.parquet as pq

    source = parquet_input(file)
    if source is None:
        yield Record(start, None, OVERSIZED)
        return
    with source:
        table = pq.ParquetFile(source)
        if any(name not in table.schema_arrow.names for name in file.fields):
            yield Record(start, None, MISSING_FIELD)
            return
        groups, index = row_groups_from(table.metadata, start)
        batches = table.iter_batches(PARQUET_BATCH_ROWS, groups, file.fields) if groups else ()
        for batch in batches:
            for row in batch.to_pylist():
                if index >= start:
                    yield row_record(index, file, row)
                index += 1


def parquet_input(file: CorpusFile) -> pa.NativeFile | None:
    """A Parquet file to read at random: the file itself, or a compressed one decompressed
    in memory, up to COMPRESSED_PARQUET_DOCUMENTS documents' worth (None above that)."""
    if compression(file.path) is None:
        filesystem, inner = filesystem_and_path(file.path)
        return filesystem.open_input_file(inner)
    limit = COMPRESSED_PARQUET_DOCUMENTS * file.max_document_bytes
    with open_stream(file.path) as stream:
        raw = read_at_most(stream, limit + 1)
    return None if len(raw) > limit else pa.BufferReader(raw)


def parquet_schema(file: CorpusFile) -> pa.Schema | None:
    """The columns of a Parquet file, from its footer alone; None for a compressed file
    (reading it means decompressing it whole) or one that cannot be read (its reader
    counts it as unreadable)."""
    import pyarrow.parquet as pq

    if compression(file.path) is not None:
        return None
    filesystem, inner = filesystem_and_path(file.path)
    try:
        return pq.read_schema(inner, filesystem=filesystem)
    except (OSError, ValueError, pa.ArrowException):
        return None


def row_groups_from(metadata, start: int) -> tuple[list[int], int]:
    """The row groups that hold rows `start` on, and the index of their first row."""
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if first + rows > start:
            return list(range(group, metadata.num_row_groups)), first
        first += rows
    return [], first


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
