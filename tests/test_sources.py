"""Reading sources: files, folders, globs, JSONL; bad records are counted, never fatal."""

import json
import os

import pytest

from raytron.pipelines import sources
from raytron.pipelines.sources import (
    CorpusFile,
    SourceError,
    is_validation,
    list_files,
    read_records,
)
from raytron.pipelines.stream import ALL, TRAIN, VALIDATION, kept_records


def test_folder_glob_and_file(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / ".hidden").write_text("no")
    assert [p.rsplit("/", 1)[1] for p in list_files(str(tmp_path))] == ["a.txt", "b.txt", "c.txt"]
    assert len(list_files(str(tmp_path / "*.txt"))) == 2
    assert list_files(str(tmp_path / "a.txt")) == [str(tmp_path / "a.txt")]


def test_missing_paths_are_errors_naming_the_fix(tmp_path):
    with pytest.raises(SourceError, match="matches no file. Fix"):
        list_files(str(tmp_path / "nothing*.txt"))
    with pytest.raises(SourceError, match="no embedded corpus"):
        list_files("embedded:nope")


def test_embedded_corpus_is_the_python_reference():
    texts = [r.text for r in read_records(CorpusFile(sources.EMBEDDED_PREFIX
                                                     + "python-reference"))]
    assert len(texts) > 50 and sum(map(len, texts)) > 400_000
    assert any("lambda" in t for t in texts)


def test_bad_jsonl_records_are_skipped_with_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken',
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff bytes"}',
        b"",
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "good two"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines))
    records = list(read_records(CorpusFile(str(path))))
    assert [r.text for r in records if r.text] == ["good one", "good two"]
    assert [r.reason for r in records if not r.text] == [
        sources.MALFORMED_JSON, sources.MISSING_FIELD, sources.MISSING_FIELD, sources.EMPTY,
        sources.INVALID_UTF8, sources.MISSING_FIELD,
    ]
    assert [r.index for r in records] == list(range(8))  # blank lines are no records
    resumed = list(read_records(CorpusFile(str(path)), start=7))
    assert [(r.index, r.text) for r in resumed] == [(7, "good two")]


def test_empty_and_non_utf8_text_files_are_skipped(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    reasons = {p.rsplit("/", 1)[1]: [r.reason for r in read_records(CorpusFile(p))]
               for p in list_files(str(tmp_path))}
    assert reasons == {"empty.txt": [sources.EMPTY], "latin1.txt": [sources.INVALID_UTF8],
                       "ok.txt": [""]}


def test_validation_split_is_stable_and_disjoint(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(400)))
    file = CorpusFile(str(path))
    train = {text for _, text, _ in kept_records(file, 0, TRAIN, 0.2)}
    held_out = {text for _, text, _ in kept_records(file, 0, VALIDATION, 0.2)}
    assert {text for _, text, _ in kept_records(file, 0, ALL, 0.2)} == train | held_out
    assert not train & held_out and len(train | held_out) == 400
    assert 40 < len(held_out) < 120
    assert all(is_validation(t, 0.2) for t in held_out)
    assert not any(is_validation(t, 0.0) for t in train | held_out)


def test_paragraph_documents_and_bad_blocks(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"First paragraph\nstill first.\n\n\nSecond.\r\n  \r\n"
                     b"Third \xff bad.\n\nFourth.")
    whole = list(read_records(CorpusFile(str(path), document="file")))
    assert [r.reason for r in whole] == [sources.INVALID_UTF8]
    blocks = list(read_records(CorpusFile(str(path), document="paragraph")))
    assert [(r.index, r.text, r.reason) for r in blocks] == [
        (0, "First paragraph\nstill first.", ""), (1, "Second.", ""),
        (2, None, sources.INVALID_UTF8), (3, "Fourth.", "")]
    assert [r.text for r in read_records(CorpusFile(str(path), document="paragraph"), 3)] == [
        "Fourth."]


