"""A replica's handle on its engine, which runs in a process of its own (`engine_main`).

The replica parses, encodes and answers; the child process loads the model and decodes.
They talk over a socket pair of their own: the replica sends each request's prompts (as
ids) and cancellations; after every step the child sends back what the step produced
for every request (text as it becomes final, each completion's end) in one message,
which one thread here hands to the event loop in one call. The messages are pickled
Python objects of the two processes' own making, over a socket no one else holds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from multiprocessing.connection import Connection

from raytron.model.engine import EngineLimits, QueueFull
from raytron.platform.serving.adapter_names import AdapterSettings
from raytron.platform.serving.requests import Job

ENDED = "the engine's process ended (exit code {code}); the replica is being replaced"


class EngineFailed(RuntimeError):
    """The engine's process could not load the model, or ended."""


class EngineProcess:
    """Starts the engine's process and waits until its model is loaded (EngineFailed
    with its reason if it cannot be). `submit` from the event loop; each request's items
    arrive on the asyncio queue it gave."""

    def __init__(self, source, device: str, limits: EngineLimits,
                 adapters: AdapterSettings | None = None):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "raytron.platform.serving.engine_main",
             str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self.socket, self.connection = ours, Connection(os.dup(ours.fileno()))
        self.limits = limits
        self.connection.send((source, device, asdict(limits), adapters or AdapterSettings()))
        try:
            kind, value = self.connection.recv()
        except EOFError:
            kind, value = "failed", ENDED.format(code=self.process.wait())
        if kind == "failed":
            self.close()
            raise EngineFailed(value)
        self.state: dict[str, int] = value
        self.queues: dict[int, asyncio.Queue] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.numbers = itertools.count()
        self.outstanding = 0  # sequences submitted and not yet ended
        self.ended: str | None = None  # set: why the process is gone
        self.sending, self.counting = threading.Lock(), threading.Lock()
        threading.Thread(target=self.read_forever, name="raytron-engine-reader",
                         daemon=True).start()

    def submit(self, jobs: list[Job], prompts: list[list[int]], logprobs: int | None,
               echo: bool, queue: asyncio.Queue, adapter: str | None = None) -> int:
        """The request's number; its ("text" | "end", index, value) items come on `queue`.
        `adapter`: the name of the adapter to decode with (None: the base). QueueFull
        beyond the engine's `max_waiting` sequences (all might wait at once)."""
        if self.ended is not None:
            raise EngineFailed(self.ended)
        if self.outstanding + len(jobs) > self.limits.max_waiting:
            raise QueueFull(f"{self.outstanding} sequences are decoding or waiting; retry "
                            "later")
        self.loop = asyncio.get_running_loop()  # the replica's one loop
        number = next(self.numbers)
        self.queues[number] = queue
        with self.counting:
            self.outstanding += len(jobs)
        self.send(("submit", number, jobs, prompts, logprobs, echo, adapter))
        return number

    def release(self, number: int, cancel: bool) -> None:
        """Hear no more of request `number`; `cancel`: its sequences not yet ended leave
        the engine at its next step."""
        self.queues.pop(number, None)
        if cancel and self.ended is None:
            self.send(("cancel", number))

    def send(self, message: tuple) -> None:
        with self.sending:
            self.connection.send(message)

    def read_forever(self) -> None:
        try:
            while True:
                _, items, state = self.connection.recv()
                self.state = state
                with self.counting:
                    self.outstanding -= sum(item[1] == "end" for item in items)
                self.on_loop(self.deliver, items)
        except (EOFError, OSError):
            self.ended = ENDED.format(code=self.process.wait())
            self.on_loop(self.fail_all)

    def on_loop(self, function, *args) -> None:
        """`function(*args)` on the event loop, if it still runs (else no one listens)."""
        try:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop closed
            pass

    def deliver(self, items: list[tuple]) -> None:
        """On the event loop: each item to its request's queue."""
        for number, kind, index, value in items:
            queue = self.queues.get(number)
            if queue is not None:
                queue.put_nowait((kind, index, value))

    def fail_all(self) -> None:
        """Every request still listening ends with the process's end."""
        for queue in self.queues.values():
            queue.put_nowait(("failed", None, self.ended))

    def alive(self) -> bool:
        return self.ended is None and self.process.poll() is None

    def close(self) -> None:
        """Ends the process: our end of the socket shut, its engine stops. (Closing it
        alone would wait for the read blocked on it in our reader thread.)"""
        self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()
        self.connection.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

