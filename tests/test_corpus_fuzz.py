"""Property-based: a corpus folder of random broken files (truncated compression, binary
garbage, invalid UTF-8, deep JSON, empty files, lines beyond the cap, Parquet files of the
wrong schema, symlinks and their loops, pipes) is listed, settled and read to its last
record quickly; each record has a text or a known skip reason, the indices count from 0
without a gap, and nothing raises but a config error naming a wrong Parquet file."""

import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytron.pipelines import sources
from raytron.pipelines.sources import CorpusFile, SourceError, list_source, read_records
from raytron.platform.config.load import load_config
from raytron.platform.config.schema import ConfigError
from raytron.platform.control.corpus import stream_spec

REASONS = {sources.INVALID_UTF8, sources.MALFORMED_JSON, sources.MISSING_FIELD, sources.EMPTY,
           sources.UNREADABLE, sources.OVERSIZED, sources.INVALID_SAMPLE}
CAP = 256  # max_document_bytes while reading: lines and blocks beyond it are drawn often
SECONDS = 10  # per example: listing, settling and reading it all

LINES = st.one_of(
    st.text(max_size=40).map(lambda t: json.dumps({"text": t}).encode()),
    st.sampled_from([b"", b"   ", b"\r", b'{"text": "cut', b"[" * 5000, b'{"a":' * 5000,
                     b'{"text": "\xff\xfe"}', b"[1, 2]", b'{"text": 7}', b'{"body": "x"}',
                     b'{"text": "' + b"x" * (3 * CAP) + b'"}', b" " * (3 * CAP),
                     b'{"messages": [{"role": "user", "content": "hi"}]}']),
    st.binary(max_size=60),
)
CONTENT = st.one_of(
    st.lists(LINES, max_size=12).map(b"\n".join),
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"word " * 10, b"", b" \t", b"\xff", b"x" * (2 * CAP)]),
             max_size=8).map(b"\n".join),
)
NAMES = st.sampled_from(["a.jsonl", "b.txt", "c.json", "d.ndjson", "e", "sub/f.jsonl",
                         "sub/deeper/g.txt", ".hidden.jsonl", ".git/h.txt", "sub/.cache/i"])
CODECS = st.sampled_from([("", None), (".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd"),
                          (".bz2", "bz2"), (".lz4", "lz4")])
TABLES = st.sampled_from([{"text": ["fine", None, "", "x" * (2 * CAP)]}, {"body": ["wrong"]},
                          {"text": [1, 2]}, {}])
LINKS = st.sampled_from(["..", ".", "../..", "nowhere", "a.jsonl", "sub", "self"])


@st.composite
def corpus_entries(draw) -> list[tuple]:
    """(kind, name, payload...) for each entry of the corpus folder."""
    entries = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["file", "file", "file", "parquet", "link", "empty",
                                     "pipe"]))
        if kind == "file":
            entries.append((kind, draw(NAMES), draw(CONTENT), draw(CODECS),
                            draw(st.none() | st.floats(0, 1))))  # where to cut it, if at all
        elif kind == "parquet":
            entries.append((kind, draw(st.sampled_from(["p.parquet", "sub/q.parquet",
                                                        "r.parquet.gz"])),
                            draw(TABLES), draw(st.none() | st.floats(0, 1))))
        elif kind == "link":
            entries.append((kind, draw(st.sampled_from(["link", "sub/link", "sub/deeper/l"])),
                            draw(LINKS)))
        else:
            entries.append((kind, draw(NAMES)))
    return entries


def write(corpus: Path, entry: tuple) -> None:
    kind, name = entry[:2]
    path = corpus / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) or path.parent.is_symlink():
        return  # the name is taken, or lies beyond a link: keep the first
    if kind == "file":
        _, _, content, (suffix, codec), cut = entry
        path = path.with_name(path.name + suffix)
        if codec:
            with pa.CompressedOutputStream(str(path), codec) as stream:
                stream.write(content)
        else:
            path.write_bytes(content)
        truncate(path, cut)
    elif kind == "parquet":
        _, _, columns, cut = entry
        table = pa.table(columns) if columns else pa.table({"n": pa.array([], pa.int64())})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        raw = sink.getvalue().to_pybytes()
        if name.endswith(".gz"):
            import gzip

            raw = gzip.compress(raw)
        path.write_bytes(raw)
        truncate(path, cut)
    elif kind == "link":
        path.symlink_to(path.name if entry[2] == "self" else entry[2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        os.mkfifo(path)


def truncate(path: Path, cut: float | None) -> None:
    if cut is not None:
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * cut)])


def wrong_parquet(path: str) -> bool:
    """A plain Parquet file that reads but has no `text` column: settling names it."""
    if not path.endswith(".parquet"):
        return False
    try:
        return "text" not in pq.read_schema(path).names
    except (OSError, ValueError, pa.ArrowException):
        return False


def all_records(file: CorpusFile) -> list[sources.Record]:
    records = list(read_records(file))
    assert [r.index for r in records] == list(range(len(records))), file
    for record in records:
        assert (record.text is not None and not record.reason) or (
            record.text is None and record.reason in REASONS), (file, record)
    middle = len(records) // 2  # a resumed read gives the same records from there on
    assert list(read_records(file, middle)) == records[middle:], file
    return records


@settings(max_examples=int(os.environ.get("RAYTRON_FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries=corpus_entries())
def test_any_corpus_lists_settles_and_reads_with_every_skip_counted(entries):
    with tempfile.TemporaryDirectory() as root:
        corpus = Path(root) / "deep" / "er" / "corpus"  # links to ../.. stay in root
        corpus.mkdir(parents=True)
        for entry in entries:
            write(corpus, entry)
        began = time.perf_counter()
        try:
            files = [path for path, _ in list_source(str(corpus)).files]
        except SourceError as error:
            assert "matches no file" in str(error)
            return
        config = load_config("tiny", [f"data.sources=[{corpus}]", "data.cache=null"])
        wrong = sorted(path for path in files if wrong_parquet(path))
        try:
            stream_spec(config)
            assert not wrong
        except ConfigError as error:
            named = [path for path in files if f"'{path}'" in str(error)]
            assert sorted(named) == wrong and "Fix:" in str(error)
        for path in files:
            for document in ("file", "paragraph"):
                all_records(CorpusFile(path, document=document, max_document_bytes=CAP))
        assert time.perf_counter() - began < SECONDS
