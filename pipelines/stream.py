"""The Ray Data pipeline: files -> records -> tokens, per source, in a deterministic order.

Each source is its own stream. A pool of tokenizer actors reads each file (one task a
file, several files at once) and encodes its documents; `preserve_order` keeps the
output in file order and record order, and the file order of each epoch is a
permutation seeded by (seed, source, epoch), so the same config and seed always give
the same documents in the same order. Reading starts at a cursor's file and record:
nothing before it is read or tokenized again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raytron.pipelines.chat import ChatError, encode_sample, sample_text
from raytron.pipelines.packing import Cursor, Packer, SamplePacker, TokenDoc, shuffled
from raytron.pipelines.sources import (
    INVALID_SAMPLE,
    SAMPLE_FORMATS,
    CorpusFile,
    is_validation,
    list_files,
    read_records,
    sample_kind,
)

# Which records of a source a stream keeps: those not held out, the held-out ones, all.
TRAIN, VALIDATION, ALL = "train", "validation", "all"


@dataclass(frozen=True)
class SourceSpec:
    """The files of one source, its share of the training tokens and its epoch limit."""

    files: list[CorpusFile]
    weight: float = 1.0
    epochs: int | None = None  # None: repeat forever


def sample_format(source: SourceSpec) -> str | None:
    """chat or prompt_completion for a source of fine-tuning samples; None for documents."""
    declared = source.files[0].format
    return declared if declared in SAMPLE_FORMATS else None


def source_spec(source, max_document_bytes: int) -> SourceSpec:
    """From a `SourceConfig` (path, format, its fields, document, weight, epochs)."""
    files = [CorpusFile(path, sample_kind(source.path, source.format), source.text_field,
                        source.document, max_document_bytes, source.messages_field,
                        source.prompt_field, source.completion_field)
             for path in list_files(source.path)]
    return SourceSpec(files, source.weight, source.epochs)


@dataclass
class StreamSpec:
    """Everything the pipeline needs besides cursors; picklable for the feeder actor."""

    sources: list[SourceSpec]
    tokenizer_json: str
    eos: int
    seed: int
    val_share: float  # held out of `sources` by content hash, unless `validation` is given
    tokenizer_workers: int = 1
    validation: list[SourceSpec] = field(default_factory=list)
    shuffle_window: int = 0  # documents shuffled together; 0: stream order
    add_bos: bool = False  # data.bos
    bos: int | None = None  # the tokenizer's BOS id, when add_bos
    samples: bool = False  # data.packing: whole samples per sequence (else cut the stream)
    document_mask: bool = True  # data.document_mask, with samples
    truncate: bool = False  # data.overlong=truncate, with samples

    def packer(self, docs: Iterator[TokenDoc], seq_len: int, start: Cursor | None = None,
               skipped: dict[str, int] | None = None) -> Packer | SamplePacker:
        """Packs `docs`, which begin at `start` (a checkpoint's cursor; None: the start)."""
        resumed = start is not None
        if self.samples:
            return SamplePacker(docs, seq_len, self.eos, self.truncate, skipped, resumed)
        return Packer(docs, seq_len, 0 if start is None else start.offset, skipped, resumed)

    @property
    def training_keeps(self) -> str:
        return ALL if self.validation or self.val_share <= 0 else TRAIN

    def weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]


def epoch_order(n_files: int, seed: int, source: int, epoch: int) -> list[int]:
    """The file order of an epoch: a permutation seeded by (seed, source, epoch)."""
    return np.random.default_rng([seed, source, epoch]).permutation(n_files).tolist()


def kept_records(file: CorpusFile, start: int, keep: str, val_share: float):
    """(record index, text, skip reason) of one file's records that `keep` selects.

    Skipped records are reported (with their reason) by every stream but a validation
    stream over training sources, so that each bad record is counted once.
    """
    for record in read_records(file, start):
        if record.text is None:
            if keep != VALIDATION:
                yield record.index, None, record.reason
        elif keep == ALL or is_validation(record.text, val_share) == (keep == VALIDATION):
            yield record.index, record.text, ""


