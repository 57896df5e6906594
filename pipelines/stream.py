"""The Ray Data pipeline: files -> records -> tokens, in a deterministic order.

One Ray Data task reads each file, a pool of tokenizer actors encodes the documents,
and `preserve_order` keeps the output in file order and record order, so that the
same config and seed always give the same documents in the same order. Reading
starts at a cursor's file and record: nothing before it is read or tokenized again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raytron.pipelines.packing import Cursor, TokenDoc
from raytron.pipelines.sources import is_validation, list_files, read_records

TRAIN, VALIDATION = "train", "validation"


@dataclass(frozen=True)
class CorpusFile:
    path: str
    format: str
    text_field: str


def corpus_files(sources) -> list[CorpusFile]:
    """Every file of every source (anything with path, format and text_field)."""
    return [
        CorpusFile(path, source.format, source.text_field)
        for source in sources
        for path in list_files(source.path)
    ]


def epoch_order(n_files: int, seed: int, epoch: int) -> list[int]:
    """The file order of an epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_files).tolist()


def split_records(file: CorpusFile, start: int, split: str, val_share: float):
    """(record index, text, skip reason) of one file's records that belong to `split`.

    Skipped records are kept (with their reason) only in the training split, so
    that each bad record is counted once.
    """
    for record in read_records(file.path, file.format, file.text_field, start):
        if record.text is None:
            if split == TRAIN:
                yield record.index, None, record.reason
        elif is_validation(record.text, val_share) == (split == VALIDATION):
            yield record.index, record.text, ""


RECORD_SCHEMA = pa.schema([("epoch", pa.int64()), ("position", pa.int64()), ("doc", pa.int64()),
                           ("text", pa.large_string()), ("reason", pa.string())])


def read_files(batch: dict, split: str, val_share: float) -> pa.Table:
    """Ray Data UDF: a batch of file rows -> one row per record of `split`."""
    rows: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    for epoch, position, path, fmt, field, start in zip(
        batch["epoch"], batch["position"], batch["path"], batch["format"],
        batch["text_field"], batch["start"], strict=True,
    ):
        file = CorpusFile(str(path), str(fmt), str(field))
        for index, text, reason in split_records(file, int(start), split, val_share):
            for name, value in zip(RECORD_SCHEMA.names,
                                   (int(epoch), int(position), index, text, reason), strict=True):
                rows[name].append(value)
    return pa.table(rows, schema=RECORD_SCHEMA)


class Tokenize:
    """Ray Data actor UDF: loads the tokenizer once, then encodes batches of documents."""

    def __init__(self, tokenizer_json: str, eos: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos = eos

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [i for i, text in enumerate(texts) if text is not None]
        encoded = self.tokenizer.encode_batch([texts[i] for i in good], add_special_tokens=False)
        tokens: list[list[int]] = [[] for _ in texts]
        for i, encoding in zip(good, encoded, strict=True):
            tokens[i] = encoding.ids + [self.eos]
        return batch.drop_columns(["text"]).append_column(
            "tokens", pa.array(tokens, type=pa.list_(pa.int32()))
        )


@dataclass
class StreamSpec:
    """Everything the pipeline needs besides the cursor; picklable for the feeder actor."""

    files: list[CorpusFile]
    tokenizer_json: str
    eos: int
    seed: int
    val_share: float
    tokenizer_workers: int

    def epochs_per_dataset(self) -> int:
        """Whole epochs per Ray Data execution, so that small corpora don't pay its start-up
        (~2 s) every epoch: at least MIN_FILES_PER_DATASET files each, without tokenizing
        far more than a run may need."""
        return max(1, -(-MIN_FILES_PER_DATASET // len(self.files)))


MIN_FILES_PER_DATASET = 8


def stream_dataset(spec: StreamSpec, cursor: Cursor, split: str, epochs: int):
    """A Ray Dataset of the records of `epochs` epochs from `cursor`'s file and record on."""
    import ray.data

    items = [
        {"epoch": epoch, "position": position, "path": spec.files[index].path,
         "format": spec.files[index].format, "text_field": spec.files[index].text_field,
         "start": cursor.doc if (epoch, position) == (cursor.epoch, cursor.file) else 0}
        for epoch in range(cursor.epoch, cursor.epoch + epochs)
        for position, index in enumerate(epoch_order(len(spec.files), spec.seed, epoch))
        if (epoch, position) >= (cursor.epoch, cursor.file)
    ]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_files, batch_size=1, batch_format="numpy",
                     fn_kwargs={"split": split, "val_share": spec.val_share})
        .map_batches(Tokenize, batch_size=None, batch_format="pyarrow",
                     fn_constructor_args=(spec.tokenizer_json, spec.eos),
                     compute=ray.data.ActorPoolStrategy(size=spec.tokenizer_workers))
    )


def token_docs(spec: StreamSpec, cursor: Cursor, split: str, skipped: dict[str, int],
               epochs: int | None = None) -> Iterator[TokenDoc]:
    """Documents of `split` from `cursor` on, epoch after epoch (or `epochs` of them).

    Skipped records add to `skipped` by reason.
    """
    end = None if epochs is None else cursor.epoch + epochs
    while end is None or cursor.epoch < end:
        span = spec.epochs_per_dataset() if end is None else end - cursor.epoch
        found = False
        for batch in stream_dataset(spec, cursor, split, span).iter_batches(
            batch_size=None, batch_format="pyarrow"
        ):
            tokens = batch.column("tokens").combine_chunks()
            offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()
            for row, (epoch, position, doc, reason) in enumerate(zip(
                batch.column("epoch").to_pylist(), batch.column("position").to_pylist(),
                batch.column("doc").to_pylist(), batch.column("reason").to_pylist(),
                strict=True,
            )):
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                found = True
                yield TokenDoc(epoch, position, doc, values[offsets[row] : offsets[row + 1]])
        if not found and cursor == Cursor(cursor.epoch):
            if split == VALIDATION:
                return
            raise ValueError(
                "the corpus has no usable training document (all records were skipped or "
                "held out for validation). Fix: check data.sources and data.val_share."
            )
        cursor = Cursor(cursor.epoch + span)


def local_texts(files: list[CorpusFile], val_share: float) -> Iterator[str]:
    """Training texts in file order, read in this process: the tokenizer trainer's input."""
    for file in files:
        for _, text, _ in split_records(file, 0, TRAIN, val_share):
            if text is not None:
                yield text
