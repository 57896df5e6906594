"""The Ray Data pipeline and the DataFeeder: order, slicing, exact resume, held-out data."""


import json

import numpy as np
import pytest

from raytron.pipelines.feeder import DataFeeder
from raytron.pipelines.packing import Cursor
from raytron.pipelines.stream import (
    TRAIN,
    VALIDATION,
    StreamSpec,
    corpus_files,
    local_texts,
    token_docs,
)
from raytron.pipelines.tokenizer import eos_id, train_bpe
from raytron.platform.config import SourceConfig

SEQ_LEN, GLOBAL_BATCH = 32, 8


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """Slices of real text (the Python reference) in several text files, and a JSONL file
    with bad records among good ones."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    folder = tmp_path_factory.mktemp("corpus")
    for index, text in enumerate(texts[:4]):
        (folder / f"topic{index}.txt").write_text(text[:3000])
    (folder / "empty.txt").write_text("")
    paragraphs = [p for text in texts[4:] for p in text.split("\n\n") if p.strip()][:200]
    records = [json.dumps({"text": p}) for p in paragraphs]
    lines = records[:100] + ['{"text": "cut', '{"source": "no text"}'] + records[100:]
    (folder / "paragraphs.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"text": "\xff"}\n')
    files = corpus_files([SourceConfig(path=str(folder))])
    tokenizer = train_bpe(local_texts(files, 0.1), 512, show_progress=False)
    return StreamSpec(files, tokenizer.to_str(), eos_id(tokenizer), seed=7, val_share=0.1,
                      tokenizer_workers=1)


def new_feeder(ray, spec):
    return ray.remote(DataFeeder).options(num_cpus=0, max_concurrency=8).remote(
        spec, SEQ_LEN, GLOBAL_BATCH, 3, 16)


def batches(ray, feeder, steps, dp=1, cursors=None):
    """Global batches of `steps`, read as `dp` replicas; records each step's cursor."""
    result = []
    for step in steps:
        if cursors is not None:
            cursors[step] = Cursor(**ray.get(feeder.cursor.remote(step)))
        result.append(np.concatenate(ray.get([feeder.batch.remote(step, r, dp)
                                              for r in range(dp)])))
    return result


def test_order_is_deterministic_sliced_by_replica_and_resumes_exactly(ray_session, spec):
    ray = ray_session
    first, second = new_feeder(ray, spec), new_feeder(ray, spec)
    ray.get([first.seek.remote(0, {}), second.seek.remote(0, {})])
    steps = range(120)  # more than one epoch of this corpus
    cursors = {}
    reference = batches(ray, first, steps, cursors=cursors)
    assert all(b.shape == (GLOBAL_BATCH, SEQ_LEN + 1) for b in reference)
    again = batches(ray, second, steps, dp=2)  # a second run, read by two replicas
    for want, got in zip(reference, again, strict=True):
        np.testing.assert_array_equal(want, got)

    assert any(c.offset > 0 for c in cursors.values()), "no cursor inside a document"
    assert any(c.epoch > 0 for c in cursors.values()), "no cursor in a later epoch"
    with pytest.raises(ray.exceptions.RayTaskError, match="no longer held"):
        ray.get(first.batch.remote(3, 0, 1))
    for step in (5, 17, 33, 100):
        cursor = cursors[step]
        ray.get(second.seek.remote(step, cursor.to_dict()))
        resumed = batches(ray, second, range(step, step + 4), dp=4)
        for want, got in zip(reference[step : step + 4], resumed, strict=True):
            np.testing.assert_array_equal(want, got)

    stats = ray.get(first.stats.remote())
    assert stats["data/skipped_empty"] >= 1
    assert stats["data/skipped_malformed_json"] >= 1
    assert stats["data/skipped_missing_field"] >= 1
    assert stats["data/skipped_invalid_utf8"] >= 1
    validation = ray.get(first.validation.remote(0, 1))
    assert validation.shape == (16, SEQ_LEN + 1)
    halves = ray.get([first.validation.remote(r, 2) for r in range(2)])
    np.testing.assert_array_equal(np.concatenate(halves), validation)


def test_validation_documents_never_reach_training(ray_session, spec):
    train = {(d.file, d.doc) for d in token_docs(spec, Cursor(), TRAIN, {}, epochs=1)}
    held_out = {(d.file, d.doc) for d in token_docs(spec, Cursor(), VALIDATION, {}, epochs=1)}
    assert held_out and train and not train & held_out
    good = sum(1 for _ in local_texts(spec.files, 0.0))
    assert len(train) + len(held_out) == good
