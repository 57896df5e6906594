"""The Ray Data pipeline and the DataFeeder: order, slicing, mixtures, exact resume,
held-out data, bad records."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from raytron.pipelines.feeder import DataFeeder
from raytron.pipelines.packing import Cursor
from raytron.pipelines.sources import is_validation
from raytron.pipelines.stream import ALL, TRAIN, VALIDATION, local_texts, token_docs
from raytron.pipelines.tokenizer import train_bpe
from raytron.platform.config.load import load_config
from raytron.platform.control.corpus import stream_spec, with_tokenizer

from conftest import CORPUS

SEQ_LEN, GLOBAL_BATCH = 32, 8


def make_spec(sources: str, *overrides: str, vocab: int = 512, sample: int = 2**20,
              cache: str | None = None):
    """The stream of `sources`, with a BPE trained on them; tokenized files kept in
    `cache` (None: not kept)."""
    config = load_config("tiny", [f"data.sources={sources}", "data.val_share=0.1",
                                  "train.seed=7", f"data.cache={cache or 'null'}", *overrides])
    spec = stream_spec(config)
    texts = (t for source in spec.sources for t in local_texts(source, ALL, 0.0))
    sample_texts = []
    for text in texts:
        sample_texts.append(text)
        if sum(map(len, sample_texts)) > sample:
            break
    return with_tokenizer(spec, train_bpe(sample_texts, vocab, show_progress=False))


def write_mixture(folder: Path) -> str:
    """Text files of the Python reference, one document per paragraph (weight 2), and a
    JSONL file with bad records among good ones (weight 1): `data.sources`."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    (folder / "text").mkdir()
    for index, text in enumerate(texts[:4]):
        (folder / "text" / f"topic{index}.txt").write_text(text[:3000])
    (folder / "text" / "empty.txt").write_text("")
    paragraphs = [p for text in texts[4:] for p in text.split("\n\n") if p.strip()][:200]
    records = [json.dumps({"text": p}).encode() for p in paragraphs]
    bad = [b'{"text": "cut', b'{"source": "no text"}', b'{"text": "\xff"}']
    (folder / "paragraphs.jsonl").write_bytes(b"\n".join(records[:20] + bad + records[20:]))
    return (f"[{{path: {folder / 'text'}, document: paragraph, weight: 2}}, "
            f"{{path: {folder / 'paragraphs.jsonl'}, weight: 1}}]")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A two-source mixture (`write_mixture`); documents shuffled within windows of 4."""
    return make_spec(write_mixture(tmp_path_factory.mktemp("corpus")), "data.shuffle_window=4")


def new_feeder(ray, spec, val_sequences=16):
    return ray.remote(DataFeeder).options(num_cpus=0, max_concurrency=8).remote(
        spec, SEQ_LEN, GLOBAL_BATCH, 3, val_sequences)


def batches(ray, feeder, steps, dp=1, cursors=None):
    """Global batches of `steps`, read as `dp` replicas; records each step's cursor."""
    result = []
    for step in steps:
        if cursors is not None:
            cursors[step] = ray.get(feeder.cursor.remote(step))
        slices = ray.get([feeder.batch.remote(step, r, dp) for r in range(dp)])
        result.append(np.concatenate([s.tokens for s in slices]))
    return result


