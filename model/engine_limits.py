"""What an engine may hold at once (slots, positions, tokens per step, waiting requests),
without torch: the serve command's options and checks read them before a model loads."""

from __future__ import annotations

from dataclasses import dataclass

from raytron.model.spec import GPTShape


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int = 16  # slots: sequences decoded together
    max_model_len: int | None = None  # positions per slot, prompt and output (None: the
    # model's context)
    token_budget: int = 512  # tokens a step computes: a token per decoding sequence, the
    # rest prefill chunks
    max_waiting: int = 256  # requests waiting for a slot; beyond, `submit` raises QueueFull

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be 1 or more, not {self.max_num_seqs}")
        if self.token_budget <= self.max_num_seqs:
            raise ValueError(f"token_budget ({self.token_budget}) must exceed max_num_seqs "
                             f"({self.max_num_seqs}): with every slot decoding, a step "
                             "must still prefill")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be 2 or more, not {self.max_model_len}")

    def positions(self, shape: GPTShape) -> int:
        """Positions per slot: `max_model_len`, never beyond the model's context."""
        return min(self.max_model_len or shape.max_seq_len, shape.max_seq_len)


DEFAULT_LIMITS = EngineLimits()
