"""How likely a model finds a continuation of a context: the log-probability of its
tokens, and whether greedy decoding would have produced exactly them. What evaluation
harnesses ask of a model for multiple-choice and cloze tasks (lm-evaluation-harness's
`loglikelihood`), and for the perplexity of a whole text (`loglikelihood_rolling`).

Plain PyTorch: a forward pass over each batch of sequences, the longest first (so that
each batch pads little, and the first shows at once whether memory suffices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raytron.model.gpt import GPT


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # the continuation's tokens, summed
    greedy: bool  # each of them the most likely at its position


def continuation_scores(model: GPT, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 8,
                        on_batch: Callable[[int], None] | None = None,
                        max_length: int | None = None) -> list[ContinuationScore]:
    """For each (context ids, continuation ids), with a context of at least one token,
    the continuation's score. A pair longer than `max_length` (default and at most: the
    model's context) keeps its last `max_length + 1` tokens, the context cut from the
    left. `on_batch(n)` after each batch of n pairs (a progress bar)."""
    limit = min(max_length or model.shape.max_seq_len, model.shape.max_seq_len)
    rows = scored_rows(pairs, limit)
    order = sorted(range(len(rows)), key=lambda index: -len(rows[index]))
    scores: list[ContinuationScore | None] = [None] * len(rows)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        chosen = [rows[i] for i in batch]
        with torch.inference_mode():
            logits = model(padded_inputs(chosen, max(len(row) for row in chosen) - 1)
                           .to(device))
        for index, score in zip(batch, row_scores(logits, chosen,
                                                  [len(pairs[i][1]) for i in batch]),
                                strict=True):
            scores[index] = score
        if on_batch is not None:
            on_batch(len(batch))
    return scores


def scored_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], limit: int
                ) -> list[list[int]]:
    """Each pair as one row of ids, its last `limit + 1` at most; a ValueError for a pair
    without a context or a continuation, or a continuation that does not fit."""
    rows = []
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("a context and a continuation of at least one token each")
        if len(continuation) > limit:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"model's context of {limit}")
        rows.append((list(context) + list(continuation))[-(limit + 1):])
    return rows


def padded_inputs(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """The inputs of `rows` (all but each row's last id), padded on the right to `width`
    (causal attention keeps the padding out of every real position)."""
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        inputs[index, : len(row) - 1] = torch.tensor(row[:-1])
    return inputs


def row_scores(logits: torch.Tensor, rows: Sequence[Sequence[int]],
               continuations: Sequence[int]) -> list[ContinuationScore]:
    """The scores of `rows` (each ending with a continuation of the given length) from
    the logits of their `padded_inputs` (any rows past `rows` are ignored)."""
    scores = []
    for index, (row, length) in enumerate(zip(rows, continuations, strict=True)):
        end = len(row) - 1  # the inputs' length: position end - 1 predicts the last token
        logprobs = logits[index, end - length : end].float().log_softmax(dim=-1)
        targets = torch.tensor(row[-length:], device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None]).sum()
        greedy = bool((logprobs.argmax(-1) == targets).all())
        scores.append(ContinuationScore(float(chosen), greedy))
    return scores