def test_order_is_deterministic_sliced_by_replica_and_resumes_exactly(ray_session, spec):
    ray = ray_session
    first = new_feeder(ray, spec)
    second = new_feeder(ray, dataclasses.replace(spec, tokenizer_workers=2))  # same batches
    ray.get([first.seek.remote(0, {}, ahead=True), second.seek.remote(0, {})])
    assert ray.get(first.seek.remote(0, {}))  # asked ahead by the driver, then by the
    # workers: the reading begun there goes on
    assert not ray.get(second.seek.remote(7, {}, ahead=True))  # after the workers: ignored
    steps = range(100)  # more than one epoch of both sources
    cursors = {}
    reference = batches(ray, first, steps, cursors=cursors)
    assert all(b.shape == (GLOBAL_BATCH, SEQ_LEN + 1) for b in reference)
    # a second run, read by two replicas, checkpointing every step: nothing stays held
    again = batches(ray, second, steps, dp=2, cursors={})
    for want, got in zip(reference, again, strict=True):
        np.testing.assert_array_equal(want, got)

    positions = [Cursor(**p) for c in cursors.values() for p in c["sources"]]
    assert any(c.skip > 0 for c in positions), "no cursor inside a shuffle window"
    assert any(c.offset > 0 for c in positions), "no cursor inside a document"
    assert any(c.doc > 0 and c.offset > 0 for c in positions), "no cursor inside a file"
    assert any(c.epoch > 0 for c in positions), "no cursor in a later epoch"
    with pytest.raises(ray.exceptions.RayTaskError, match="no longer held"):
        ray.get(first.batch.remote(3, 0, 1))
    for step in (5, 17, 33, 90):  # resume, each time read by a different number of replicas
        assert not ray.get(second.seek.remote(step, cursors[step]))  # read anew
        resumed = batches(ray, second, range(step, step + 4), dp=4 if step % 2 else 1)
        for want, got in zip(reference[step : step + 4], resumed, strict=True):
            np.testing.assert_array_equal(want, got)
        # the same place, blend and skipped-record counts: none counted twice
        assert ray.get(second.cursor.remote(step + 4)) == cursors[step + 4]
    assert not ray.get(second.seek.remote(5, cursors[5]))
    for step in range(5, 8):  # as replica mode's quorums split it: in whole micro-batches
        for members in (3, 2):
            parts = ray.get([second.part.remote(step, i, members, 2) for i in range(members)])
            rows = [len(part.tokens) for part in parts]
            assert sum(rows) == GLOBAL_BATCH and max(rows) - min(rows) <= 2
            np.testing.assert_array_equal(  # in order, each row once
                np.concatenate([part.tokens for part in parts]), reference[step])
    skipped = [sum(sum(c.values()) for c in cursors[s]["skipped"]) for s in steps]
    assert skipped == sorted(skipped) and skipped[-1] > skipped[0]

    stats = ray.get(first.stats.remote())
    for reason in ("empty", "malformed_json", "missing_field", "invalid_utf8"):
        assert stats[f"data/skipped_{reason}"] >= 1, reason
    assert stats["data/source0_share"] == pytest.approx(2 / 3, abs=0.01)
    assert stats["data/source1_share"] == pytest.approx(1 / 3, abs=0.01)
    validation = ray.get(first.validation.remote(0, 1)).tokens
    assert validation.shape == (16, SEQ_LEN + 1)
    halves = ray.get([first.validation.remote(r, 2) for r in range(2)])
    np.testing.assert_array_equal(np.concatenate([h.tokens for h in halves]), validation)


def test_validation_documents_never_reach_training(ray_session, spec):
    for index, source in enumerate(spec.sources):
        train = {(d.file, d.doc) for d in token_docs(spec, source, index, Cursor(), TRAIN,
                                                     epochs=1)}
        held_out = {(d.file, d.doc) for d in token_docs(spec, source, index, Cursor(),
                                                        VALIDATION, epochs=1)}
        assert held_out and train and not train & held_out
        assert len(train) + len(held_out) == sum(1 for _ in local_texts(source, ALL, 0.0))


