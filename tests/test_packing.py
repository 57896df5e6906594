"""Packing: every token is a target once, and a cursor resumes the exact continuation."""

import numpy as np

from raytron.pipelines.packing import Cursor, Packer, TokenDoc, shuffled

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
