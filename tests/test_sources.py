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
        sources.MISSING_FIELD] * 21
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