def test_shakespeare_and_fortunes_blend_by_weight(ray_session):
    """The two corpora of ../shared/corpus at 3:1; token shares within 2% over 200
    sequences, and a one-epoch limit that retires a source without stopping the run."""
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    ray = ray_session
    spec = make_spec(f"[{{path: {CORPUS / 'shakespeare'}, weight: 3}}, "
                     f"{{path: {CORPUS / 'fortunes' / 'fortunes.jsonl'}, weight: 1}}]",
                     vocab=1024, sample=2 * 2**20)
    feeder = new_feeder(ray, spec)
    ray.get(feeder.seek.remote(0, {}))
    batches(ray, feeder, range(200 // GLOBAL_BATCH))
    stats = ray.get(feeder.stats.remote())
    assert stats["data/source0_share"] == pytest.approx(0.75, abs=0.02)
    assert stats["data/source1_share"] == pytest.approx(0.25, abs=0.02)


def test_an_epoch_limit_retires_a_source_and_the_end_is_a_clear_error(ray_session, spec):
    ray = ray_session
    topic = next(f.path for f in spec.sources[0].files if "topic" in f.path)
    limited = make_spec(f"[{{path: {topic}, epochs: 1}}, "
                        f"{{path: {spec.sources[1].files[0].path}, weight: 3}}]")
    feeder = new_feeder(ray, limited)
    ray.get(feeder.seek.remote(0, {}))
    one_epoch = sum(len(d.tokens) for d in token_docs(limited, limited.sources[0], 0, Cursor(),
                                                      TRAIN, epochs=1))
    steps = math.ceil(4 * one_epoch / (GLOBAL_BATCH * SEQ_LEN)) + 2  # past source 0's end
    batches(ray, feeder, range(steps))
    final = ray.get(feeder.cursor.remote(steps))
    assert final["sources"][0] is None and final["sources"][1] is not None
    assert final["taken"][0] <= one_epoch // SEQ_LEN  # nothing after its epoch

    separate = make_spec(f"[{{path: {spec.sources[1].files[0].path}}}]",
                         f"data.validation_sources=[{{path: {topic}}}]")
    assert separate.training_keeps == ALL  # with separate validation, nothing is held out
    held_out = ray.get(new_feeder(ray, separate, val_sequences=4).validation.remote(0, 1))
    topic_tokens = next(token_docs(separate, separate.validation[0], 0, Cursor(), ALL)).tokens
    np.testing.assert_array_equal(held_out.tokens[0], topic_tokens[: SEQ_LEN + 1])

    both_limited = make_spec(f"[{{path: {topic}, epochs: 1}}]")
    exhausted = new_feeder(ray, both_limited)
    ray.get(exhausted.seek.remote(0, {}))
    with pytest.raises(ray.exceptions.RayTaskError, match="every source reached its epoch"):
        batches(ray, exhausted, range(1000))


def test_documents_get_bos_and_eos():
    import pyarrow as pa

    from raytron.pipelines.stream import Tokenize
    from raytron.pipelines.tokenizer import BOS, EOS

    tokenizer = train_bpe(["some text to learn from"] * 20, 300, show_progress=False)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    batch = pa.table({"text": ["some text", None]})
    with_bos = Tokenize(tokenizer.to_str(), eos, bos)(batch).column("tokens").to_pylist()
    plain = Tokenize(tokenizer.to_str(), eos, None)(batch).column("tokens").to_pylist()
    assert with_bos[0] == [bos, *plain[0]] and plain[0][-1] == eos and len(plain[0]) > 2
    assert with_bos[1] == plain[1] == []  # a skipped record stays empty


def test_fine_tuning_samples_are_encoded_masked_and_packed_whole(ray_session, tmp_path):
    """Chat and prompt-completion JSONL through the Ray Data pipeline: the learned tokens
    are what `encode_chat` marks, samples start at position 0, bad and overlong samples
    are counted, and a cursor resumes the same batches."""
    from raytron.pipelines.chat import encode_chat, with_chat_tokens

    ray = ray_session
    chats = [[{"role": "user", "content": f"say {word}"},
              {"role": "assistant", "content": f"{word} {word}"}]
             for word in ("apple", "river", "stone", "cloud", "green", "seven") * 5]
    lines = [json.dumps({"messages": m}) for m in chats]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    lines.insert(5, json.dumps({"messages": [{"role": "wizard", "content": "?"}]}))
    lines.insert(7, json.dumps({"messages": [{"role": "user", "content": "tell " * 40},
                                             {"role": "assistant", "content": "long"}]}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines))
    (tmp_path / "qa.jsonl").write_text("\n".join(
        json.dumps({"q": f"{n} plus one?", "a": f"{n + 1}"}) for n in range(30)))
    spec = make_spec(f"[{{path: {tmp_path / 'chat.jsonl'}, format: chat}}, "
                     f"{{path: {tmp_path / 'qa.jsonl'}, format: prompt_completion, "
                     "prompt_field: q, completion_field: a}]", "data.val_share=0",
                     sample=2**14)
    assert spec.samples and spec.document_mask
    tokenizer = with_chat_tokens(Tokenizer.from_str(spec.tokenizer_json))
    spec = dataclasses.replace(spec, tokenizer_json=tokenizer.to_str())
    feeder = new_feeder(ray, spec)
    ray.get(feeder.seek.remote(0, {}))
    cursors, reference = {}, []
    for step in range(6):
        cursors[step] = ray.get(feeder.cursor.remote(step))
        reference.append(ray.get(feeder.batch.remote(step, 0, 1)))
    first = reference[0]
    assert first.target_count == int(first.targets[:, 1:].sum()) > 0
    ids, mask = encode_chat(tokenizer, chats[0])
    row = first.tokens[0]
    np.testing.assert_array_equal(row[: len(ids)], ids)
    np.testing.assert_array_equal(first.targets[0][1 : len(ids)], mask[1:])
    starts = np.flatnonzero(first.positions[0] == 0)
    assert starts[0] == 0 and starts[1] == len(ids)  # the next sample starts over
    assert cursors[2]["skipped"][0] == {"invalid_sample": 2, "too_long": 1}  # first epoch
    ray.get(feeder.seek.remote(3, cursors[3]))
    halves = ray.get([feeder.batch.remote(3, r, 2) for r in range(2)])
    assert all(h.target_count == reference[3].target_count for h in halves)
    for step in range(3, 6):
        resumed = ray.get(feeder.batch.remote(step, 0, 1))
        np.testing.assert_array_equal(resumed.tokens, reference[step].tokens)
        np.testing.assert_array_equal(resumed.targets, reference[step].targets)


def test_preference_pairs_stream_as_adjacent_rows_counted_and_resumable(ray_session, tmp_path):
    """Parquet preference pairs through the Ray Data pipeline: each pair is a chosen row
    and the rejected row after it (as `encode_preference` tokenizes them), a pair that
    adds nothing or does not fit is counted, replicas get whole pairs, a cursor resumes
    the same batches, the held-out set and train.steps=auto count pairs as two rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytron.pipelines.chat import encode_preference

    ray = ray_session
    pairs = [{"q": f"{n} plus one is", "good": f" {n + 1}", "bad": f" {n + 2}"}
             for n in range(40)]
    pairs.insert(2, {"q": "nothing", "good": "", "bad": " x"})
    pairs.insert(4, {"q": "long " * 40, "good": " a", "bad": " b"})  # not held out
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    spec = make_spec(f"[{{path: {tmp_path / 'pairs.parquet'}, format: preference, "
                     "prompt_field: q, chosen_field: good, rejected_field: bad, epochs: 1}]",
                     "data.val_share=0.2", "train.objective=dpo", "train.lora.rank=2",
                     sample=2**14)
    assert spec.pairs and spec.rows_per_sample == 2
    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    feeder = new_feeder(ray, spec)
    ray.get(feeder.seek.remote(0, {}))
    cursors = {step: ray.get(feeder.cursor.remote(step)) for step in range(3)}
    reference = [ray.get(feeder.batch.remote(step, 0, 1)) for step in range(3)]
    first = reference[0]
    assert first.tokens.shape == (GLOBAL_BATCH, SEQ_LEN + 1)
    trained = [pair for pair in pairs if pair["good"] and not pair["q"].startswith("long")
               and not is_validation(json.dumps({"prompt": pair["q"], "chosen": pair["good"],
                                                 "rejected": pair["bad"]}), 0.2)]
    ids, learned, chosen = encode_preference(tokenizer, json.dumps(
        {"prompt": trained[0]["q"], "chosen": trained[0]["good"],
         "rejected": trained[0]["bad"]}), spec.eos)
    for row, part in ((0, slice(0, chosen)), (1, slice(chosen, None))):
        length = len(ids[part])
        np.testing.assert_array_equal(first.tokens[row][:length], ids[part])
        np.testing.assert_array_equal(first.targets[row][1:length], learned[part][1:])
        assert not first.targets[row][length:].any()  # padding
    assert cursors[2]["skipped"][0] == {"invalid_sample": 1, "too_long": 1}
    halves = ray.get([feeder.batch.remote(1, r, 2) for r in range(2)])
    np.testing.assert_array_equal(np.concatenate([h.tokens for h in halves]),
                                  reference[1].tokens)
    ray.get(feeder.seek.remote(1, cursors[1]))
    for step in (1, 2):
        np.testing.assert_array_equal(ray.get(feeder.batch.remote(step, 0, 1)).tokens,
                                      reference[step].tokens)
    held_out = ray.get(feeder.validation.remote(0, 3))
    assert len(held_out) % 2 == 0 and len(held_out) > 0
    assert ray.get(feeder.count_steps.remote()) == 2 * len(trained) // GLOBAL_BATCH


def test_a_restarted_worker_group_gets_the_held_batches_again(ray_session, spec):
    """The feeder outlives worker groups: resuming from the last committed checkpoint
    serves the batches made since, without reading again; older ones are read anew."""
    ray = ray_session
    feeder = new_feeder(ray, spec)
    ray.get(feeder.seek.remote(0, {}))
    reference = batches(ray, feeder, range(12))
    # checkpoints written at steps 1, 4 and 8: when 8 is written, 4 is committed
    cursors = {step: ray.get(feeder.cursor.remote(step)) for step in (1, 4, 8)}
    assert ray.get(feeder.seek.remote(4, cursors[4]))  # held
    for want, got in zip(reference[4:], batches(ray, feeder, range(4, 12)), strict=True):
        np.testing.assert_array_equal(want, got)
    assert not ray.get(feeder.seek.remote(1, cursors[1]))  # no longer held: read anew
    for want, got in zip(reference[1:6], batches(ray, feeder, range(1, 6)), strict=True):
        np.testing.assert_array_equal(want, got)
