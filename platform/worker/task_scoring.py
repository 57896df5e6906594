"""Scoring `train.eval_tasks`' requests on the weights the workers train, in the
training layout and with no second copy of the model: each data-parallel replica scores
its share of the (context, continuation) pairs, the tensor- and context-parallel ranks
of a replica together, through the pipeline stages. Every replica runs the same number
of forward passes (FSDP gathers parameters in each), of the training shape (micro_batch
rows of data.seq_len tokens, so that sequence and context parallelism split them and a
compiled model meets no new shape). The scores are summed over the ranks: each pair is scored by one
rank (tensor and context rank 0 of the last stage of its replica) and every rank ends
with all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from raytron.model.scoring import continuation_positions, padded, row_scores, scored_rows
from raytron.platform.worker.trainer import Sequences, Trainer


def score_in_layout(trainer: Trainer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                    ) -> list[tuple[float, bool]]:
    """(log-probability, greedy) of each pair's continuation, on every rank (collective:
    every rank of the group calls it with the same pairs)."""
    layout, micro = trainer.layout, trainer.config.train.micro_batch
    width = trainer.config.data.seq_len
    rows = scored_rows(pairs, width)
    lengths = [len(continuation) for _, continuation in pairs]
    per_replica = max(1, math.ceil(len(rows) / layout.dp))
    share = math.ceil(per_replica / micro) * micro  # whole micro-batches
    first = trainer.coordinates["dp"] * share
    scorer = trainer.last and trainer.coordinates["tp"] == trainer.coordinates["cp"] == 0
    results = torch.zeros(len(rows), 2, dtype=torch.float64, device=trainer.device)
    with trainer.evaluating():
        for start in range(first, first + share, micro):
            chunk = rows[start : start + micro]
            filler = [[]] * (micro - len(chunk))  # rows past the pairs: never read
            inputs = padded([row[:-1] for row in chunk] + filler, width).to(trainer.device)
            with trainer.context():
                logits = trainer.whole_logits(Sequences(inputs, inputs, None, 1))
            if logits is None:
                continue
            if scorer and chunk:
                scored = lengths[start : start + len(chunk)]
                at = continuation_positions(chunk, scored).to(logits.device)
                scores = row_scores(logits[torch.arange(len(chunk), device=logits.device)[:, None],
                                           at], chunk, scored)
                results[start : start + len(chunk)] = torch.tensor(
                    [(score.logprob, float(score.greedy)) for score in scores],
                    dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(results)
    return [(logprob, greedy > 0.5) for logprob, greedy in results.tolist()]
