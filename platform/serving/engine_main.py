"""The process a replica's engine runs in: `python -m raytron.platform.serving.engine_main FD`.

Its own process, so that the decode loop holds a GIL of its own: in the replica, every
step's few hundred small torch calls took turns on one GIL with the event loop and
Serve's threads, and each side waited on the other's switch interval. Here the model
loads and steps; each completion's text is decoded as its tokens come (stop strings end
it at once); and after every step what it produced goes back in one message, with the
engine's state. The replica's `EngineProcess` is the other end of the socket FD; when it
closes (the replica stopped or died), this process ends.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from raytron.model.adapter_bank import AdapterBank
from raytron.model.engine import ERROR, Engine, EngineLimits, Event, Request, Scored
from raytron.model.generate import TextStream
from raytron.platform.serving.adapters import AdapterLibrary, AdapterSettings
from raytron.platform.serving.completions import Finished, prompt_logprobs
from raytron.platform.serving.requests import Job


class Outbox:
    """What the engine said since the last message: (id, kind, index, value) items, sent
    in one message with the engine's state."""

    def __init__(self, connection: Connection, engine: Engine):
        self.connection, self.engine = connection, engine
        self.items: list[tuple] = []
        self.lock = threading.Lock()  # the engine's thread and the listener's both send
        self.sent_state: dict[str, int] = {}

    def put(self, item: tuple) -> None:
        with self.lock:
            self.items.append(item)

    def flush(self) -> None:
        with self.lock:
            state = self.engine.state()
            if self.items or state != self.sent_state:
                self.connection.send(("out", self.items, state))
                self.items, self.sent_state = [], state


@dataclass
class Heard:
    """What the engine said of one completion so far."""

    tokens: list[int] = field(default_factory=list)
    scores: list[Scored] = field(default_factory=list)
    prompt: list[Scored | None] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class Decoding:
    """One HTTP request's completions in the engine: their text, as it becomes final, and
    each one's end go to the outbox under the request's id."""

    def __init__(self, number: int, jobs: Sequence[Job], prompts: Sequence[list[int]],
                 outbox: Outbox, tokenizer, on_done: Callable[[int], None]):
        self.number, self.jobs, self.prompts, self.outbox = number, jobs, prompts, outbox
        self.on_done, self.ended = on_done, 0
        self.stream = TextStream(tokenizer, jobs[0].stop if jobs else (), self.text)
        self.heard = [Heard() for _ in jobs]
        self.requests: list[Request] = []
        self.failure: str | None = None  # set: what failed its submission
        self.started = time.perf_counter()

    def submit(self, engine: Engine, logprobs: int | None, echo: bool,
               adapter: str | None = None, library: AdapterLibrary | None = None) -> None:
        """Every completion into the engine (with `adapter` of `library` on the base); one
        that cannot be submitted ends them all with its error (those submitted are
        cancelled)."""
        try:
            weights = None if adapter is None else library.adapter(adapter)
            for index, (job, prompt) in enumerate(zip(self.jobs, self.prompts, strict=True)):
                self.requests.append(engine.submit(
                    prompt, job.max_tokens, job.sampling, self.listener(index), job.seed,
                    self.stops(index), logprobs, prompt_logprobs(echo, logprobs, job),
                    weights))
        except Exception as error:  # noqa: BLE001 (QueueFull, a bad max_tokens: reported)
            self.failure = f"{type(error).__name__}: {error}"
            for index in range(len(self.requests), len(self.jobs)):
                self.end(index, ERROR, self.failure)
            self.cancel(engine)

    def cancel(self, engine: Engine) -> None:
        for request in self.requests:
            if request.finish_reason is None:
                engine.cancel(request)

    def stops(self, index: int):
        return lambda ids: self.stream.on_token(index, ids)

    def text(self, index: int, text: str) -> None:
        self.outbox.put((self.number, "text", index, text))

    def listener(self, index: int):
        heard = self.heard[index]

        def hear(event: Event) -> None:
            if event.prompt is not None:
                heard.prompt = list(event.prompt)
            elif event.token is not None:
                heard.tokens.append(event.token)
                heard.times.append(time.perf_counter())
                if event.scored is not None:
                    heard.scores.append(event.scored)
            elif self.failure is not None:
                self.end(index, ERROR, self.failure)
            else:
                if event.scored is not None:  # the end token: scored, not text
                    heard.scores.append(event.scored)
                self.end(index, event.finish_reason, event.error)

        return hear

    def end(self, index: int, reason: str, error: str | None) -> None:
        heard = self.heard[index]
        text = self.stream.finish(index, heard.tokens)
        gaps = [b - a for a, b in zip(heard.times, heard.times[1:], strict=False)]
        self.outbox.put((self.number, "end", index, Finished(
            text, heard.tokens, list(self.prompts[index]), reason, error, heard.scores,
            heard.prompt, heard.times[0] - self.started if heard.times else None, gaps)))
        self.ended += 1
        if self.ended == len(self.jobs):
            self.on_done(self.number)


class Listener:
    """Takes the replica's messages: ("submit", id, jobs, prompts, logprobs, echo,
    adapter) and ("cancel", id). Ends the engine when the replica's end closes."""

    def __init__(self, connection: Connection, engine: Engine, outbox: Outbox, tokenizer,
                 library: AdapterLibrary | None = None):
        self.connection, self.engine, self.outbox = connection, engine, outbox
        self.tokenizer, self.library = tokenizer, library
        self.decodings: dict[int, Decoding] = {}

    def listen(self) -> None:
        try:
            while True:
                message = self.connection.recv()
                if message[0] == "submit":
                    self.submit(*message[1:])
                else:
                    decoding = self.decodings.pop(message[1], None)
                    if decoding is not None:
                        decoding.cancel(self.engine)
        except (EOFError, OSError):
            self.engine.stop()

    def submit(self, number: int, jobs: list[Job], prompts: list[list[int]],
               logprobs: int | None, echo: bool, adapter: str | None) -> None:
        decoding = Decoding(number, jobs, prompts, self.outbox, self.tokenizer,
                            lambda done: self.decodings.pop(done, None))
        self.decodings[number] = decoding
        decoding.submit(self.engine, logprobs, echo, adapter, self.library)
        self.outbox.flush()  # a submission that failed says so now


def served_adapters(model, settings: AdapterSettings, source
                    ) -> tuple[AdapterBank | None, AdapterLibrary | None]:
    """The bank the adapters decode in, and where they are read from; Nones: none."""
    if not settings.enabled:
        return None, None
    return (AdapterBank(model, settings.max_adapters, settings.max_rank),
            AdapterLibrary(settings, source))


def main(argv: Sequence[str]) -> None:
    connection = Connection(int(argv[0]))
    source, device, limits, adapters = connection.recv()
    try:
        from raytron.platform.models.loading import load_model

        loaded = load_model(source, device=device)
        bank, library = served_adapters(loaded.model, adapters, source)
        engine = Engine(loaded.model, loaded.generator.end_ids, EngineLimits(**limits), bank)
    except Exception as error:  # noqa: BLE001 (the replica reports it)
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    outbox = Outbox(connection, engine)
    listener = Listener(connection, engine, outbox, loaded.tokenizer, library)
    connection.send(("ready", engine.state()))
    threading.Thread(target=listener.listen, name="raytron-engine-listener",
                     daemon=True).start()
    engine.serve_forever(after_step=outbox.flush)


if __name__ == "__main__":
    main(sys.argv[1:])