def test_parquet_and_compressed_files_read_like_their_plain_equivalents(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " * (i + 1) for i in range(20)]
    plain = tmp_path / "docs.jsonl"
    plain.write_text("\n".join(json.dumps({"body": t}) for t in texts))
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    for suffix in ("zst", "zstd"):
        with pa.CompressedOutputStream(str(tmp_path / f"docs.jsonl.{suffix}"), "zstd") as stream:
            stream.write(plain.read_bytes())
    (tmp_path / "book.txt").write_text("\n\n".join(texts))
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress((tmp_path / "book.txt").read_bytes()))
    pq.write_table(pa.table({"body": texts + [None], "n": list(range(21))}),
                   tmp_path / "docs.parquet")

    def read(name, **options):
        return [r.text for r in read_records(CorpusFile(str(tmp_path / name), **options))]

    assert read("docs.jsonl", text_field="body") == texts
    assert read("docs.jsonl.gz", text_field="body") == texts
    assert read("docs.jsonl.zst", text_field="body") == texts
    assert read("docs.jsonl.zstd", text_field="body") == texts
    assert read("book.txt.gz", document="paragraph") == read("book.txt", document="paragraph")
    assert read("book.txt", document="paragraph") == [t.strip() for t in texts]
    assert read("docs.parquet", text_field="body") == texts + [None]
    assert [r.reason for r in read_records(CorpusFile(str(tmp_path / "docs.parquet")))] == [
        sources.MISSING_FIELD]  # one for the file, not one a row (settling reports it first)
    tail = read_records(CorpusFile(str(tmp_path / "docs.parquet"), text_field="body"), start=19)
    assert [r.text for r in tail] == [texts[19], None]


def test_oversized_and_unreadable_records_are_skipped(tmp_path):
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as handle:
        handle.write(json.dumps({"text": "fine"}).encode() + b"\n")
        handle.write(b'{"text": "' + b"x" * (100 * 2**20) + b'"}\n')
        handle.write(json.dumps({"text": "also fine"}).encode())
    records = list(read_records(CorpusFile(str(huge), max_document_bytes=64 * 2**20)))
    assert [(r.text, r.reason) for r in records] == [
        ("fine", ""), (None, sources.OVERSIZED), ("also fine", "")]
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: make it a folder instead
        locked.unlink()
        locked.mkdir()
    assert [r.reason for r in read_records(CorpusFile(str(locked)))] == [sources.UNREADABLE]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert [r.reason for r in read_records(CorpusFile(str(broken)))] == [sources.UNREADABLE]


def finishes(call, seconds: float = 10):
    """`call()`'s result, or a failure when it runs past `seconds` (a listing that follows
    a symlink loop never ends: it is left running in a daemon thread)."""
    import threading

    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still running after {seconds} s"
    return result[0]


def symlinked_corpus(root):
    """corpus/ with two symlink loops, a second link to one of its folders, a link to a
    file outside it, hidden files and folders, a broken link and a pipe."""
    corpus = root / "corpus"
    for folder in ("sub", "real", ".git", "notes/.cache"):
        (corpus / folder).mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt", "real/r.txt", ".git/HEAD", ".DS_Store",
                 "notes/n.txt", "notes/.cache/c.txt"):
        (corpus / name).write_text(name)
    (root / "elsewhere.txt").write_text("outside")
    (corpus / "sub" / "loop").symlink_to("..")
    (corpus / "sub" / "loop2").symlink_to("../..")
    (corpus / "sub" / "again").symlink_to("../real")
    (corpus / "linked.txt").symlink_to(root / "elsewhere.txt")
    (corpus / "broken").symlink_to("nowhere")
    os.mkfifo(corpus / "pipe")
    return corpus


def test_folders_with_symlink_loops_list_each_real_folder_once(tmp_path):
    corpus = symlinked_corpus(tmp_path)
    listing = finishes(lambda: sources.list_source(str(corpus)))
    names = [os.path.relpath(path, tmp_path) for path, _ in listing.files]
    assert names == ["corpus/a.txt", "corpus/linked.txt", "corpus/notes/n.txt",
                     "corpus/real/r.txt", "corpus/sub/b.txt", "corpus/sub/loop2/elsewhere.txt"]
    assert listing.summary() == ("skipped 3 hidden paths, 2 symlink loops, 1 folder linked "
                                 "twice and 2 broken links or special files")
    assert [r.text for r in read_records(CorpusFile(str(corpus / "linked.txt")))] == ["outside"]
    assert list_files(str(corpus / ".git")) == [str(corpus / ".git" / "HEAD")]  # named: read
    assert list_files(str(corpus / ".DS_Store")) == [str(corpus / ".DS_Store")]
    with pytest.raises(SourceError, match="matches no file"):
        list_files(str(corpus / "pipe"))  # reading a pipe could wait forever


def test_globs_end_on_symlink_loops_and_match_as_glob_does(tmp_path):
    import glob

    corpus = symlinked_corpus(tmp_path)
    found = finishes(lambda: list_files(str(corpus / "**" / "*.txt")))
    assert [os.path.relpath(path, corpus) for path in found] == [
        "a.txt", "linked.txt", "notes/n.txt", "real/r.txt", "sub/b.txt", "sub/loop2/elsewhere.txt"]
    for link in ("sub/loop", "sub/loop2", "sub/again", "broken", "pipe"):
        os.unlink(corpus / link)  # no loops left: Python's glob ends too, and agrees
    for pattern in ("**/*.txt", "*.txt", "*/*.txt", "**", "*/.cache/*", "n*/**/*", "[ar]*/*"):
        expected = sorted(os.path.abspath(p) for p in glob.glob(str(corpus / pattern),
                                                                recursive=True)
                          if os.path.isfile(p))
        assert list_files(str(corpus / pattern)) == expected, pattern