RECORD_SCHEMA = pa.schema([("epoch", pa.int64()), ("position", pa.int64()), ("doc", pa.int64()),
                           ("text", pa.large_string()), ("reason", pa.string())])


def read_files(batch: dict, files: list[CorpusFile], keep: str, val_share: float) -> pa.Table:
    """Ray Data UDF: a batch of (epoch, position, file, start) rows -> one row a record."""
    rows: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    for epoch, position, index, start in zip(batch["epoch"], batch["position"], batch["file"],
                                             batch["start"], strict=True):
        for record, text, reason in kept_records(files[int(index)], int(start), keep,
                                                 val_share):
            for name, value in zip(RECORD_SCHEMA.names,
                                   (int(epoch), int(position), record, text, reason),
                                   strict=True):
                rows[name].append(value)
    return pa.table(rows, schema=RECORD_SCHEMA)


class Tokenize:
    """Ray Data actor UDF: loads the tokenizer once, then encodes batches of documents, or
    of fine-tuning samples (with which of their tokens are learned, `targets`).

    The pipeline passes the tokenizer's JSON as a list holding an object reference to it:
    a large constructor argument would otherwise sit in the object store, which Ray warns
    about for actors that restart (a pool's do)."""

    def __init__(self, tokenizer_json: str | list, eos: int, bos: int | None,
                 sample_format: str | None = None):
        from tokenizers import Tokenizer

        if isinstance(tokenizer_json, list):
            import ray

            tokenizer_json = ray.get(tokenizer_json[0])
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos = eos
        self.bos = bos
        self.sample_format = sample_format  # None: plain documents

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [i for i, text in enumerate(texts) if text is not None]
        tokens: list[list[int]] = [[] for _ in texts]
        if self.sample_format is None:
            encoded = self.tokenizer.encode_batch([texts[i] for i in good],
                                                  add_special_tokens=False)
            start = [] if self.bos is None else [self.bos]
            for i, encoding in zip(good, encoded, strict=True):
                tokens[i] = start + encoding.ids + [self.eos]
            return batch.drop_columns(["text"]).append_column(
                "tokens", pa.array(tokens, type=pa.list_(pa.int32())))
        targets: list[list[bool]] = [[] for _ in texts]
        reasons = batch.column("reason").to_pylist()
        for i in good:
            try:
                tokens[i], targets[i] = encode_sample(self.tokenizer, self.sample_format,
                                                      texts[i], self.eos, self.bos)
            except ChatError:
                reasons[i] = INVALID_SAMPLE
        return (batch.drop_columns(["text", "reason"])
                .append_column("reason", pa.array(reasons, type=pa.string()))
                .append_column("tokens", pa.array(tokens, type=pa.list_(pa.int32())))
                .append_column("targets", pa.array(targets, type=pa.list_(pa.bool_()))))


MIN_FILES_PER_DATASET = 8


def epochs_per_dataset(source: SourceSpec) -> int:
    """Whole epochs per Ray Data execution, so that small corpora don't pay its start-up
    (~2 s) every epoch: at least MIN_FILES_PER_DATASET files each, without tokenizing
    far more than a run may need."""
    return max(1, -(-MIN_FILES_PER_DATASET // len(source.files)))


def stream_dataset(spec: StreamSpec, source: SourceSpec, index: int, cursor: Cursor,
                   keep: str, epochs: int):
    """A Ray Dataset of the records of `epochs` epochs from `cursor`'s file and record on."""
    import ray.data

    items = [
        {"epoch": epoch, "position": position, "file": file,
         "start": cursor.doc if (epoch, position) == (cursor.epoch, cursor.file) else 0}
        for epoch in range(cursor.epoch, cursor.epoch + epochs)
        for position, file in enumerate(epoch_order(len(source.files), spec.seed, index, epoch))
        if (epoch, position) >= (cursor.epoch, cursor.file)
    ]
    # Ray Data fuses the read into the tokenizer actors; batch_size=None hands each
    # call one file's records, where a fixed size would first bundle many files.
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_files, batch_size=1, batch_format="numpy",
                     fn_kwargs={"files": source.files, "keep": keep,
                                "val_share": spec.val_share})
        .map_batches(Tokenize, batch_size=None, batch_format="pyarrow",
                     fn_constructor_args=([ray.put(spec.tokenizer_json)], spec.eos, spec.bos,
                                          sample_format(source)),
                     compute=ray.data.ActorPoolStrategy(size=spec.tokenizer_workers))
    )


