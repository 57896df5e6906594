"""Train once: a BPE tokenizer trained on a corpus sample is kept beside the token cache
(`data.cache`) and taken by every later run whose sample would be the same, so that a
new run on a known corpus does not spend seconds (minutes, on a large sample) training
the tokenizer it already has.

Training is deterministic (the same texts give the same tokenizer, which resumes and
comparisons between runs already rely on), so the name of a kept tokenizer is a hash of
all that decides its texts and vocabulary: each source's files with their versions (size
and modification time, or an embedded corpus's content hash), weights, the held-out
share, the chat template, the sample's size, the vocabulary size, and the versions of
`tokenizers` and of this format. A file without a version is never cached. A kept
tokenizer is JSON parsed by `tokenizers`, never unpickled; one that does not parse is
trained again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import tokenizers
from tokenizers import Tokenizer

from raytron.pipelines.sources import filesystem_and_path
from raytron.pipelines.stream import StreamSpec
from raytron.pipelines.token_cache import write_whole

FORMAT = 1  # bumped when how a tokenizer is trained changes
FOLDER = "tokenizers"
MAX_BYTES = 64 * 2**20  # a kept tokenizer larger than this is not read

log = logging.getLogger(__name__)


def sample_key(spec: StreamSpec, vocab_size: int, max_bytes: int) -> str | None:
    """The hash naming the tokenizer trained on `spec`'s sample; None when a file has no
    version (its content could change unseen) or there is no cache."""
    files = [file for source in spec.sources for file in source.files]
    if spec.cache is None or not all(file.version for file in files):
        return None
    what = {"format": FORMAT, "tokenizers": tokenizers.__version__,
            "python": sys.version_info[:2],  # an embedded corpus is its Python's
            "sources": [dataclasses.asdict(source) for source in spec.sources],
            "weights": spec.weights(), "val_share": spec.val_share,
            "keep": spec.training_keeps, "template": dataclasses.asdict(spec.chat_template),
            "max_bytes": max_bytes, "vocab_size": vocab_size}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def kept_path(cache: str, key: str) -> str:
    return f"{cache.rstrip('/')}/{FOLDER}/{key[:32]}.json"


def kept_tokenizer(cache: str, key: str) -> Tokenizer | None:
    """The tokenizer kept under `key`; None when there is none or it cannot be read."""
    try:
        filesystem, inner = filesystem_and_path(kept_path(cache, key))
        info = filesystem.get_file_info(inner)
        if info.type != pafs.FileType.File or info.size > MAX_BYTES:
            return None
        with filesystem.open_input_file(inner) as stream:
            text = stream.read().decode()
    except (OSError, ValueError) as error:
        log.warning("cannot read the kept tokenizer %s (%s); training one", key, error)
        return None
    try:
        return Tokenizer.from_str(text)
    except Exception as error:  # noqa: BLE001 (tokenizers raises a plain Exception)
        log.warning("the kept tokenizer %s does not parse (%s); training one", key, error)
        return None


def keep_tokenizer(cache: str, key: str, tokenizer: Tokenizer) -> None:
    """Keep `tokenizer` under `key`; a failure is logged, never raised: it only saves
    work."""
    try:
        write_whole(kept_path(cache, key), pa.py_buffer(tokenizer.to_str().encode()))
    except (OSError, ValueError) as error:
        log.warning("cannot keep the tokenizer in %s (%s)", cache, error)
