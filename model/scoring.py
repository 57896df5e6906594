"""How likely a model finds a continuation of a context: the log-probability of its
tokens, and whether greedy decoding would have produced exactly them. What evaluation
harnesses ask of a model for multiple-choice and cloze tasks (lm-evaluation-harness's
`loglikelihood`), and for the perplexity of a whole text (`loglikelihood_rolling`).

Plain PyTorch: a forward pass over each batch of sequences, the longest first (so that
each batch pads little, and the first shows at once whether memory suffices); where the
choices of a question share a context longer than they are, a forward over the contexts
into a KV cache and one over the choices reading it: the context is computed once, not
once per choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raytron.model.gpt import GPT
from raytron.model.kv_cache import KVCache


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
    left. Choices of one question whose context is longer than they are (a paragraph and
    the words that may end it) are scored together: the context once, into a KV cache
    each choice reads. Batches hold about `batch_size` pairs, the longest first;
    `on_batch(n)` after each batch of n pairs (a progress bar)."""
    limit = min(max_length or model.shape.max_seq_len, model.shape.max_seq_len)
    rows = scored_rows(pairs, limit)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (row, (_, continuation)) in enumerate(zip(rows, pairs, strict=True)):
        groups.setdefault(tuple(row[: len(row) - len(continuation)]), []).append(index)

    def longest(members: list[int]) -> int:
        return max(len(pairs[i][1]) for i in members)

    def shares(context: tuple[int, ...], members: list[int]) -> bool:
        return len(members) > 1 and len(context) > longest(members)

    shared = sorted(((context, members) for context, members in groups.items()
                     if shares(context, members)), key=lambda group: -len(group[0]))
    alone = sorted((i for context, members in groups.items() if not shares(context, members)
                    for i in members), key=lambda i: -len(rows[i]))
    scores: list[ContinuationScore | None] = [None] * len(rows)
    device = next(model.parameters()).device
    for start in range(0, len(alone), batch_size):
        batch = alone[start : start + batch_size]
        chosen = [rows[i] for i in batch]
        lengths = [len(pairs[i][1]) for i in batch]
        with torch.inference_mode():
            logits = model(padded([row[:-1] for row in chosen],
                                  max(len(row) for row in chosen) - 1).to(device),
                           logits_at=continuation_positions(chosen, lengths).to(device))
        for index, score in zip(batch, row_scores(logits, chosen, lengths), strict=True):
            scores[index] = score
        if on_batch is not None:
            on_batch(len(batch))
    for batch in batches_of_groups(shared, batch_size, longest, limit):
        indices = [index for _, members in batch for index in members]
        for index, score in zip(indices, shared_context_scores(
                model, [list(context) for context, _ in batch],
                [[list(pairs[i][1]) for i in members] for _, members in batch]),
                strict=True):
            scores[index] = score
        if on_batch is not None:
            on_batch(len(indices))
    return scores


def batches_of_groups(groups: list[tuple[tuple[int, ...], list[int]]], size: int,
                      longest: Callable[[list[int]], int], limit: int) -> list[list]:
    """Consecutive (context, members) groups, about `size` members a batch (a larger
    group alone), none longer than `limit` positions: the longest context and the
    longest continuation (`longest(members)`) of a batch, but one token, fit it."""
    batches: list[list] = []
    for group in groups:
        batch = batches[-1] if batches else []
        members = sum(len(g[1]) for g in batch) + len(group[1])
        span = max(len(g[0]) for g in [*batch, group]) + \
            max(longest(g[1]) for g in [*batch, group]) - 1
        if batch and members <= size and span <= limit:
            batch.append(group)
        else:
            batches.append([group])
    return batches


@torch.inference_mode()
def shared_context_scores(model: GPT, contexts: list[list[int]],
                          continuations: list[list[list[int]]]) -> list[ContinuationScore]:
    """The scores of each context's continuations, in order: the contexts in one padded
    forward into a KV cache (their last logits predict each continuation's first token),
    the cache copied for each continuation, then every continuation but its last token
    in one forward over it."""
    shape, parameter = model.shape, next(model.parameters())
    device = parameter.device
    flat = [continuation for group in continuations for continuation in group]
    owners = [owner for owner, group in enumerate(continuations) for _ in group]
    lengths = [len(context) for context in contexts]
    width = max(lengths)
    rest = max(len(continuation) for continuation in flat) - 1
    cache = KVCache(len(contexts), width + rest, shape.n_layers,
                    shape.n_kv_heads or shape.n_heads, shape.head_dim, parameter.dtype, device)
    firsts = model(padded(contexts, width).to(device), cache,
                   logits_at=torch.tensor(lengths, device=device) - 1)[:, 0]
    cache.set_lengths(lengths)
    cache.keep(owners)
    following = model(padded([c[:-1] for c in flat], rest).to(device), cache) if rest else None
    scores = []
    for row, (owner, continuation) in enumerate(zip(owners, flat, strict=True)):
        logits = firsts[owner][None] if following is None else \
            torch.cat([firsts[owner][None], following[row, : len(continuation) - 1]])
        scores.append(score_of(logits, continuation))
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


def padded(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Rows of ids padded on the right to `width` (causal attention keeps the padding out
    of every real position)."""
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        inputs[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return inputs


def continuation_positions(rows: Sequence[Sequence[int]], continuations: Sequence[int]
                           ) -> torch.Tensor:
    """(rows, longest continuation): the input positions whose logits predict each row's
    continuation (of the given length), first to last, the last repeated to fill the
    row. The model's inputs are each row but its last id: position len(row) - 2 predicts
    the last token."""
    width = max(continuations)
    return torch.tensor([[len(row) - 1 - length + min(j, length - 1) for j in range(width)]
                         for row, length in zip(rows, continuations, strict=True)])


def row_scores(logits: torch.Tensor, rows: Sequence[Sequence[int]],
               continuations: Sequence[int]) -> list[ContinuationScore]:
    """The scores of `rows` (each ending with a continuation of the given length) from
    the logits at their `continuation_positions` (any rows past `rows` are ignored)."""
    return [score_of(logits[index, :length], row[-length:])
            for index, (row, length) in enumerate(zip(rows, continuations, strict=True))]


def score_of(logits: torch.Tensor, continuation: Sequence[int]) -> ContinuationScore:
    """A continuation's score from the logits (its length, vocab) that predict it."""
    logprobs = logits.float().log_softmax(dim=-1)
    targets = torch.tensor(continuation, device=logprobs.device)
    chosen = logprobs.gather(-1, targets[:, None]).sum()
    greedy = bool((logprobs.argmax(-1) == targets).all())
    return ContinuationScore(float(chosen), greedy)
