"""Packing: every token is a target once, and a cursor resumes the exact continuation."""

import numpy as np

from raytron.pipelines.packing import (
    TOO_LONG,
    Batch,
    Cursor,
    Packer,
    SamplePacker,
    TokenDoc,
    shuffled,
)

START = Cursor()


def documents(start: Cursor = START, n_files=3, docs_per_file=4):
    """Documents of varied lengths whose tokens encode their position, with 0-2 bad
    records before each; a stream read from `start` does not see those before its first."""
    first = True
    for epoch in range(start.epoch, 3):
        for file in range(n_files):
            for doc in range(docs_per_file):
                if (epoch, file, doc) < (start.epoch, start.file, start.doc):
                    continue
                length = 1 + (7 * file + 5 * doc + epoch) % 23
                tokens = np.arange(length, dtype=np.int32) + 1000 * (epoch * 100 + file * 10 + doc)
                bad = 0 if first else (epoch + file + 2 * doc) % 3
                yield TokenDoc(epoch, file, doc, tokens, skipped={"bad": bad} if bad else {})
                first = False


def test_sequences_overlap_by_one_token_and_cover_the_stream():
    stream = np.concatenate([d.tokens for d in documents()])
    packer = Packer(documents(), seq_len=8)
    sequences = [packer.next_sequence() for _ in range(20)]
    assert all(len(s) == 9 for s in sequences)
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(sequence, stream[8 * i : 8 * i + 9])


def test_resume_from_any_cursor_gives_the_same_sequences():
    reference = Packer(documents(), seq_len=8)
    cursors, expected = [], []
    for _ in range(30):
        cursors.append(reference.cursor())
        expected.append(reference.next_sequence())
    for index in (0, 1, 7, 13, 29):
        cursor = cursors[index]
        resumed = Packer(documents(cursor), seq_len=8, first_offset=cursor.offset)
        for want in expected[index:]:
            np.testing.assert_array_equal(resumed.next_sequence(), want)
    assert any(c.offset > 0 for c in cursors) and any(c.epoch > 0 for c in cursors)


def test_a_shuffle_window_permutes_documents_and_resumes_exactly():
    plain = [(d.epoch, d.file, d.doc) for d in documents()]
    mixed = [(d.epoch, d.file, d.doc) for d in shuffled(documents(), 5, 7, 0, START)]
    assert mixed != plain and sorted(mixed) == sorted(plain)
    for window in range(0, len(plain), 5):  # each window holds the same documents
        assert sorted(mixed[window : window + 5]) == plain[window : window + 5]

    def stream(cursor: Cursor) -> Packer:
        docs = shuffled(documents(cursor), 5, 7, 0, cursor)
        return Packer(docs, seq_len=8, first_offset=cursor.offset)

    reference = stream(START)
    cursors, expected = [], []
    for _ in range(30):
        cursors.append(reference.cursor())
        expected.append(reference.next_sequence())
    assert any(c.skip > 0 for c in cursors) and any(c.offset > 0 for c in cursors)
    for index in (1, 6, 13, 22, 29):
        resumed = stream(cursors[index])
        for want in expected[index:]:
            np.testing.assert_array_equal(resumed.next_sequence(), want)


def test_skipped_records_are_counted_once_across_any_resume():
    """The count a cursor carries covers exactly the records before it: resumed there, a
    packer counts each later bad record once, with or without a shuffle window."""
    for window in (0, 5):
        def stream(cursor: Cursor, counted: dict | None = None, window: int = window) -> Packer:
            docs = documents(cursor)
            if window:
                docs = shuffled(docs, window, 7, 0, cursor)
            return Packer(docs, seq_len=8, first_offset=cursor.offset, skipped=counted,
                          resumed=counted is not None)

        reference = stream(START)
        cursors, counts = [], []
        for _ in range(30):
            cursors.append(reference.cursor())
            counts.append(dict(reference.skipped))
            reference.next_sequence()
        assert counts[-1]["bad"] > counts[1]["bad"] > 0
        for index in range(1, 30):
            resumed = stream(cursors[index], counts[index])
            for later in range(index, 30):
                assert resumed.cursor() == cursors[later]
                assert resumed.skipped == counts[later], (window, index, later)
                resumed.next_sequence()


def sample(doc: int, size: int, learned_from: int) -> TokenDoc:
    return TokenDoc(0, 0, doc, np.arange(size, dtype=np.int32) + 10 * doc,
                    targets=np.arange(size) >= learned_from)


def test_samples_are_packed_whole_and_padded_with_masks_and_positions():
    docs = iter([sample(1, 4, 2), sample(2, 3, 1), sample(3, 12, 1), sample(4, 5, 3),
                 sample(5, 4, 0)])
    packer = SamplePacker(docs, seq_len=8, pad=99)
    first = packer.next_sequence()  # samples 1 and 2, then 2 pads (sample 4 does not fit)
    np.testing.assert_array_equal(first.tokens, [10, 11, 12, 13, 20, 21, 22, 99, 99])
    np.testing.assert_array_equal(first.targets, [0, 0, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(first.positions, [0, 1, 2, 3, 0, 1, 2, 0, 1])
    assert packer.cursor() == Cursor(0, 0, 4)  # sample 3 (12 tokens > 9) was dropped
    assert packer.skipped == {TOO_LONG: 1}
    second = packer.next_sequence()  # a sample's first token is never learned
    np.testing.assert_array_equal(second.targets, [0, 0, 0, 1, 1, 0, 1, 1, 1])
    batch = Batch.of([first, second])
    assert batch.target_count == 4 + 5 and batch.rows(1, 2).target_count == 9


def test_overlong_samples_can_be_truncated_instead():
    packer = SamplePacker(iter([sample(1, 12, 1)]), seq_len=8, pad=99, truncate=True)
    packed = packer.next_sequence()
    np.testing.assert_array_equal(packed.tokens, np.arange(9) + 10)
    assert packer.skipped == {}


def test_a_sample_packer_resumed_at_its_cursor_continues_the_same_sequences():
    def stream(start=0):
        for doc in range(start, 40):
            bad = {"bad": 1} if doc % 5 == 0 else {}
            size = 2 + (doc * 7) % 11
            yield TokenDoc(0, 0, doc, np.arange(size, dtype=np.int32) + doc, skipped=bad)

    reference = SamplePacker(stream(), seq_len=8, pad=0)
    for _ in range(4):
        reference.next_sequence()
    cursor, skipped = reference.cursor(), dict(reference.skipped)
    resumed = SamplePacker(stream(cursor.doc), seq_len=8, pad=0, skipped=skipped, resumed=True)
    for _ in range(6):
        np.testing.assert_array_equal(resumed.next_sequence().tokens,
                                      reference.next_sequence().tokens)
    assert resumed.skipped == reference.skipped
