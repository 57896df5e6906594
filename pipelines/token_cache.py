"""Tokenize once: each file's tokenized records, kept as an Arrow shard and read back by
every later epoch, restart and run with the same file and tokenizer.

Megatron users preprocess a corpus offline into `.bin/.idx`; raytron tokenizes on the
fly and keeps what it made. A shard holds every record of one file (index, skip reason,
where its text falls in the validation split, tokens, learned-token mask), so that any
stream over the file (training, held-out, from a cursor inside it) is a selection of its
rows, with the same skipped-record counts. Its name is a hash of all that decides its
rows: the file (path, size, modification time), how it is read, the tokenizer, BOS/EOS.
A changed file or tokenizer therefore misses its old shards, which stay until deleted.

A shard is written whole or not at all: locally to a temporary name, then renamed; on
object storage in one upload, which the store makes visible only once complete. A
reader trusts nothing it cannot check: a shard whose Arrow footer, schema or key does not
match is treated as absent (and written again); nothing read is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from raytron.pipelines.chat import CHATML, ChatTemplate
from raytron.pipelines.sources import CHAT, PREFERENCE, CorpusFile, filesystem_and_path

FORMAT = 1  # bumped when what a shard holds changes
SUFFIX = ".arrow"
KEY = b"raytron.token_cache.key"
DOCUMENTS = pa.schema([("doc", pa.int64()), ("reason", pa.string()), ("split", pa.float64()),
                       ("tokens", pa.list_(pa.int32()))])
SAMPLES = DOCUMENTS.append(pa.field("targets", pa.list_(pa.bool_())))
PAIRS = SAMPLES.append(pa.field("chosen_length", pa.int32()))  # chosen, then rejected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenCache:
    """The shards of one source's files for one tokenizer, under `root` (a path or URI)."""

    root: str
    tokenizer: str  # sha256 of the tokenizer's JSON (and of the chat template, for chats)
    eos: int
    bos: int | None
    sample_format: str | None  # chat, prompt_completion or preference; None: documents

    @classmethod
    def of(cls, root: str, tokenizer_json: str, eos: int, bos: int | None,
           sample_format: str | None, template: ChatTemplate = CHATML) -> TokenCache:
        chat = json.dumps(dataclasses.asdict(template)) \
            if sample_format in (CHAT, PREFERENCE) else ""
        digest = hashlib.sha256((tokenizer_json + chat).encode()).hexdigest()
        return cls(root, digest, eos, bos, sample_format)

    @property
    def schema(self) -> pa.Schema:
        if self.sample_format is None:
            return DOCUMENTS
        return PAIRS if self.sample_format == PREFERENCE else SAMPLES

    @property
    def folder(self) -> str:
        """One folder per tokenizer: an old tokenizer's shards go by deleting it."""
        return f"{self.root.rstrip('/')}/{self.tokenizer[:16]}"

    def key(self, file: CorpusFile) -> str:
        return json.dumps({"format": FORMAT, "file": dataclasses.asdict(file),
                           "tokenizer": self.tokenizer, "eos": self.eos, "bos": self.bos,
                           "samples": self.sample_format}, sort_keys=True)

    def path(self, file: CorpusFile) -> str | None:
        """The shard of `file`; None when its version is unknown (never cached)."""
        if not file.version:
            return None
        digest = hashlib.sha256(self.key(file).encode()).hexdigest()[:32]
        return f"{self.folder}/{digest}{SUFFIX}"

    def cached(self, files: list[CorpusFile]) -> set[int]:
        """Indexes of the files whose shard exists, by one listing of the folder."""
        try:
            filesystem, inner = filesystem_and_path(self.folder)
            infos = filesystem.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        except (OSError, ValueError) as error:
            log.warning("cannot list the token cache %s (%s); tokenizing", self.folder, error)
            return set()
        names = {os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        return {index for index, file in enumerate(files)
                if (path := self.path(file)) and os.path.basename(path) in names}

    def read(self, file: CorpusFile) -> pa.Table | None:
        """The shard of `file`, or None when it is absent, cut short or not this file's."""
        path = self.path(file)
        if path is None:
            return None
        try:
            filesystem, inner = filesystem_and_path(path)
            with filesystem.open_input_file(inner) as stream:
                reader = pa.ipc.open_file(stream)
                schema = reader.schema
                if (schema.remove_metadata() != self.schema
                        or (schema.metadata or {}).get(KEY) != self.key(file).encode()):
                    return None
                return reader.read_all()
        except (OSError, ValueError):  # pyarrow's errors derive from these
            return None

    def write(self, file: CorpusFile, table: pa.Table) -> None:
        """Keep `table` (this cache's schema) as the shard of `file`; a failure is logged,
        never raised: the cache only saves work."""
        path = self.path(file)
        if path is None:
            return
        table = table.select(self.schema.names).cast(self.schema)
        sink = pa.BufferOutputStream()
        # zstd: 2.6x smaller than int32 ids, still read at ~150M tokens/s
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.ipc.new_file(sink, self.schema.with_metadata({KEY: self.key(file)}),
                             options=options) as writer:
            writer.write_table(table)
        try:
            write_whole(path, sink.getvalue())
        except (OSError, ValueError) as error:
            log.warning("cannot write the token cache shard %s (%s)", path, error)


def write_whole(path: str, data: pa.Buffer) -> None:
    """Locally: a temporary file, synced, then renamed. Object storage: one upload, which
    becomes visible only once complete."""
    filesystem, inner = filesystem_and_path(path)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        with filesystem.open_output_stream(inner) as stream:
            stream.write(data)
        return
    os.makedirs(os.path.dirname(inner), exist_ok=True)
    temporary = f"{inner}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, inner)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)

