"""From the data section of a config to the stream the DataFeeder reads, and the
tokenizer trained on it (by `raytron train` when none is given, or by
`raytron tokenizer train` once for a team)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from tokenizers import Tokenizer
from tqdm import tqdm

from raytron.pipelines.stream import StreamSpec, source_spec, tokenizer_sample
from raytron.pipelines.tokenizer import bos_id, eos_id, train_bpe
from raytron.platform.config.resolve import packs_samples
from raytron.platform.config.schema import RaytronConfig
from raytron.platform.control.placement import with_tokenizer_workers
from raytron.platform.storage.run_dir import absolute


def stream_spec(config: RaytronConfig, tokenizer: Tokenizer | None = None) -> StreamSpec:
    """The stream of `config`'s sources; `data.tokenizer_workers=auto`, when the controller
    has not resolved it against the cluster, counts this machine's free CPUs."""
    d = with_tokenizer_workers(config, []).data
    max_bytes = d.max_document_mb * 2**20
    return StreamSpec(
        sources=[source_spec(s, max_bytes) for s in d.sources],
        tokenizer_json=tokenizer.to_str() if tokenizer else "",
        eos=eos_id(tokenizer) if tokenizer else -1,
        add_bos=d.bos,
        seed=config.train.seed,
        val_share=d.val_share,
        tokenizer_workers=d.tokenizer_workers,
        validation=[source_spec(s, max_bytes) for s in d.validation_sources],
        shuffle_window=d.shuffle_window,
        samples=packs_samples(d),
        document_mask=d.document_mask,
        truncate=d.overlong == "truncate",
        cache=absolute(d.cache) if d.cache else None,  # actors run in other directories
    )


def with_tokenizer(spec: StreamSpec, tokenizer: Tokenizer) -> StreamSpec:
    """`spec` encoding with `tokenizer`: EOS after every document, BOS before it when
    `data.bos` asked for one."""
    bos = bos_id(tokenizer) if spec.add_bos else None
    return dataclasses.replace(spec, tokenizer_json=tokenizer.to_str(), eos=eos_id(tokenizer),
                               bos=bos)


def train_tokenizer(config: RaytronConfig, spec: StreamSpec,
                    show_progress: bool = True) -> Tokenizer:
    """A byte-level BPE of `data.vocab_size` tokens on up to `data.tokenizer_sample_mb`
    of the training documents, each source contributing its weight's share."""
    budget = config.data.tokenizer_sample_mb * 2**20
    texts = tokenizer_sample(spec, budget)
    if show_progress:
        texts = counted(texts, tqdm(total=budget, unit="B", unit_scale=True,
                                    desc="reading the corpus (up to data.tokenizer_sample_mb)"))
    return train_bpe(texts, config.data.vocab_size, show_progress=show_progress)


def counted(texts: Iterator[str], bar: tqdm) -> Iterator[str]:
    with bar:
        for text in texts:
            bar.update(len(text.encode("utf-8")))
            yield text
