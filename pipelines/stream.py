"""The Ray Data pipeline: files -> records -> tokens, per source, in a deterministic order.

Each source is its own stream. A pool of tokenizer actors reads each file (one task a
file, several files at once) and encodes its documents; `preserve_order` keeps the
output in file order and record order, and the file order of each epoch is a
permutation seeded by (seed, source, epoch), so the same config and seed always give
the same documents in the same order. Reading starts at a cursor's file and record:
nothing before it is read or tokenized again. A file tokenized once is kept in the token
cache (`token_cache.py`) and read from it by every later epoch, restart and run, without
the actors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raytron.pipelines.chat import (
    CHATML,
    ChatError,
    ChatTemplate,
    encode_preference,
    encode_sample,
    sample_text,
)
from raytron.pipelines.packing import Cursor, Packer, PairPacker, SamplePacker, TokenDoc, shuffled
from raytron.pipelines.sources import (
    INVALID_SAMPLE,
    PREFERENCE,
    SAMPLE_FORMATS,
    UNREADABLE,
    CorpusFile,
    is_validation,
    list_file_versions,
    read_records,
    sample_kind,
    split_point,
)
from raytron.pipelines.token_cache import TokenCache

# Which records of a source a stream keeps: those not held out, the held-out ones, all.
TRAIN, VALIDATION, ALL = "train", "validation", "all"


@dataclass(frozen=True)
class SourceSpec:
    """The files of one source, its share of the training tokens and its epoch limit.

    `files` holds every file any epoch reads; `eras` says which of them each epoch reads:
    (first epoch, indices into `files` in listing order), one entry per file list the
    source has had (a corpus that grew between epochs, `data.on_new_files=next_epoch`).
    Without eras every epoch reads all of `files`."""

    files: list[CorpusFile]
    weight: float = 1.0
    epochs: int | None = None  # None: repeat forever
    eras: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def listed(self, epoch: int) -> list[int]:
        """The indices of the files `epoch` reads, in listing order."""
        current = [files for first, files in self.eras if first <= epoch]
        chosen = current[-1] if current else self.eras[0][1] if self.eras else None
        return list(range(len(self.files))) if chosen is None else list(chosen)

    def epoch_order(self, seed: int, source: int, epoch: int) -> list[int]:
        """The files of `epoch` in its order: a permutation seeded by (seed, source, epoch)
        of its list."""
        listed = self.listed(epoch)
        return [listed[p] for p in epoch_order(len(listed), seed, source, epoch)]


def sample_format(source: SourceSpec) -> str | None:
    """chat, prompt_completion or preference for a source of fine-tuning samples; None
    for documents."""
    declared = source.files[0].format
    return declared if declared in SAMPLE_FORMATS else None


def source_spec(source, max_document_bytes: int,
                listed: list[tuple[str, str]] | None = None) -> SourceSpec:
    """From a `SourceConfig` (path, format, its fields, document, weight, epochs), and its
    (file, version) list when it was listed already."""
    files = [CorpusFile(path, sample_kind(source.path, source.format), source.text_field,
                        source.document, max_document_bytes, source.messages_field,
                        source.prompt_field, source.completion_field, source.chosen_field,
                        source.rejected_field, version)
             for path, version in (list_file_versions(source.path) if listed is None
                                   else listed)]
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
    cache: str | None = None  # data.cache: where tokenized files are kept; None: nowhere
    chat_template: ChatTemplate = CHATML  # renders chat samples

    def packer(self, docs: Iterator[TokenDoc], seq_len: int, start: Cursor | None = None,
               skipped: dict[str, int] | None = None) -> Packer | SamplePacker:
        """Packs `docs`, which begin at `start` (a checkpoint's cursor; None: the start)."""
        resumed = start is not None
        if self.pairs:
            return PairPacker(docs, seq_len, self.eos, self.truncate, skipped, resumed)
        if self.samples:
            return SamplePacker(docs, seq_len, self.eos, self.truncate, skipped, resumed)
        return Packer(docs, seq_len, 0 if start is None else start.offset, skipped, resumed)

    def token_cache(self, source: SourceSpec) -> TokenCache | None:
        """Where `source`'s tokenized files are kept for this tokenizer; None: not kept."""
        if not self.cache or not self.tokenizer_json:
            return None
        return TokenCache.of(self.cache, self.tokenizer_json, self.eos, self.bos,
                             sample_format(source), self.chat_template)

    @property
    def pairs(self) -> bool:
        """Preference pairs: each packed as two rows, chosen then rejected."""
        return any(sample_format(source) == PREFERENCE for source in self.sources)

    @property
    def rows_per_sample(self) -> int:
        """Rows of a batch each `next_sequence` of a packer gives."""
        return 2 if self.pairs else 1

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


def selected(table: pa.Table, keep: str, val_share: float, start: int = 0) -> pa.Table:
    """The rows of a file's table (doc, reason, split, ...) that a stream keeping `keep`
    reads from record `start` on, as `kept_records` selects them: held out are the
    records with a text (a split point, not NaN) below `val_share`."""
    split = table.column("split").to_numpy()
    held_out = split < val_share if val_share > 0 else np.zeros(len(split), bool)
    mask = {ALL: np.ones(len(split), bool), TRAIN: ~held_out, VALIDATION: held_out}[keep]
    if start:
        mask &= table.column("doc").to_numpy() >= start
    return table if mask.all() else table.filter(pa.array(mask))


RECORD_SCHEMA = pa.schema([("doc", pa.int64()), ("reason", pa.string()),
                           ("split", pa.float64()), ("text", pa.large_string())])


def read_table(file: CorpusFile, start: int) -> pa.Table:
    """Every record of one file from `start` on: index, skip reason, split point (NaN for
    a skipped record) and text."""
    rows: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    for record in read_records(file, start):
        split = math.nan if record.text is None else split_point(record.text)
        for name, value in zip(RECORD_SCHEMA.names,
                               (record.index, record.reason, split, record.text), strict=True):
            rows[name].append(value)
    return pa.table(rows, schema=RECORD_SCHEMA)


class Tokenize:
    """Encodes batches of documents, or of fine-tuning samples (with which of their tokens
    are learned, `targets`); a record without text stays empty. Other columns pass through.

    The tokenizer's JSON may come as a list holding an object reference to it: a large
    constructor argument would otherwise sit in the object store, which Ray warns about
    for actors that restart (a pool's do)."""

    def __init__(self, tokenizer_json: str | list, eos: int, bos: int | None,
                 sample_format: str | None = None, template: ChatTemplate = CHATML):
        from tokenizers import Tokenizer

        if isinstance(tokenizer_json, list):
            import ray

            tokenizer_json = ray.get(tokenizer_json[0])
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # without the character offsets, which only `encode_batch` computes: ~1.8x faster
        self.encode_batch = getattr(self.tokenizer, "encode_batch_fast",
                                    self.tokenizer.encode_batch)
        self.eos = eos
        self.bos = bos
        self.sample_format = sample_format  # None: plain documents
        self.template = template

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [i for i, text in enumerate(texts) if text is not None]
        tokens: list[list[int]] = [[] for _ in texts]
        if self.sample_format is None:
            encoded = self.encode_batch([texts[i] for i in good], add_special_tokens=False)
            start = [] if self.bos is None else [self.bos]
            for i, encoding in zip(good, encoded, strict=True):
                tokens[i] = start + encoding.ids + [self.eos]
            return batch.drop_columns(["text"]).append_column(
                "tokens", pa.array(tokens, type=pa.list_(pa.int32())))
        targets: list[list[bool]] = [[] for _ in texts]
        firsts = [0] * len(texts)  # pairs: the length of the chosen sequence
        reasons = batch.column("reason").to_pylist()
        for i in good:
            try:
                if self.sample_format == PREFERENCE:
                    tokens[i], targets[i], firsts[i] = encode_preference(
                        self.tokenizer, texts[i], self.eos, self.bos, self.template)
                else:
                    tokens[i], targets[i] = encode_sample(self.tokenizer, self.sample_format,
                                                          texts[i], self.eos, self.bos,
                                                          self.template)
            except ChatError:
                reasons[i] = INVALID_SAMPLE
        table = (batch.drop_columns(["text", "reason"])
                 .append_column("reason", pa.array(reasons, type=pa.string()))
                 .append_column("tokens", pa.array(tokens, type=pa.list_(pa.int32())))
                 .append_column("targets", pa.array(targets, type=pa.list_(pa.bool_()))))
        if self.sample_format == PREFERENCE:
            table = table.append_column("chosen_length", pa.array(firsts, type=pa.int32()))
        return table


def tokenized_file(encode: Tokenize, file: CorpusFile, start: int, keep: str,
                   val_share: float, cache: TokenCache | None) -> pa.Table:
    """The records of one file from `start` on that `keep` selects, tokenized. A whole
    file read for training is tokenized whole (held-out records too) and kept in `cache`;
    one that could not be read is not kept, the next read tries again."""
    whole = cache is not None and start == 0 and keep != VALIDATION
    table = encode(selected(read_table(file, start), ALL if whole else keep, val_share))
    if not whole:
        return table
    if UNREADABLE not in table.column("reason").to_pylist():
        cache.write(file, table)
    return selected(table, keep, val_share)


class TokenizeFiles:
    """Ray Data actor UDF: reads and tokenizes files, one a call (see `tokenized_file`).
    The file list comes as a list holding an object reference (see `Tokenize`)."""

    def __init__(self, files: list, tokenizer_json: list, eos: int, bos: int | None,
                 sample_format: str | None, keep: str, val_share: float,
                 cache: TokenCache | None, template: ChatTemplate):
        import ray

        self.files: list[CorpusFile] = ray.get(files[0])
        self.encode = Tokenize(tokenizer_json, eos, bos, sample_format, template)
        self.keep, self.val_share, self.cache = keep, val_share, cache

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = []
        for epoch, position, index, start in zip(batch["epoch"], batch["position"],
                                                 batch["file"], batch["start"], strict=True):
            table = tokenized_file(self.encode, self.files[int(index)], int(start), self.keep,
                                   self.val_share, self.cache).drop_columns(["split"])
            tables.append(table.append_column("epoch", pa.array(np.full(len(table), epoch)))
                          .append_column("position", pa.array(np.full(len(table), position))))
        return pa.concat_tables(tables)


MIN_FILES_PER_DATASET = 8


def epochs_per_dataset(source: SourceSpec) -> int:
    """Whole epochs per Ray Data execution, so that small corpora don't pay its start-up
    (~2 s) every epoch: at least MIN_FILES_PER_DATASET files each, without tokenizing
    far more than a run may need."""
    return max(1, -(-MIN_FILES_PER_DATASET // len(source.files)))


def span_items(spec: StreamSpec, source: SourceSpec, index: int, cursor: Cursor,
               end: int | None, tokenized: set[int]) -> tuple[list[dict], Cursor]:
    """The files of the next span from `cursor` (`epochs_per_dataset` epochs, up to epoch
    `end`) as (epoch, position, file, start) items, and the cursor after them. A span
    ends before a file of `tokenized` (those it tokenizes and caches) comes a second
    time: the next span reads its shard."""
    span = epochs_per_dataset(source)
    if end is not None:
        span = min(span, end - cursor.epoch)
    items: list[dict] = []
    seen: set[int] = set()
    for epoch in range(cursor.epoch, cursor.epoch + span):
        for position, file in enumerate(source.epoch_order(spec.seed, index, epoch)):
            if (epoch, position) < (cursor.epoch, cursor.file):
                continue
            start = cursor.doc if (epoch, position) == (cursor.epoch, cursor.file) else 0
            if file in tokenized and start == 0:
                if file in seen:
                    return items, Cursor(epoch, position)
                seen.add(file)
            items.append({"epoch": epoch, "position": position, "file": file, "start": start})
    return items, Cursor(cursor.epoch + span)


def stream_dataset(spec: StreamSpec, source: SourceSpec, items: list[dict], keep: str,
                   cache: TokenCache | None):
    """A Ray Dataset of the tokenized records of `items`' files, in their order."""
    import ray.data

    # batch_size=1: one file a call (a larger batch bundles files, and the first batch waits)
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TokenizeFiles, batch_size=1, batch_format="numpy",
        fn_constructor_args=([ray.put(source.files)], [ray.put(spec.tokenizer_json)], spec.eos,
                             spec.bos, sample_format(source), keep, spec.val_share, cache,
                             spec.chat_template),
        compute=ray.data.ActorPoolStrategy(size=spec.tokenizer_workers))


def file_tables(spec: StreamSpec, source: SourceSpec, items: list[dict], keep: str,
                cache: TokenCache | None, cached: set[int], writing: bool
                ) -> Iterator[tuple[dict, pa.Table]]:
    """(item, its records) for `items` in order: the files in `cached` read from their
    shards here, the others tokenized by the actor pool (which writes their shards when
    `writing`), in one execution that starts when the first of them is due."""
    cold = [item for item in items if item["file"] not in cached]
    pieces = tokenized_pieces(stream_dataset(spec, source, cold, keep,
                                             cache if writing else None)) if cold else iter(())
    piece = None  # the next piece, once taken from `pieces`
    for item in items:
        if item["file"] in cached:
            file = source.files[item["file"]]
            table = cache.read(file) if cache else None
            if table is None:  # gone or damaged since it was listed: tokenize it here
                table = tokenized_file(Tokenize(spec.tokenizer_json, spec.eos, spec.bos,
                                                sample_format(source), spec.chat_template),
                                       file, 0, ALL,
                                       spec.val_share, cache if writing else None)
            yield item, selected(table, keep, spec.val_share, item["start"])
            continue
        key = (item["epoch"], item["position"])
        while (piece := piece or next(pieces, None)) and piece[0] == key:
            yield item, piece[1]
            piece = None


def tokenized_pieces(dataset) -> Iterator[tuple[tuple[int, int], pa.Table]]:
    """((epoch, position), rows of that file) from the Ray Dataset's batches, in order."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if not batch.num_rows:
            continue
        epochs, positions = batch.column("epoch").to_numpy(), batch.column("position").to_numpy()
        bounds = (np.flatnonzero((np.diff(epochs) != 0) | (np.diff(positions) != 0)) + 1).tolist()
        for first, stop in zip([0, *bounds], [*bounds, batch.num_rows], strict=True):
            yield (int(epochs[first]), int(positions[first])), batch.slice(first, stop - first)


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
    """Documents in file order (see `token_docs`): files with a shard in the token cache
    are read from it, the others are tokenized (and cached, unless held out only)."""
    limits = [n for n in (source.epochs, None if epochs is None else cursor.epoch + epochs)
              if n is not None]
    end = min(limits) if limits else None
    cache = spec.token_cache(source)
    writing = cache is not None and keep != VALIDATION
    cacheable = {i for i, file in enumerate(source.files) if file.version}
    skipped: dict[str, int] = {}
    epoch, whole, found = cursor.epoch, (cursor.file, cursor.doc) == (0, 0), False
    written: set[int] = set()
    while end is None or cursor.epoch < end:
        cached = cache.cached(source.files) if cache else set()
        if written and not written & cached:
            writing = False  # the cache keeps nothing (read-only?): stop cutting spans
        tokenized = cacheable - cached if writing else set()
        items, cursor = span_items(spec, source, index, cursor, end, tokenized)
        written = {item["file"] for item in items if item["file"] in tokenized}
        for item, table in file_tables(spec, source, items, keep, cache, cached, writing):
            if item["epoch"] != epoch:
                if whole and not found:  # an epoch read from its start had no document
                    if keep == VALIDATION:
                        return
                    raise no_document(index, source)
                epoch, whole, found = item["epoch"], True, False
            tokens = table.column("tokens").combine_chunks()
            offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()
            learned = None
            if "targets" in table.column_names:  # fine-tuning samples
                targets = table.column("targets").combine_chunks()
                learned = targets.values.to_numpy(zero_copy_only=False)
                learned_offsets = targets.offsets.to_numpy()
            firsts = table.column("chosen_length").to_pylist() \
                if "chosen_length" in table.column_names else None
            for row, (doc, reason) in enumerate(zip(table.column("doc").to_pylist(),
                                                    table.column("reason").to_pylist(),
                                                    strict=True)):
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                found = True
                yield TokenDoc(epoch, item["position"], doc,
                               values[offsets[row] : offsets[row + 1]],
                               None if learned is None else
                               learned[learned_offsets[row] : learned_offsets[row + 1]],
                               skipped=skipped,
                               chosen_length=None if firsts is None else firsts[row])
                skipped = {}
    if whole and not found and keep != VALIDATION:
        raise no_document(index, source)


def no_document(index: int, source: SourceSpec) -> ValueError:
    return ValueError(
        f"source {index} ({source.files[0].path}...) has no usable document (all "
        "records were skipped or held out for validation). Fix: check data.sources "
        "and data.val_share."
    )


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
