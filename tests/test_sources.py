"""Reading sources: files, folders, globs, JSONL; bad records are counted, never fatal."""

import json

import pytest

from raytron.pipelines import sources
from raytron.pipelines.sources import SourceError, is_validation, list_files, read_records
from raytron.pipelines.stream import CorpusFile, split_records


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
    texts = [r.text for r in read_records(sources.EMBEDDED_PREFIX + "python-reference",
                                          "auto", "text")]
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
    records = list(read_records(str(path), "auto", "text"))
    assert [r.text for r in records if r.text] == ["good one", "good two"]
    assert [r.reason for r in records if not r.text] == [
        sources.MALFORMED_JSON, sources.MISSING_FIELD, sources.MISSING_FIELD, sources.EMPTY,
        sources.INVALID_UTF8, sources.MISSING_FIELD,
    ]
    assert [r.index for r in records] == list(range(8))  # blank lines are no records
    resumed = list(read_records(str(path), "auto", "text", start=7))
    assert [(r.index, r.text) for r in resumed] == [(7, "good two")]


def test_empty_and_non_utf8_text_files_are_skipped(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    reasons = {p.rsplit("/", 1)[1]: [r.reason for r in read_records(p, "auto", "text")]
               for p in list_files(str(tmp_path))}
    assert reasons == {"empty.txt": [sources.EMPTY], "latin1.txt": [sources.INVALID_UTF8],
                       "ok.txt": [""]}


def test_validation_split_is_stable_and_disjoint(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(400)))
    file = CorpusFile(str(path), "auto", "text")
    train = {text for _, text, _ in split_records(file, 0, "train", 0.2)}
    held_out = {text for _, text, _ in split_records(file, 0, "validation", 0.2)}
    assert not train & held_out and len(train | held_out) == 400
    assert 40 < len(held_out) < 120
    assert all(is_validation(t, 0.2) for t in held_out)
    assert not any(is_validation(t, 0.0) for t in train | held_out)
