"""Choosing the next token from the logits: greedy, or sampled with temperature, top-k
and top-p (nucleus), applied in that order as `transformers` does; penalties for the
tokens a sequence has generated come first."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the most likely tokens whose probabilities sum to p
    greedy: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted from each generated token's logit
    frequency_penalty: float = 0.0  # OpenAI's: ... times the times it was generated
    repetition_penalty: float = 1.0  # CTRL's (transformers', vLLM's): > 1 discourages repeats

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be more than 0, not "
                             f"{self.repetition_penalty}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, not {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be 1 or more, not {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be more than 0 and at most 1, not {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def penalizes(self) -> bool:
        return (self.presence_penalty, self.frequency_penalty,
                self.repetition_penalty) != (0, 0, 1)


def penalized(logits: torch.Tensor, counts: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(batch, vocab) logits with the penalties for `counts`, the times each row generated
    each token: a seen token's logit is divided by the repetition penalty (multiplied when
    negative, as CTRL and `transformers` do), then OpenAI's `logit - count * frequency -
    (count > 0) * presence`."""
    logits, seen = logits.float(), counts > 0
    if sampling.repetition_penalty != 1:
        scaled = torch.where(logits < 0, logits * sampling.repetition_penalty,
                             logits / sampling.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    return logits - counts * sampling.frequency_penalty - seen * sampling.presence_penalty


def next_tokens(logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) token ids from (batch, vocab) logits."""
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ascending, order = logits.sort(dim=-1)
        tail = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        tail[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
