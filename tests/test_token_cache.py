"""Tokenize once: the token cache gives the batches tokenizing gives (over epochs, from
resumed cursors, held-out and fine-tuning data included), a changed file or tokenizer
invalidates only its shards, and a shard cut short is never read."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from raytron.pipelines import token_cache
from raytron.pipelines.packing import Cursor
from raytron.pipelines.stream import TRAIN, Tokenize, token_docs, tokenized_file
from raytron.pipelines.tokenizer import train_bpe

from test_feeder import batches, make_spec, new_feeder, write_mixture


def shards(folder) -> list[str]:
    return sorted(name for _, _, names in os.walk(folder) for name in names
                  if name.endswith(token_cache.SUFFIX))


def feeder_run(ray, spec, steps, cursors=None):
    feeder = new_feeder(ray, spec)
    ray.get(feeder.seek.remote(0, {}))
    result = batches(ray, feeder, steps, cursors=cursors)
    return feeder, result


def test_cached_batches_equal_tokenized_batches_across_epochs_and_resumes(ray_session, tmp_path):
    """A two-source mixture with bad records, paragraphs, held-out documents and a shuffle
    window, over several epochs: tokenized without a cache, on the first (writing) pass,
    and from the cache alone (the corpus moved away), also resumed inside files."""
    ray = ray_session
    (tmp_path / "corpus").mkdir()
    sources = write_mixture(tmp_path / "corpus")
    cache = tmp_path / "cache"
    plain = make_spec(sources, "data.shuffle_window=4")
    cached = dataclasses.replace(plain, cache=str(cache))
    steps = range(60)  # several epochs of both sources
    cursors: dict = {}
    reference_feeder, reference = feeder_run(ray, plain, steps, cursors)
    reference_validation = ray.get(reference_feeder.validation.remote(0, 1)).tokens
    _, first = feeder_run(ray, cached, steps)
    written = shards(cache)
    assert len(written) == sum(len(s.files) for s in plain.sources)  # empty.txt too
    for name in written[::2]:  # some files cached, some not: both merged in order
        os.remove(next(cache.rglob(name)))
    _, mixed = feeder_run(ray, cached, steps)
    assert shards(cache) == written

    shutil.move(tmp_path / "corpus", tmp_path / "gone")  # from now on, only the cache
    feeder, again = feeder_run(ray, cached, steps)
    for want, *got in zip(reference, first, mixed, again, strict=True):
        for run in got:
            np.testing.assert_array_equal(want, run)
    np.testing.assert_array_equal(ray.get(feeder.validation.remote(0, 1)).tokens,
                                  reference_validation)
    positions = [Cursor(**p) for c in cursors.values() for p in c["sources"]]
    assert any(c.doc > 0 and c.offset > 0 for c in positions), "no cursor inside a file"
    for step in (7, 23, 41):  # resumed: the same batches, place and skipped-record counts
        ray.get(feeder.seek.remote(step, cursors[step]))
        resumed = batches(ray, feeder, range(step, step + 3))
        for want, got in zip(reference[step : step + 3], resumed, strict=True):
            np.testing.assert_array_equal(want, got)
        assert ray.get(feeder.cursor.remote(step + 3)) == cursors[step + 3]
    assert shards(cache) == written


def test_cached_fine_tuning_samples_equal_tokenized_ones(ray_session, tmp_path):
    """Chat samples (invalid ones among them, counted as skipped) through the cache."""
    ray = ray_session
    chats = [[{"role": "user", "content": f"say {word}"},
              {"role": "assistant", "content": f"{word} {word}"}]
             for word in ("apple", "river", "stone", "cloud") * 5]
    lines = [json.dumps({"messages": m}) for m in chats]
    lines.insert(3, json.dumps({"messages": [{"role": "wizard", "content": "?"}]}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines))
    plain = make_spec(f"[{{path: {tmp_path / 'chat.jsonl'}, format: chat}}]", sample=2**14)
    cached = dataclasses.replace(plain, cache=str(tmp_path / "cache"))
    cursors: dict = {}
    _, reference = feeder_run(ray, plain, range(9), cursors)
    for _ in range(2):  # writing, then reading
        feeder = new_feeder(ray, cached)
        ray.get(feeder.seek.remote(0, {}))
        for step in range(8):
            got = ray.get(feeder.batch.remote(step, 0, 1))
            np.testing.assert_array_equal(got.tokens, reference[step])
        assert ray.get(feeder.cursor.remote(8)) == cursors[8]
    assert len(shards(tmp_path / "cache")) == 1
    assert cursors[8]["skipped"][0]["invalid_sample"] >= 1


def write_books(folder, count=3):
    folder.mkdir()
    for index in range(count):
        (folder / f"book{index}.txt").write_text(
            "\n\n".join(f"Book {index}, paragraph {p}: " + "words of prose " * (p % 5 + 1)
                        for p in range(30)))
    return f"[{{path: {folder}, document: paragraph}}]"


def cache_everything(spec):
    """Tokenize and keep every file of the first source, here (no Ray)."""
    source = spec.sources[0]
    cache = spec.token_cache(source)
    encode = Tokenize(spec.tokenizer_json, spec.eos, spec.bos)
    for file in source.files:
        tokenized_file(encode, file, 0, TRAIN, spec.val_share, cache)
    return cache


def doc_tokens(spec, epochs=1):
    """(file position, doc, tokens) of the first source; without Ray when all is cached."""
    return [(d.file, d.doc, d.tokens.tolist())
            for d in token_docs(spec, spec.sources[0], 0, Cursor(), TRAIN, epochs)]


def test_a_changed_file_or_tokenizer_invalidates_only_its_shards(ray_session, tmp_path):
    sources = write_books(tmp_path / "books")
    spec = make_spec(sources, cache=str(tmp_path / "cache"))
    cache = cache_everything(spec)
    files = spec.sources[0].files
    assert cache.cached(files) == {0, 1, 2}
    before = doc_tokens(spec)  # all from the cache: no Ray Data
    kept = {name: os.stat(os.path.join(cache.folder, name)).st_mtime_ns
            for name in os.listdir(cache.folder)}

    changed = tmp_path / "books" / "book1.txt"
    changed.write_text(changed.read_text().replace("Book 1,", "A changed book,"))
    relisted = make_spec(sources, cache=str(tmp_path / "cache"))
    relisted = dataclasses.replace(relisted, tokenizer_json=spec.tokenizer_json)  # the same
    assert spec.token_cache(spec.sources[0]) == relisted.token_cache(relisted.sources[0])
    assert cache.cached(relisted.sources[0].files) == {0, 2}
    after = doc_tokens(relisted)  # book1 tokenized again (Ray Data), and cached
    decode = Tokenize(spec.tokenizer_json, spec.eos, None).tokenizer.decode
    assert any("A changed book" in decode(tokens) for _, _, tokens in after)
    assert [d for d in after if "A changed book" not in decode(d[2])] == \
        [d for d in before if "Book 1," not in decode(d[2])]
    assert cache.cached(relisted.sources[0].files) == {0, 1, 2}
    assert all(os.stat(os.path.join(cache.folder, name)).st_mtime_ns == mtime
               for name, mtime in kept.items())  # the others untouched, the old one kept

    other = train_bpe(["a different tokenizer"] * 20, 300, show_progress=False)
    retokenized = dataclasses.replace(relisted, tokenizer_json=other.to_str())
    assert retokenized.token_cache(retokenized.sources[0]).cached(files) == set()


def test_a_crash_mid_write_leaves_no_readable_shard(tmp_path, monkeypatch):
    spec = make_spec(write_books(tmp_path / "books"), cache=str(tmp_path / "cache"))
    source = spec.sources[0]
    cache = spec.token_cache(source)
    table = tokenized_file(Tokenize(spec.tokenizer_json, spec.eos, None), source.files[0], 0,
                           TRAIN, spec.val_share, None)

    def crash(*_):
        raise OSError("no space left on device")

    monkeypatch.setattr(token_cache.os, "replace", crash)  # dies between write and rename
    cache.write(source.files[0], table)  # logged, not raised
    assert cache.cached(source.files) == set() and cache.read(source.files[0]) is None
    assert not os.listdir(cache.folder)  # nor a temporary file left
    monkeypatch.undo()

    reference = cache_everything(spec)
    whole = doc_tokens(spec)
    shard = reference.path(source.files[1])
    data = open(shard, "rb").read()
    with open(shard, "wb") as cut:  # as a store that is not atomic could leave it
        cut.write(data[: len(data) // 2])
    with open(f"{shard}.0123.tmp", "wb") as temporary:  # a writer killed before its rename
        temporary.write(data[:100])
    assert reference.read(source.files[1]) is None
    assert reference.cached(source.files) == {0, 1, 2}  # listed, but not trusted:
    assert doc_tokens(spec) == whole  # tokenized again, here, and written whole
    assert reference.read(source.files[1]) is not None

    shutil.copy(reference.path(source.files[0]), reference.path(source.files[2]))
    assert reference.read(source.files[2]) is None  # another file's rows under its name


@pytest.mark.parametrize("cache", [None, "unwritable"])
def test_without_a_writable_cache_the_stream_is_the_same(ray_session, tmp_path, cache):
    sources = write_books(tmp_path / "books", count=1)
    if cache:
        (tmp_path / cache).write_text("a file where the cache folder would be")
    spec = make_spec(sources, cache=str(tmp_path / cache) if cache else None)
    plain = make_spec(sources)
    plain = dataclasses.replace(plain, tokenizer_json=spec.tokenizer_json, eos=spec.eos)
    assert doc_tokens(spec, epochs=3) == doc_tokens(plain, epochs=3)