def test_a_run_reports_the_paths_its_sources_skipped(tmp_path, capsys):
    from raytron.platform.config.load import load_config
    from raytron.platform.control.corpus import stream_spec

    corpus = symlinked_corpus(tmp_path)
    config = load_config("tiny", [f"data.sources=[{corpus}]", "data.cache=null"])
    spec = finishes(lambda: stream_spec(config))
    assert len(spec.sources[0].files) == 6
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays clean for `raytron config`'s YAML
    assert captured.err == (f"data.sources.0 ({corpus}): skipped 3 hidden paths, 2 symlink "
                            "loops, 1 folder linked twice and 2 broken links or special files\n")


def gzip_bomb(path, expanded_mb: int = 200, piece: bytes = b"a" * 2**20) -> None:
    """A gzip file of `expanded_mb` MB of 'a' in 200 KB: one compressed MB, written as
    many gzip members (a gzip stream may hold several), so the test holds 1 MB at most."""
    import gzip

    member = gzip.compress(piece, 9)
    with open(path, "wb") as handle:
        for _ in range(expanded_mb):
            handle.write(member)


@pytest.mark.parametrize(("name", "document"), [("bomb.jsonl.gz", "file"),
                                                 ("bomb.txt.gz", "file"),
                                                 ("bomb.txt.gz", "paragraph")])
def test_a_decompression_bomb_is_an_oversized_record_read_in_bounded_memory(
        tmp_path, name, document):
    import time
    import tracemalloc

    gzip_bomb(tmp_path / name)
    file = CorpusFile(str(tmp_path / name), document=document, max_document_bytes=2**20)
    began = time.perf_counter()
    tracemalloc.start()
    try:
        records = list(read_records(file))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.index, r.reason) for r in records] == [(0, sources.OVERSIZED)]
    assert peak < 8 * 2**20  # of 200 MB expanded
    assert time.perf_counter() - began < 10


def test_an_oversized_line_is_read_past_up_to_its_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)  # lines across reads
    lines = [b'{"text": "one"}', b'{"text": "' + b"x" * 40 + b'"}', b" " * 40, b"",
             b'{"text": "two"}', b"y" * 50, b'{"text": "three"}']
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\n".join(lines))
    records = list(read_records(CorpusFile(str(path), max_document_bytes=30)))
    assert [(r.index, r.text, r.reason) for r in records] == [
        (0, "one", ""), (1, None, sources.OVERSIZED), (2, "two", ""),
        (3, None, sources.OVERSIZED), (4, "three", "")]  # long blank lines are no records
    book = tmp_path / "book.txt"
    book.write_bytes(b"short one\n\n" + b"long " * 10 + b"\nstill long\n \t\nshort two\n"
                     + b" " * 60 + b"\n\nlast")
    paragraphs = read_records(CorpusFile(str(book), document="paragraph",
                                         max_document_bytes=30))
    assert [(r.index, r.text, r.reason) for r in paragraphs] == [
        (0, "short one", ""), (1, None, sources.OVERSIZED), (2, "short two", ""),
        (3, "last", "")]


def test_json_nested_too_deep_is_malformed_not_a_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b"\n".join([b"[" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                 json.dumps({"text": "fine"}).encode()]))
    assert [(r.text, r.reason) for r in read_records(CorpusFile(str(path)))] == [
        (None, sources.MALFORMED_JSON), (None, sources.MALFORMED_JSON), ("fine", "")]
    nested: list = ["deep"]
    for _ in range(500):  # deep, but within what json.loads takes
        nested = [nested]
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": nested}]}))
    assert [r.reason for r in read_records(CorpusFile(str(chats), format="chat"))] == [
        sources.INVALID_SAMPLE]


def test_a_parquet_file_without_the_text_column_is_a_config_error_when_the_run_settles(
        tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytron.platform.config.load import load_config
    from raytron.platform.config.schema import ConfigError
    from raytron.platform.control.corpus import stream_spec

    pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "good.parquet")
    pq.write_table(pa.table({"body": ["a"] * 1000, "n": range(1000)}), tmp_path / "bad.parquet")
    config = load_config("tiny", [f"data.sources=[{tmp_path}]", "data.cache=null"])
    with pytest.raises(ConfigError) as error:
        stream_spec(config)
    assert error.value.problems == [
        f"data.sources.0: the Parquet file '{tmp_path / 'bad.parquet'}' has no column 'text' "
        "(data.sources.0.text_field); its columns are body, n. Fix: set "
        "data.sources.0.text_field to the column that holds them, or leave the file out of "
        "the source."]
    chats = load_config("tiny", [f"data.sources=[{{path: {tmp_path / 'good.parquet'}, "
                                 "format: prompt_completion, prompt_field: text}]",
                                 "data.cache=null"])
    with pytest.raises(ConfigError, match=r"no column 'completion' \(data.sources.0.completion"):
        stream_spec(chats)


