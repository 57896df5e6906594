"""`raytron eval`: token-weighted mean negative log-likelihood and perplexity of a model
over a corpus, read with training's source syntax and readers.

Each document is tokenized as training saw it (BOS first if the model was trained with
it, the end token last) and scored on its own. One longer than `seq_len` is scored with
a sliding window moving `stride` tokens at a time: every token is scored once, by the
window where it is first among the new ones, with up to `seq_len - stride` tokens of
context before it (transformers' "perplexity of fixed-length models").
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from raytron.model.gpt import GPT
from raytron.pipelines.sources import is_validation
from raytron.pipelines.stream import ALL, kept_records, source_spec
from raytron.platform.config.schema import ConfigError, SourceConfig
from raytron.platform.models.sources import ModelSource

ALL_DOCUMENTS, HELD_OUT = "all", "held-out"  # --split


@dataclass(frozen=True)
class Window:
    document: int
    begin: int  # inputs are tokens[begin:end], their targets tokens[begin + 1:end + 1]
    end: int
    first: int  # the first target scored here (targets before it were scored already)


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first target) of the windows scoring tokens 1..n_tokens-1 once each."""
    first, begin = 1, 0
    while first < n_tokens:
        end = min(begin + seq_len, n_tokens - 1)
        yield begin, end, first
        first, begin = end + 1, begin + stride


@dataclass
class EvalResult:
    name: str
    source: str
    data: list[str]
    split: str
    step: int | None
    seq_len: int
    stride: int
    documents: int
    tokens: int  # scored
    loss: float  # mean negative log-likelihood per token, in nats
    perplexity: float
    skipped: dict[str, int] = field(default_factory=dict)  # records, by reason

    def to_dict(self) -> dict:
        return asdict(self)


def read_documents(sources: Sequence[SourceConfig], source: ModelSource, split: str,
                   max_document_bytes: int) -> tuple[list[np.ndarray], dict[str, int]]:
    """Every document of the sources as training tokenized it, and the skipped records."""
    tokenizer = source.tokenizer
    if tokenizer is None:
        raise ConfigError([f"{source.path} has no tokenizer.json, which eval needs to read "
                           "text. Fix: save the tokenizer beside the model."])
    val_share = source.config.data.val_share if source.config else 0.0
    prefix = [] if source.bos_id is None else [source.bos_id]
    documents, skipped = [], {}
    files = [file for s in sources for file in source_spec(s, max_document_bytes).files]
    for file in tqdm(files, desc="reading", unit="file",
                     disable=True if len(files) < 2 else None):  # None: only in a terminal
        texts = []
        for _, text, reason in kept_records(file, 0, ALL, 0.0):
            if text is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            elif split == ALL_DOCUMENTS or is_validation(text, val_share):
                texts.append(text)
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            documents.append(np.array(prefix + encoding.ids + source.end_ids[:1], np.int64))
    return documents, skipped


@torch.inference_mode()
def score(model: GPT, documents: Sequence[np.ndarray], seq_len: int, stride: int,
          batch: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) over the documents."""
    device = next(model.parameters()).device
    spans = [Window(d, *w) for d, doc in enumerate(documents)
             for w in windows(len(doc), seq_len, stride)]
    total, count = 0.0, 0
    bar = tqdm(total=sum(len(doc) - 1 for doc in documents if len(doc) > 1), unit="tok",
               unit_scale=True, desc="scoring", dynamic_ncols=True,
               disable=None)  # no bar when output is no terminal
    for start in range(0, len(spans), batch):
        group = spans[start : start + batch]
        width = max(w.end - w.begin for w in group)
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)  # -100: not scored
        for row, w in enumerate(group):
            tokens = torch.from_numpy(documents[w.document][w.begin : w.end + 1])
            inputs[row, : w.end - w.begin] = tokens[:-1]
            scored = slice(w.first - w.begin - 1, w.end - w.begin)
            targets[row, scored] = tokens[1:][scored]
        logits = model(inputs.to(device)).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(),
                              ignore_index=-100, reduction="sum")
        scored_now = int((targets != -100).sum())
        total, count = total + nll.item(), count + scored_now
        bar.update(scored_now)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    bar.close()
    return total, count


def evaluate(model: GPT, source: ModelSource, sources: Sequence[SourceConfig], name: str,
             seq_len: int, stride: int, batch: int, split: str,
             max_document_bytes: int = 64 * 2**20) -> EvalResult:
    documents, skipped = read_documents(sources, source, split, max_document_bytes)
    total, count = score(model, documents, seq_len, stride, batch)
    if count == 0:
        raise ConfigError([f"--data holds no document to score ({len(documents)} read, "
                           f"skipped: {skipped or 'none'}). Fix: check the paths"
                           f"{' and --split' if split == HELD_OUT else ''}."])
    loss = total / count
    return EvalResult(name, source.describe(), [s.path for s in sources], split, source.step,
                      seq_len, stride, len(documents), count, loss, math.exp(loss), skipped)


def default_name(sources: Sequence[SourceConfig]) -> str:
    """A metric-safe name for the data: the first source's file or folder name."""
    path = sources[0].path.rstrip("/")
    stem = re.split(r"[/:]", path)[-1].split(".")[0] or "data"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def result_metrics(result: EvalResult) -> dict[str, float]:
    return {f"eval/{result.name}/{key}": float(value)
            for key, value in (("loss", result.loss), ("perplexity", result.perplexity),
                               ("tokens", result.tokens))}


def log_to_mlflow(metrics: dict[str, float], step: int | None, uri: str, run_id: str,
                  json_file: Path) -> None:
    """`metrics` at the checkpoint's step, and the result's JSON as an artifact."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from raytron.platform.storage.tracking import quiet_mlflow

    quiet_mlflow()
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(name, value, now, step or 0)
                                      for name, value in metrics.items()])
    client.log_artifact(run_id, str(json_file), artifact_path="eval")