def token_docs(spec: StreamSpec, source: SourceSpec, index: int, cursor: Cursor, keep: str,
               epochs: int | None = None) -> Iterator[TokenDoc]:
    """Documents of one source from `cursor` on, epoch after epoch, until the source's
    epoch limit or `epochs` more, shuffled within `spec.shuffle_window` documents when
    training; each carries the records skipped since the document before it."""
    docs = ordered_docs(spec, source, index, cursor, keep, epochs)
    if spec.shuffle_window > 1 and keep != VALIDATION:
        return shuffled(docs, spec.shuffle_window, spec.seed, index, cursor)
    return docs


def ordered_docs(spec: StreamSpec, source: SourceSpec, index: int, cursor: Cursor, keep: str,
                 epochs: int | None) -> Iterator[TokenDoc]:
    """Documents in file order (see `token_docs`)."""
    limits = [n for n in (source.epochs, None if epochs is None else cursor.epoch + epochs)
              if n is not None]
    end = min(limits) if limits else None
    skipped: dict[str, int] = {}
    while end is None or cursor.epoch < end:
        span = epochs_per_dataset(source)
        if end is not None:
            span = min(span, end - cursor.epoch)
        found = False
        for batch in stream_dataset(spec, source, index, cursor, keep, span).iter_batches(
            batch_size=None, batch_format="pyarrow"
        ):
            tokens = batch.column("tokens").combine_chunks()
            offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()
            learned = None
            if "targets" in batch.column_names:  # fine-tuning samples
                targets = batch.column("targets").combine_chunks()
                learned = targets.values.to_numpy(zero_copy_only=False)
                learned_offsets = targets.offsets.to_numpy()
            for row, (epoch, position, doc, reason) in enumerate(zip(
                batch.column("epoch").to_pylist(), batch.column("position").to_pylist(),
                batch.column("doc").to_pylist(), batch.column("reason").to_pylist(),
                strict=True,
            )):
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                found = True
                yield TokenDoc(epoch, position, doc, values[offsets[row] : offsets[row + 1]],
                               None if learned is None else
                               learned[learned_offsets[row] : learned_offsets[row + 1]],
                               skipped=skipped)
                skipped = {}
        if not found and (cursor.file, cursor.doc) == (0, 0):
            if keep == VALIDATION:
                return
            raise ValueError(
                f"source {index} ({source.files[0].path}...) has no usable document (all "
                "records were skipped or held out for validation). Fix: check data.sources "
                "and data.val_share."
            )
        cursor = Cursor(cursor.epoch + span)


def local_texts(source: SourceSpec, keep: str, val_share: float) -> Iterator[str]:
    """A source's texts in file order, read in this process (the tokenizer trainer's);
    fine-tuning samples as the text they train on."""
    kind = sample_format(source)
    for file in source.files:
        for _, text, _ in kept_records(file, 0, keep, val_share):
            if text is not None:
                yield text if kind is None else sample_text(kind, text)


def tokenizer_sample(spec: StreamSpec, max_bytes: int) -> Iterator[str]:
    """Training texts of every source, each up to its weight's share of `max_bytes`."""
    from raytron.pipelines.tokenizer import capped

    for source, weight in zip(spec.sources, spec.weights(), strict=True):
        yield from capped(local_texts(source, spec.training_keeps, spec.val_share),
                          int(max_bytes * weight))
