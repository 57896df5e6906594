"""One HTTP request's completions, decoded by the replica's engine among everyone else's.

The engine steps in a thread of its own; what it says of a request (text as it becomes
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

from raytron.model.engine import Engine, Event, Request, Scored
from raytron.model.generate import TextGenerator, TextStream
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


@dataclass
class Heard:
    """What the engine said of one completion so far (written by the engine's thread,
    read once its end is on the queue)."""

    tokens: list[int] = field(default_factory=list)
    scores: list[Scored] = field(default_factory=list)
    prompt: list[Scored | None] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def prompt_logprobs(echo: bool, logprobs: int | None, job: Job) -> int | None:
    """Score the prompt when it is echoed with logprobs, or (scored with none) to echo
    it alone: max_tokens 0 generates nothing."""
    if echo and (logprobs is not None or job.max_tokens == 0):
        return logprobs or 0
    return None


class Completions:
    """Submits `jobs` (prompts as ids) to `engine`; `batches()` yields lists of ("text",
    index, text) as each completion's text becomes final and ("end", index, Finished) as
    each ends."""

    def __init__(self, engine: Engine, generator: TextGenerator, jobs: Sequence[Job],
                 prompts: Sequence[list[int]], logprobs: int | None = None,
                 echo: bool = False):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine, self.prompts = engine, prompts
        self.stream = TextStream(generator.tokenizer, jobs[0].stop if jobs else (),
                                 self.text)
        self.heard = [Heard() for _ in jobs]
        self.requests: list[Request] = []
        self.ended = 0
        try:
            for index, (job, prompt) in enumerate(zip(jobs, prompts, strict=True)):
                self.requests.append(engine.submit(
                    prompt, job.max_tokens, job.sampling, self.listener(index), job.seed,
                    self.stops(index), logprobs, prompt_logprobs(echo, logprobs, job)))
        except Exception:
            self.cancel()
            raise

    def stops(self, index: int):
        return lambda ids: self.stream.on_token(index, ids)

    def text(self, index: int, text: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("text", index, text))

    def listener(self, index: int):
        heard, started = self.heard[index], time.perf_counter()

        def hear(event: Event) -> None:
            if event.prompt is not None:
                heard.prompt = list(event.prompt)
            elif event.token is not None:
                heard.tokens.append(event.token)
                heard.times.append(time.perf_counter())
                if event.scored is not None:
                    heard.scores.append(event.scored)
            else:
                text = self.stream.finish(index, heard.tokens)
                gaps = [b - a for a, b in zip(heard.times, heard.times[1:], strict=False)]
                finished = Finished(text, heard.tokens, list(self.prompts[index]),
                                    event.finish_reason, event.error, heard.scores,
                                    heard.prompt, heard.times[0] - started if heard.times
                                    else None, gaps)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ("end", index, finished))

        return hear

    async def batches(self, deadline: float) -> AsyncIterator[list[tuple]]:
        """Until every completion ended, what has come since the last batch (at least
        one item): a stream sends it at once, in one message, rather than a message a
        token. TimeoutError at `deadline` (perf_counter)."""
        while self.ended < len(self.requests):
            batch = [await asyncio.wait_for(self.queue.get(), deadline - time.perf_counter())]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.ended += sum(item[0] == "end" for item in batch)
            yield batch

    async def results(self, deadline: float) -> list[Finished]:
        finished: list[Finished | None] = [None] * len(self.requests)
        async for batch in self.batches(deadline):
            for kind, index, value in batch:
                if kind == "end":
                    finished[index] = value
        return finished

    def cancel(self) -> None:
        """The sequences not yet ended leave the engine at its next step."""
        for request in self.requests:
            if request.finish_reason is None:
                self.engine.cancel(request)
