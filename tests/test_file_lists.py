"""A resumed run reads the files its cursor was recorded in: a folder that changed is
refused naming what changed, and `data.on_new_files=next_epoch` grows the corpus from the
next epoch on, exactly as a run that had the final list from that epoch on."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from raytron.pipelines.file_lists import ERROR, NEXT_EPOCH, recorded_lists, resumed_spec
from raytron.pipelines.mixture import MixtureReader
from raytron.pipelines.tokenizer import train_bpe
from raytron.platform.config.load import load_config
from raytron.platform.control.corpus import stream_spec, with_tokenizer

SEQ_LEN = 32


def write_topics(folder: Path, names: list[str]) -> None:
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    folder.mkdir(exist_ok=True)
    for index, name in enumerate(names):
        (folder / name).write_text(texts[index * 7][:1500])


def listed_spec(folder: Path, tokenizer, cache: Path):
    config = load_config("tiny", [f"data.sources=[{{path: {folder}, document: paragraph}}]",
                                  "data.val_share=0", "train.seed=3", f"data.cache={cache}"])
    return with_tokenizer(stream_spec(config), tokenizer)


def sequences(spec, cursor: dict, count: int) -> tuple[list[np.ndarray], dict]:
    """`count` sequences from `cursor`, and the cursor after them (with its file lists,
    as the feeder hands it to a checkpoint)."""
    reader = MixtureReader(spec, SEQ_LEN, cursor)
    try:
        taken = [reader.next_sequence() for _ in range(count)]
        after = reader.cursor()
    finally:
        reader.close()
    return taken, {**after, "files": recorded_lists(spec, after)}


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    write_topics(folder, ["a.txt", "c.txt", "e.txt"])
    tokenizer = train_bpe([p.read_text() for p in folder.iterdir()], 512, show_progress=False)
    return folder, tokenizer, tmp_path / "cache"


def test_a_folder_that_changed_is_refused_naming_the_files(ray_session, corpus):
    folder, tokenizer, cache = corpus
    _, cursor = sequences(listed_spec(folder, tokenizer, cache), {}, 5)
    json.dumps(cursor)  # what a checkpoint's meta.json stores
    assert cursor["sources"][0]["epoch"] == 0
    assert resumed_spec(listed_spec(folder, tokenizer, cache), cursor, ERROR, 40)[1] == []

    write_topics(folder, ["b.txt"])
    (folder / "e.txt").unlink()
    (folder / "c.txt").write_text("changed")
    _, problems = resumed_spec(listed_spec(folder, tokenizer, cache), cursor, ERROR, 40)
    assert len(problems) == 1
    problem = problems[0]
    assert problem.startswith("data.sources.0 (") and "checkpoint at step 40" in problem
    assert f"added {folder / 'b.txt'}" in problem and f"removed {folder / 'e.txt'}" in problem
    assert f"changed (size or modification time) {folder / 'c.txt'}" in problem
    assert "Fix:" in problem and "data.on_new_files=next_epoch" in problem
    _, problems = resumed_spec(listed_spec(folder, tokenizer, cache), cursor, NEXT_EPOCH, 40)
    assert "takes added files only" in problems[0]


def test_next_epoch_reads_new_files_from_the_next_epoch_exactly(ray_session, corpus):
    """A run resumed mid-epoch with a file added equals a run that had the final list
    from the next epoch on, and differs from one that had it from the start."""
    folder, tokenizer, cache = corpus
    head, cursor = sequences(listed_spec(folder, tokenizer, cache), {}, 5)
    (folder / "b.txt").write_text((folder / "a.txt").read_text()[::-1])
    listed = listed_spec(folder, tokenizer, cache)
    assert "added" in resumed_spec(listed, cursor, ERROR, 5)[1][0]
    grown, problems = resumed_spec(listed, cursor, NEXT_EPOCH, 5)
    assert problems == []
    tail, after = sequences(grown, cursor, 70)
    assert after["sources"][0]["epoch"] >= 1  # the resumed run went into the next epoch
    assert [era["from_epoch"] for era in recorded_lists(grown, cursor)[0]] == [0, 1]

    files = listed.sources[0].files
    without_b = tuple(i for i, f in enumerate(files) if not f.path.endswith("b.txt"))
    reference = dataclasses.replace(listed, sources=[dataclasses.replace(
        listed.sources[0], eras=((0, without_b), (1, tuple(range(len(files))))))])
    expected, _ = sequences(reference, {}, 75)
    for got, want in zip(head + tail, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    from_the_start, _ = sequences(listed, {}, 75)
    assert any(not np.array_equal(a, b) for a, b in zip(from_the_start, expected, strict=True))
