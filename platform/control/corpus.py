"""From the data section of a config to the stream the DataFeeder reads, and the
tokenizer trained on it (by `raytron train` when none is given, or by
`raytron tokenizer train` once for a team)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from tokenizers import Tokenizer
from tqdm import tqdm

from raytron.pipelines.sources import (
    CorpusFile,
    Listing,
    file_format,
    list_source,
    parquet_schema,
)
from raytron.pipelines.stream import SourceSpec, StreamSpec, source_spec, tokenizer_sample
from raytron.pipelines.tokenizer import bos_id, eos_id, train_bpe
from raytron.platform.config.redact import redact_text
from raytron.platform.config.resolve import packs_samples
from raytron.platform.config.schema import ConfigError, DataConfig, RaytronConfig
from raytron.platform.control.placement import with_tokenizer_workers
from raytron.platform.storage.run_dir import absolute

PARQUET_READERS = 8  # Parquet footers read at once (on object storage, a request or two)
FILES_NAMED = 3  # files named in a problem of a source; the others counted


def stream_spec(config: RaytronConfig, tokenizer: Tokenizer | None = None) -> StreamSpec:
    """The stream of `config`'s sources; `data.tokenizer_workers=auto`, when the controller
    has not resolved it against the cluster, counts this machine's free CPUs. Raises
    `ConfigError` for a Parquet file without the columns its source reads (see
    `parquet_problems`); prints what listing the sources passed over (`report_skipped`)."""
    d = with_tokenizer_workers(config, []).data
    max_bytes = d.max_document_mb * 2**20
    listings = {group: [list_source(s.path) for s in getattr(d, group)]
                for group in ("sources", "validation_sources")}
    sources, validation = ([source_spec(s, max_bytes, listing.files)
                            for s, listing in zip(getattr(d, group), listings[group],
                                                  strict=True)]
                           for group in ("sources", "validation_sources"))
    report_skipped(d, listings)
    problems = parquet_problems("sources", sources)
    problems += parquet_problems("validation_sources", validation)
    if problems:
        raise ConfigError(problems)
    return StreamSpec(
        sources=sources,
        tokenizer_json=tokenizer.to_str() if tokenizer else "",
        eos=eos_id(tokenizer) if tokenizer else -1,
        add_bos=d.bos,
        seed=config.train.seed,
        val_share=d.val_share,
        tokenizer_workers=d.tokenizer_workers,
        validation=validation,
        shuffle_window=d.shuffle_window,
        samples=packs_samples(d),
        document_mask=d.document_mask,
        truncate=d.overlong == "truncate",
        cache=absolute(d.cache) if d.cache else None,  # actors run in other directories
    )


def report_skipped(data: DataConfig, listings: dict[str, list[Listing]]) -> None:
    """Prints, once per source, the paths its listing passed over (hidden paths, symlink
    loops, ...), to stderr: `raytron config` prints YAML on stdout."""
    for group in ("sources", "validation_sources"):
        for index, (source, listing) in enumerate(zip(getattr(data, group), listings[group],
                                                      strict=True)):
            if summary := listing.summary():
                print(redact_text(f"data.{group}.{index} ({source.path}): {summary}"),
                      file=sys.stderr)


def parquet_problems(group: str, sources: list[SourceSpec]) -> list[str]:
    """Parquet files of `data.<group>` without a column their source reads records from
    (text_field, or the fine-tuning fields), found from the files' footers before the run
    takes anything: reading them would only skip every row."""
    files = [(index, file) for index, source in enumerate(sources) for file in source.files
             if file_format(file.path, file.format) == "parquet"]
    with ThreadPoolExecutor(PARQUET_READERS) as pool:
        schemas = list(pool.map(parquet_schema, [file for _, file in files]))
    lacking: dict[int, list[str]] = {}
    for (index, file), schema in zip(files, schemas, strict=True):
        if schema is not None and (problem := missing_columns(f"data.{group}.{index}", file,
                                                               schema)):
            lacking.setdefault(index, []).append(problem)
    problems = []
    for index, found in lacking.items():
        problems += found[:FILES_NAMED]
        if len(found) > FILES_NAMED:
            problems.append(f"data.{group}.{index}: {len(found) - FILES_NAMED} more Parquet "
                            "files lack their columns. Fix: as above.")
    return problems


def missing_columns(key: str, file: CorpusFile, schema: pa.Schema) -> str:
    """What `file` lacks, its columns and the fix; empty when it has every column."""
    missing = [(f"{key}.{field}", name) for field, name in zip(file.field_keys, file.fields,
                                                                 strict=True)
               if name not in schema.names]
    if not missing:
        return ""
    lacks = " nor ".join(f"'{name}' ({field})" for field, name in missing)
    fields = " and ".join(field for field, _ in missing)
    return redact_text(
        f"{key}: the Parquet file '{file.path}' has no column {lacks}; its columns are "
        f"{', '.join(schema.names) or 'none'}. Fix: set {fields} to the column that holds "
        "them, or leave the file out of the source.")


def with_tokenizer(spec: StreamSpec, tokenizer: Tokenizer) -> StreamSpec:
    """`spec` encoding with `tokenizer`: EOS after every document, BOS before it when
    `data.bos` asked for one."""
    bos = bos_id(tokenizer) if spec.add_bos else None
    return dataclasses.replace(spec, tokenizer_json=tokenizer.to_str(), eos=eos_id(tokenizer),
                               bos=bos)


def train_tokenizer(config: RaytronConfig, spec: StreamSpec,
                    show_progress: bool = True) -> Tokenizer:
    """A byte-level BPE of `data.vocab_size` tokens on up to `data.tokenizer_sample_mb`
    of the training documents, each source contributing its weight's share. The bar
    counts what is read (the budget is a cap, not the work: no total); the tokenizers
    library's own bars stay off."""
    texts = tokenizer_sample(spec, sample_bytes(config))
    if show_progress:
        texts = counted(texts, tqdm(unit="B", unit_scale=True, desc="reading the corpus",
                                    disable=None))  # no bar when output is no terminal
    return train_bpe(texts, config.data.vocab_size, show_progress=False)


def sample_bytes(config: RaytronConfig) -> int:
    """The most corpus bytes a tokenizer is trained on."""
    return config.data.tokenizer_sample_mb * 2**20


def counted(texts: Iterator[str], bar: tqdm) -> Iterator[str]:
    with bar:
        for text in texts:
            bar.update(len(text.encode("utf-8")))
            yield text
