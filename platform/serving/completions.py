"""One HTTP request's completions, decoded by the replica's engine among everyone else's.

The engine steps in a process of its own; what it says of a request (text as it becomes
final, the scores of tokens, the end) reaches the request's handler on the event loop
through an asyncio queue, so that handlers never run model code. A handler that stops
listening (its client left, its time ran out) cancels its sequences, which leave the
batch at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from raytron.model.engine import ERROR, Scored
from raytron.platform.serving.engine_process import EngineProcess
from raytron.platform.serving.requests import Job


@dataclass
class Finished:
    """A completion as it ended."""

    text: str
    tokens: list[int]
    prompt_ids: list[int]
    finish_reason: str
    error: str | None = None
    scores: list[Scored] = field(default_factory=list)  # of its tokens (logprobs)
    prompt_scores: list[Scored | None] = field(default_factory=list)  # of its prompt (echo)
    first_token_s: float | None = None  # from submission
    token_gaps_s: list[float] = field(default_factory=list)  # between its tokens


def prompt_logprobs(echo: bool, logprobs: int | None, job: Job) -> int | None:
    """Score the prompt when it is echoed with logprobs, or (scored with none) to echo
    it alone: max_tokens 0 generates nothing."""
    if echo and (logprobs is not None or job.max_tokens == 0):
        return logprobs or 0
    return None


class Completions:
    """Submits `jobs` (prompts as ids) to the replica's engine; `batches()` yields lists
    of ("text", index, text) as each completion's text becomes final and ("end", index,
    Finished) as each ends."""

    def __init__(self, engine: EngineProcess, jobs: Sequence[Job],
                 prompts: Sequence[list[int]], logprobs: int | None = None,
                 echo: bool = False, adapter: str | None = None):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine, self.jobs, self.prompts = engine, jobs, prompts
        self.ended: set[int] = set()
        self.number = engine.submit(list(jobs), list(prompts), logprobs, echo, self.queue,
                                    adapter)

    async def batches(self, deadline: float) -> AsyncIterator[list[tuple]]:
        """Until every completion ended, what has come since the last batch (at least
        one item): a stream sends it at once, in one message, rather than a message a
        token. TimeoutError at `deadline` (perf_counter)."""
        while len(self.ended) < len(self.jobs):
            batch = [await asyncio.wait_for(self.queue.get(), deadline - time.perf_counter())]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [item for got in batch for item in self.ends_of_failure(got)]
            self.ended.update(index for kind, index, _ in batch if kind == "end")
            yield batch

    def ends_of_failure(self, item: tuple) -> list[tuple]:
        """The item; for the engine's end, an end with its error for each completion."""
        if item[0] != "failed":
            return [item]
        return [("end", index, Finished("", [], list(self.prompts[index]), ERROR, item[2]))
                for index in range(len(self.jobs)) if index not in self.ended]

    async def results(self, deadline: float) -> list[Finished]:
        finished: list[Finished | None] = [None] * len(self.jobs)
        async for batch in self.batches(deadline):
            for kind, index, value in batch:
                if kind == "end":
                    finished[index] = value
        return finished

    def cancel(self) -> None:
        """Hear no more; the sequences not yet ended leave the engine at its next step."""
        self.engine.release(self.number, cancel=len(self.ended) < len(self.jobs))