def test_parquet_is_read_a_row_group_at_a_time_and_compressed_parquet_is_bounded(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(23)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "groups.parquet", row_group_size=5)
    for start in (0, 4, 5, 12, 22, 23, 40):
        records = read_records(CorpusFile(str(tmp_path / "groups.parquet")), start)
        assert [(r.index, r.text) for r in records] == list(enumerate(texts))[start:]
    packed = gzip.compress((tmp_path / "groups.parquet").read_bytes())
    (tmp_path / "groups.parquet.gz").write_bytes(packed)
    file = CorpusFile(str(tmp_path / "groups.parquet.gz"))
    assert [r.text for r in read_records(file, 20)] == texts[20:]
    small = CorpusFile(file.path, max_document_bytes=len(packed) // 16)  # held whole: too big
    assert [(r.index, r.reason) for r in read_records(small)] == [(0, sources.OVERSIZED)]


class FlakyStreams:
    """`sources.open_stream` for an object store whose reads fail: the first `failures`
    streams raise OSError after `good_reads` reads; the others read the local file."""

    def __init__(self, local: str, failures: int, good_reads: int = 0):
        self.local, self.failures, self.good_reads, self.opened = local, failures, good_reads, 0

    def __call__(self, path: str):
        import pyarrow as pa

        self.opened += 1
        stream = pa.input_stream(self.local)
        if self.opened > self.failures:
            return stream
        reads = iter(range(self.good_reads))

        class Failing:
            def __enter__(self):
                return self

            def __exit__(self, *_):
                stream.close()

            def read(self, size):
                if next(reads, None) is None:
                    raise OSError("AWS Error NETWORK_CONNECTION: connection reset")
                return stream.read(size)

        return Failing()


def test_object_storage_reads_are_retried_without_repeating_records(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    texts = [f"document {i}" for i in range(12)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    monkeypatch.setattr(sources, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)  # a failure after some records
    for failures, good_reads in ((2, 0), (2, 3)):
        streams = FlakyStreams(str(path), failures, good_reads)
        monkeypatch.setattr(sources, "open_stream", streams)
        records = list(read_records(CorpusFile("s3://corpus/docs.jsonl")))
        assert [(r.index, r.text) for r in records] == list(enumerate(texts))
        assert streams.opened == 3
    streams = FlakyStreams(str(path), failures=9, good_reads=3)
    monkeypatch.setattr(sources, "open_stream", streams)
    records = list(read_records(CorpusFile("s3://corpus/docs.jsonl")))
    assert [r.reason for r in records][-1] == sources.UNREADABLE and streams.opened == 3
    assert [(r.index, r.text) for r in records[:-1]] == list(enumerate(texts))[:len(records) - 1]
    assert records[-1].index == len(records) - 1  # where the first unread record would be
    local = FlakyStreams(str(path), failures=9)
    monkeypatch.setattr(sources, "open_stream", local)
    assert [(r.index, r.reason) for r in read_records(CorpusFile(str(path)))] == [
        (0, sources.UNREADABLE)]
    assert local.opened == 1  # a local file is not retried


def test_object_storage_and_file_uris_leave_hidden_paths_out(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    bucket = tmp_path / "bucket"
    for name in ("a.txt", "sub/b.txt", ".hidden", ".git/HEAD", "sub/.cache/c"):
        (bucket / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / name).write_text(name)
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    monkeypatch.setattr(sources, "filesystem_and_path", lambda path: (store, "bucket"))
    listing = sources.list_source("s3://bucket")
    assert [name for name, _ in listing.files] == ["s3://bucket/a.txt", "s3://bucket/sub/b.txt"]
    assert listing.summary() == "skipped 3 hidden paths"
    monkeypatch.undo()
    (bucket / "sub" / "loop").symlink_to("..")
    listing = finishes(lambda: sources.list_source(f"file://{bucket}"))
    assert [name for name, _ in listing.files] == [f"file://{bucket}/a.txt",
                                                   f"file://{bucket}/sub/b.txt"]
    assert listing.summary() == "skipped 3 hidden paths and 1 symlink loop"
