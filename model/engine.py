"""The decoding engine: requests come and go while a batch decodes (continuous batching).

One KV cache is allocated for the engine's life: `max_num_seqs` slots of `max_len`
positions each. At every step each running sequence decodes one token, and the waiting
requests take the free slots in the same step; their prompts are prefilled in chunks
under a per-step token budget, so a long prompt never holds up the sequences already
decoding (each still gains a token every step). A finished, stopped or cancelled
sequence frees its slot at once. Each request samples with its own parameters and its
own seeded generator, so a seeded request gives the same tokens whatever it shares the
batch with, and a greedy one exactly the tokens it gets alone.

Plain PyTorch, no Ray: `step()` drives it in one thread (tests, `raytron generate`),
`start()` runs the steps in a thread of their own (a server), and `on_event` hears each
request's tokens and its end from that thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from raytron.model.adapter_bank import BASE, Adapter, AdapterBank
from raytron.model.engine_limits import DEFAULT_LIMITS, EngineLimits
from raytron.model.gpt import GPT
from raytron.model.kv_cache import KVCache
from raytron.model.sampling import Sampling, next_tokens, penalized

STOP, LENGTH = "stop", "length"  # an end token or stop string; max_tokens or the context
CANCELLED, ERROR = "cancelled", "error"


class PromptError(ValueError):
    """A prompt the model cannot continue: empty, as long as its context, or holding an
    id outside its vocabulary."""


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    for number, prompt in enumerate(prompts, 1):
        if not 0 < len(prompt) < context:
            raise PromptError(f"prompt {number} of {len(prompts)} has {len(prompt)} tokens; a "
                              f"prompt needs 1 to {context - 1} (the model's context is "
                              f"{context} tokens)")


def check_prompt(prompt: Sequence[int], context: int, vocab_size: int) -> None:
    """A prompt an engine of `context` positions per slot can continue, of known ids."""
    check_prompts([prompt], context)
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise PromptError(f"a prompt's token ids must be integers from 0 to {vocab_size - 1}")


class QueueFull(RuntimeError):
    """`max_waiting` requests already wait for a slot: come back later."""


@dataclass(frozen=True)
class Scored:
    """A token, its log-probability under the model (before any sampling adjustment), and
    the most likely tokens at its position with theirs (the token among them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def scored(logits: torch.Tensor, token: int, top: int) -> Scored:
    """`token`'s log-probability under (vocab,) `logits`, and the `top` most likely."""
    logprobs = logits.float().log_softmax(dim=-1)
    best: list[tuple[int, float]] = []
    if top > 0:
        values, ids = logprobs.topk(min(top, len(logprobs)))
        best = list(zip(ids.tolist(), values.tolist(), strict=True))
        if token not in ids.tolist():
            best.append((token, float(logprobs[token])))
    return Scored(token, float(logprobs[token]), tuple(best))


@dataclass(frozen=True)
class Event:
    """What `on_event` hears: a new token (scored when the request asked for logprobs);
    the prompt's scores (`echo`: None for its first token) once it is prefilled; or the
    end, with why and the error if any (and, scored, the end token that ended it)."""

    token: int | None = None
    scored: Scored | None = None
    prompt: tuple[Scored | None, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    on_event: Callable[[Event], None]
    stops: Callable[[list[int]], bool] | None = None  # True once the output holds a stop
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    cancelled: bool = False
    counts: torch.Tensor | None = None  # (1, vocab): for penalties, the times of each token
    logprobs: int | None = None  # score each generated token, with this many top tokens
    prompt_logprobs: int | None = None  # score the prompt's tokens (echo)
    prompt_scores: list[Scored | None] = field(default_factory=lambda: [None])
    adapter: Adapter | None = None  # None: the base model
    bank_slot: int = BASE  # where the bank holds its adapter once admitted

    @property
    def cached(self) -> int:
        """Positions of its slot holding its keys: the prompt's prefilled part, and every
        generated token but the last (which the next decode step feeds)."""
        return self.prefilled + max(0, len(self.generated) - 1)


@dataclass
class EngineStats:
    generated_tokens: int = 0
    prefilled_tokens: int = 0
    finished: int = 0


class Engine:
    """`bank`: adapters that requests may ask for, rows of one batch each with its own."""

    def __init__(self, model: GPT, end_ids: Sequence[int] = (),
                 limits: EngineLimits = DEFAULT_LIMITS, bank: AdapterBank | None = None):
        self.model, self.end_ids, self.limits, self.bank = model, set(end_ids), limits, bank
        shape = model.shape
        self.max_len = limits.positions(shape)
        weight = next(model.parameters())
        self.device = weight.device
        size = (limits.max_num_seqs, shape.n_kv_heads, self.max_len, shape.head_dim)
        self.buffers = [(torch.zeros(size, dtype=weight.dtype, device=self.device),
                         torch.zeros(size, dtype=weight.dtype, device=self.device))
                        for _ in range(shape.n_layers)]
        self.slots: list[Request | None] = [None] * limits.max_num_seqs
        self.waiting: deque[Request] = deque()
        self.admitted: list[Request] = []  # prefilling, in the order they came
        self.lock = threading.Condition()
        self.stats = EngineStats()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # --- requests (any thread) ---

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling,
               on_event: Callable[[Event], None], seed: int | None = None,
               stops: Callable[[list[int]], bool] | None = None,
               logprobs: int | None = None, prompt_logprobs: int | None = None,
               adapter: Adapter | None = None) -> Request:
        """Queue a request; its events come from the engine's thread. `logprobs`: score
        each generated token with that many most likely ones; `prompt_logprobs`: score
        the prompt's tokens too (then `max_tokens` may be 0: scoring alone); `adapter`:
        decode with it on the base. Raises PromptError for a prompt it cannot continue,
        QueueFull when too many wait, ValueError for an adapter the bank cannot take."""
        self.check_prompt(prompt)
        if max_tokens < (0 if prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be 1 or more (0 only to score a prompt), not "
                             f"{max_tokens}")
        if adapter is not None:
            problem = "this engine has no adapter bank" if self.bank is None else \
                self.bank.problem(adapter)
            if problem:
                raise ValueError(f"adapter '{adapter.name}' cannot be served: {problem}")
        generator = None if seed is None else \
            torch.Generator(self.device).manual_seed(seed % 2**64)
        request = Request(list(prompt), max_tokens, sampling, on_event, stops, generator,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs, adapter=adapter)
        with self.lock:
            if len(self.waiting) >= self.limits.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; retry later")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def check_prompt(self, prompt: Sequence[int]) -> None:
        check_prompt(prompt, self.max_len, self.model.shape.vocab_size)

    def cancel(self, request: Request) -> None:
        """End the request at the next step (a client went away); its slot is freed."""
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    # --- stepping (one thread) ---

    def busy(self) -> bool:
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    def run_until_done(self) -> None:
        while self.busy():
            self.step()

    def start(self) -> None:
        """Steps in a daemon thread of their own, whenever there is work."""
        self.thread = threading.Thread(target=self.serve_forever, name="raytron-engine",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    def serve_forever(self, after_step: Callable[[], None] | None = None) -> None:
        """Step whenever there is work, until `stop()`; `after_step` after each step."""
        while True:
            with self.lock:
                while not self.stopping and not self.busy():
                    self.lock.wait()
                if self.stopping:
                    return
            self.step()
            if after_step is not None:
                after_step()

    def step(self) -> None:
        """One iteration: cancelled requests leave, waiting ones take free slots, every
        decoding sequence gains a token, and prefill chunks fill the rest of the budget."""
        self.admit()
        decoding = [r for r in self.slots if r is not None and r.prefilled == len(r.prompt)]
        ready: list[tuple[Request, torch.Tensor]] = []
        if decoding:
            try:
                ready += zip(decoding, self.decode(decoding), strict=True)
            except Exception as error:  # noqa: BLE001 (the model failed: these requests end)
                for request in decoding:
                    self.finish(request, ERROR, f"{type(error).__name__}: {error}")
        prefilled = self.prefill_within(self.limits.token_budget - len(decoding))
        ready += prefilled
        for (request, logits), token in zip(ready, greedy_choices(ready), strict=True):
            if request.max_tokens == 0:  # scored its prompt, generates nothing
                self.finish(request, LENGTH)
            else:
                self.advance(request, logits, token)

    def prefill_within(self, budget: int) -> list[tuple[Request, torch.Tensor]]:
        """Prefill chunks of the admitted requests, in the order they came, up to `budget`
        tokens; the requests whose prompt is now whole, with their last logits. Whole
        prompts that start and end in this step go through together."""
        chunks = []
        for request in self.admitted:
            if budget <= 0:
                break
            chunk = min(budget, len(request.prompt) - request.prefilled)
            budget -= chunk
            chunks.append((request, chunk))
        whole = [r for r, chunk in chunks if r.prefilled == 0 and chunk == len(r.prompt)
                 and r.prompt_logprobs is None]
        if len(whole) > 1:
            try:
                done = list(zip(whole, self.prefill_together(whole), strict=True))
                chunks = [(r, chunk) for r, chunk in chunks if r not in whole]
            except Exception:  # noqa: BLE001 (one at a time below: a bad one fails alone)
                done = []
        else:
            done = []
        for request, chunk in chunks:
            try:
                logits = self.prefill(request, chunk)
            except Exception as error:  # noqa: BLE001 (this request alone fails)
                self.finish(request, ERROR, f"{type(error).__name__}: {error}")
                continue
            if request.prefilled == len(request.prompt):
                done.append((request, logits))
        for request, _ in done:
            self.admitted.remove(request)
            if request.prompt_logprobs is not None:
                self.tell(request, Event(prompt=tuple(request.prompt_scores)))
        return [(request, logits) for request, logits in done
                if request.finish_reason is None]

    def admit(self) -> None:
        with self.lock:
            for request in [r for r in self.slots if r is not None and r.cancelled]:
                self.finish(request, CANCELLED)
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self.finish(request, CANCELLED)
            free = [index for index, slot in enumerate(self.slots) if slot is None]
            busy = {r.bank_slot for r in self.slots if r is not None}
            for request in list(self.waiting):
                if not free:
                    break
                if request.adapter is not None:  # waits while the bank has no room
                    bank_slot = self.bank.place(request.adapter, busy)
                    if bank_slot is None:
                        continue
                    request.bank_slot = bank_slot
                    busy.add(bank_slot)
                self.waiting.remove(request)
                request.slot = free.pop(0)  # the lowest: decoding batches stay short
                self.slots[request.slot] = request
                self.admitted.append(request)

    def adapters(self, rows: Sequence[Request | None]):
        """Within the block, each row of a forward uses its request's adapter."""
        if self.bank is None:
            return contextlib.nullcontext()
        return self.bank.rows([BASE if r is None else r.bank_slot for r in rows])

    def view(self, first: int, stop: int, lengths: list[int]) -> KVCache:
        return KVCache.over([(keys[first:stop], values[first:stop])
                             for keys, values in self.buffers], lengths)

    @torch.inference_mode()
    def decode(self, decoding: list[Request]) -> torch.Tensor:
        """One token for each decoding sequence: a forward over the slots up to the last
        one in use (a view, no copy), which those between only pad; their rows write
        keys where nothing reads them, and the next prefill chunk overwrites them."""
        rows = max(request.slot for request in decoding) + 1
        tokens, lengths = [[0] for _ in range(rows)], [0] * rows
        for slot in range(rows):
            request = self.slots[slot]
            if request is not None:
                lengths[slot] = request.cached
        for request in decoding:
            tokens[request.slot][0] = request.generated[-1]
        with self.adapters(self.slots[:rows]):
            logits = self.model(torch.tensor(tokens, device=self.device),
                                self.view(0, rows, lengths))[:, -1]
        return logits[torch.tensor([request.slot for request in decoding],
                                   device=self.device)]

    @torch.inference_mode()
    def prefill(self, request: Request, chunk: int) -> torch.Tensor:
        """The next `chunk` prompt tokens into the request's slot; the logits of the
        last one (the only ones a completion needs)."""
        start = request.prefilled
        tokens = torch.tensor([request.prompt[start : start + chunk]], device=self.device)
        scoring = request.prompt_logprobs is not None  # then every position's logits
        with self.adapters([request]):
            logits = self.model(tokens, self.view(request.slot, request.slot + 1, [start]),
                                logits_at=None if scoring else
                                torch.tensor([chunk - 1], device=self.device))
        if scoring:
            following = request.prompt[start + 1 : start + chunk + 1]
            request.prompt_scores += [scored(logits[0, index], token, request.prompt_logprobs)
                                      for index, token in enumerate(following)]
        request.prefilled += chunk
        self.stats.prefilled_tokens += chunk
        return logits[0, -1]

    @torch.inference_mode()
    def prefill_together(self, requests: list[Request]) -> torch.Tensor:
        """Whole prompts of requests admitted together, in one padded forward (a matmul
        over all their tokens rather than one per prompt) into a cache of their own,
        then copied into their slots; the logits of each one's last token."""
        lengths = [len(request.prompt) for request in requests]
        tokens = torch.zeros(len(requests), max(lengths), dtype=torch.long)
        for row, request in enumerate(requests):
            tokens[row, : lengths[row]] = torch.tensor(request.prompt)
        keys = self.buffers[0][0]
        scratch = KVCache(len(requests), max(lengths), len(self.buffers), keys.shape[1],
                          keys.shape[3], keys.dtype, self.device)
        with self.adapters(requests):
            logits = self.model(tokens.to(self.device), scratch,
                                logits_at=torch.tensor(lengths, device=self.device) - 1)
        for (keys, values), layer in zip(self.buffers, scratch.layers, strict=True):
            for row, request in enumerate(requests):
                keys[request.slot, :, : lengths[row]] = layer.keys[row, :, : lengths[row]]
                values[request.slot, :, : lengths[row]] = layer.values[row, :, : lengths[row]]
        for request in requests:
            request.prefilled = len(request.prompt)
        self.stats.prefilled_tokens += sum(lengths)
        return logits[:, -1]

    def advance(self, request: Request, logits: torch.Tensor, token: int | None) -> None:
        """The request's next token (`token` when already chosen greedily), else sampled
        its own way; it ends at an end token, a stop string, max_tokens or the end of its
        slot. What fails here fails it alone."""
        try:
            raw, logits = logits, logits[None]
            if request.sampling.penalizes:
                if request.counts is None:  # the times it generated each token
                    request.counts = torch.zeros_like(logits, dtype=torch.float32)
                logits = penalized(logits, request.counts, request.sampling)
            if token is None:
                token = int(next_tokens(logits, request.sampling, request.generator))
            if request.counts is not None:
                request.counts[0, token] += 1
            score = None if request.logprobs is None else \
                scored(raw, token, request.logprobs)
            if token in self.end_ids:  # ends it; scored, as evaluation harnesses expect
                self.finish(request, STOP, scored=score)
                return
            request.generated.append(token)
            self.stats.generated_tokens += 1
            request.on_event(Event(token=token, scored=score))
            if request.stops is not None and request.stops(request.generated):
                self.finish(request, STOP)
            elif len(request.generated) >= request.max_tokens or \
                    len(request.prompt) + len(request.generated) >= self.max_len:
                self.finish(request, LENGTH)
        except Exception as error:  # noqa: BLE001 (a bad stop check or listener)
            self.finish(request, ERROR, f"{type(error).__name__}: {error}")

    def tell(self, request: Request, event: Event) -> None:
        """An event for a listener; a listener that fails ends its request."""
        try:
            request.on_event(event)
        except Exception as error:  # noqa: BLE001
            self.finish(request, ERROR, f"{type(error).__name__}: {error}")

    def finish(self, request: Request, reason: str, error: str | None = None,
               scored: Scored | None = None) -> None:
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
        if request in self.admitted:
            self.admitted.remove(request)
        request.finish_reason = reason
        self.stats.finished += 1
        try:
            request.on_event(Event(scored=scored, finish_reason=reason, error=error))
        except Exception:  # noqa: BLE001, S110 (a listener that fails hears no more)
            pass

    def slots_in_use(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def state(self) -> dict[str, int]:
        """What a server reports of its engine (`/stats`, Ray's metrics)."""
        used = self.slots_in_use()
        return {"running": used, "waiting": len(self.waiting),
                "kv_slots": self.limits.max_num_seqs, "kv_slots_used": used,
                "generated_tokens": self.stats.generated_tokens,
                "prefilled_tokens": self.stats.prefilled_tokens,
                "finished": self.stats.finished,
                "adapters_loaded": 0 if self.bank is None else self.bank.loaded()}


def greedy_choices(ready: list[tuple[Request, torch.Tensor]]) -> list[int | None]:
    """The tokens of the greedy rows without penalties, in one argmax and one read from
    the device (a read per row costs a synchronization each); None for the others."""
    rows = [index for index, (request, _) in enumerate(ready)
            if request.sampling.is_greedy and not request.sampling.penalizes]
    chosen: list[int | None] = [None] * len(ready)
    if rows:
        tokens = torch.stack([ready[index][1] for index in rows]).argmax(dim=-1).tolist()
        for index, token in zip(rows, tokens, strict=True):
            chosen[index] = token
    return chosen
