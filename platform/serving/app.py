"""`raytron serve`'s Ray Serve application: a model behind OpenAI's completion routes.

Each replica loads the model once; concurrent requests are gathered by `serve.batch`
and decoded together (requests with the same sampling settings share one batch).
Whatever a client sends is answered: 401 without the key, 415 for a body that is not
JSON (a web page can post text/plain to a local server, never JSON without CORS, and no
CORS header is sent), 429 beyond the replica's limit, 413 and 400 for what the request
parser refuses, 504 after the time-out; a request whose generation fails gets a 500 of
its own, its batch-mates go on.
"""


import asyncio
import json
import os
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from ray import serve

from raytron.model.generate import PromptError, TextGenerator, check_prompts
from raytron.platform.serving.access import API_KEY_VARIABLE, authorized, checked_key
from raytron.platform.serving.gpus import (
    cluster_gpus,
    default_gpus,
    gpus_problem,
    replica_device,
)
from raytron.platform.serving.limits import (
    DEFAULT_LIMITS,
    RETRY_AFTER_S,
    Admission,
    Limits,
)
from raytron.platform.serving.metrics import RequestMetrics, Served, logger
from raytron.platform.serving.requests import (
    MAX_BODY_BYTES,
    BadRequest,
    Job,
    ParsedRequest,
    parse,
    read_json,
)

api = FastAPI(title="raytron")


def error(status: int, message: str, kind: str, param: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": None}}, status_code=status, headers=headers)


def json_content(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == \
        "application/json"


async def body_bytes(request: Request) -> bytes:
    """The body, read no further than one byte past the limit (what `read_json` refuses)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            break
    return b"".join(chunks)


class Stopped(Exception):
    """A streamed generation whose client left or whose time ran out."""


class HeldStream(StreamingResponse):
    """A stream that gives its request's place back when it ends, however it ends."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def generate_together(generator: TextGenerator, jobs: list[Job]) -> list:
    """The generations of `jobs` (alike but for their prompts), decoded together; should
    that fail, each job alone, so that one that fails (its exception in its place) fails
    alone."""
    job = jobs[0]
    try:
        return generator.generate([j.prompt for j in jobs], job.max_tokens, job.sampling,
                                  job.seed, job.stop, batch_size=len(jobs))
    except Exception as failure:
        if len(jobs) == 1:
            return [failure]
        return [generate_together(generator, [j])[0] for j in jobs]


def sse(value: dict) -> str:
    """A server-sent event. (Defined before the deployment: Ray Serve pickles the class
    where it is decorated, with only the names defined by then.)"""
    return f"data: {json.dumps(value)}\n\n"


@serve.deployment(**DEFAULT_LIMITS.serve_options())
@serve.ingress(api)
class ModelServer:
    def __init__(self, source: str, name: str, api_key: str | None = None,
                 max_batch_size: int = 8, tracking_uri: str | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        from raytron.platform.models.loading import load_model

        self.api_key = checked_key(api_key, "the API key")
        self.loaded = load_model(source, device=replica_device())
        self.metrics = RequestMetrics(name, tracking_uri)
        self.name, self.limits = name, limits
        self.admission = Admission(limits.max_queued)
        self.context = self.loaded.model.shape.max_seq_len
        self.created = int(time.time())
        self.generate_batch.set_max_batch_size(max_batch_size)

    def refused(self, request: Request) -> "JSONResponse | None":
        if self.api_key is not None and \
                not authorized(request.headers.get("authorization"), self.api_key):
            return error(401, "a valid API key is needed: Authorization: Bearer KEY",
                         "authentication_error")
        return None

    def unacceptable(self, request: Request) -> "JSONResponse | None":
        """415 for a body that is not JSON; 429 beyond the limit, else the request
        takes one of the replica's places."""
        if not json_content(request):
            return error(415, "the body must be JSON, sent as Content-Type: "
                              "application/json", "invalid_request_error")
        if not self.admission.admit():
            return error(429, f"this replica holds its limit of {self.limits.max_queued} "
                              f"requests (--max-queued); retry after {RETRY_AFTER_S} s",
                         "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        return None

    async def parsed(self, request: Request, chat: bool) -> ParsedRequest:
        parsed = parse(read_json(await body_bytes(request)), self.name, self.context, chat)
        try:
            check_prompts([self.loaded.generator.encode(p) for p in parsed.prompts],
                          self.context)
        except PromptError as problem:
            raise BadRequest(str(problem), "messages" if chat else "prompt") from None
        return parsed

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        return self.refused(request) or {"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created,
             "owned_by": "raytron"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.answer(request, chat=True)

    async def answer(self, request: Request, chat: bool):
        started, route = time.perf_counter(), request.url.path
        refusal = self.refused(request) or self.unacceptable(request)
        if refusal:
            self.metrics.record(Served(route, refusal.status_code,
                                       time.perf_counter() - started))
            return refusal
        streaming = False  # a stream gives its place back when it ends
        try:
            response = await self.admitted(request, chat, route, started)
            streaming = isinstance(response, HeldStream)
            return response
        finally:
            if not streaming:
                self.admission.release()

    async def admitted(self, request: Request, chat: bool, route: str, started: float):
        """The answer to a request that holds a place: the time-out counts from its
        arrival, so a body sent slowly does not hold the place longer."""
        deadline = started + self.limits.request_timeout_s
        try:
            parsed = await asyncio.wait_for(self.parsed(request, chat),
                                            deadline - time.perf_counter())
            if parsed.stream:
                return HeldStream(self.events(parsed, route, started, deadline),
                                  self.admission.release)
            results = await asyncio.wait_for(
                asyncio.gather(*(self.generate_batch(job) for job in parsed.jobs)),
                deadline - time.perf_counter())
        except BadRequest as problem:
            self.metrics.record(Served(route, problem.status, time.perf_counter() - started))
            return JSONResponse(problem.body(), status_code=problem.status)
        except TimeoutError:
            self.metrics.record(Served(route, 504, time.perf_counter() - started))
            return error(504, *self.timed_out())
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            self.metrics.record(Served(route, 500, time.perf_counter() - started))
            return error(500, *self.failed(failures[0]))
        self.record(route, started, results)
        return self.response(parsed, results)

    def timed_out(self) -> tuple[str, str]:
        return (f"the request took longer than its time-out of "
                f"{self.limits.request_timeout_s:g} s (--request-timeout-s)", "timeout_error")

    @staticmethod
    def failed(failure: Exception) -> tuple[str, str]:
        logger.error("generation failed", exc_info=failure)
        return f"generation failed: {type(failure).__name__}: {failure}", "server_error"

    def record(self, route: str, started: float, results: list) -> None:
        self.metrics.record(Served(route, 200, time.perf_counter() - started,
                                   sum(g.prompt_tokens for g in results),
                                   sum(len(g.tokens) for g in results)))

    async def events(self, parsed: ParsedRequest, route: str, started: float,
                     deadline: float):
        """Server-sent events: a chunk for each piece of text as it is generated, one with
        each choice's finish reason, then `[DONE]`. A streamed request decodes its own
        prompts together, apart from the batched requests."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = parsed.jobs[0]  # the jobs of one request differ only in prompt and seed
        stopped = threading.Event()  # the client left or the time ran out: stop generating

        def on_text(index: int, text: str) -> None:
            if stopped.is_set():
                raise Stopped
            loop.call_soon_threadsafe(queue.put_nowait, (index, text))

        def generate() -> list | Exception:
            try:
                return self.loaded.generator.generate(
                    [j.prompt for j in parsed.jobs], job.max_tokens, job.sampling, job.seed,
                    job.stop, batch_size=len(parsed.jobs), on_text=on_text)
            except Exception as failure:  # Stopped too
                return failure
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        finished = loop.run_in_executor(None, generate)
        head = {"id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if parsed.chat else "text_completion",
                "created": int(time.time()), "model": self.name}
        try:
            while (item := await asyncio.wait_for(queue.get(),
                                                  deadline - time.perf_counter())) is not None:
                yield sse({**head, "choices": [self.chunk(parsed.chat, *item, None)]})
            results = await finished
        except TimeoutError:
            results = TimeoutError()
        finally:
            stopped.set()
        if isinstance(results, Exception):  # the status is sent: an error event instead
            status, (message, kind) = (504, self.timed_out()) \
                if isinstance(results, TimeoutError) else (500, self.failed(results))
            self.metrics.record(Served(route, status, time.perf_counter() - started))
            yield sse({"error": {"message": message, "type": kind, "param": None,
                                 "code": None}})
            return
        for index, generation in enumerate(results):
            yield sse({**head, "choices": [self.chunk(parsed.chat, index, "",
                                                      generation.finish_reason)]})
        yield "data: [DONE]\n\n"
        self.record(route, started, results)

    @staticmethod
    def chunk(chat: bool, index: int, text: str, finish_reason: str | None) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text} if text else {}
            return {"index": index, "delta": delta, "finish_reason": finish_reason}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def response(self, parsed: ParsedRequest, results: list) -> dict:
        choices = []
        for index, generation in enumerate(results):
            choice = {"index": index, "finish_reason": generation.finish_reason,
                      "logprobs": None}
            if parsed.chat:
                choice["message"] = {"role": "assistant", "content": generation.text}
            else:
                choice["text"] = generation.text
            choices.append(choice)
        prompt_tokens = sum(g.prompt_tokens for g in results)
        completion_tokens = sum(len(g.tokens) for g in results)
        return {"id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if parsed.chat else "text_completion",
                "created": int(time.time()), "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, jobs: list[Job]) -> list:
        """Jobs that sample alike decode together; results in the order of `jobs`."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            groups[(job.sampling, job.stop, job.max_tokens, job.seed)].append(index)
        results: list = [None] * len(jobs)
        for indices in groups.values():
            generations = generate_together(self.loaded.generator, [jobs[i] for i in indices])
            for index, generation in zip(indices, generations, strict=True):
                results[index] = generation
        return results


def build_app(source: str, name: str, api_key: str | None = None, max_batch_size: int = 8,
              replicas: int = 1, autoscaling: dict | None = None,
              tracking_uri: str | None = None, num_gpus: float = 0,
              limits: Limits = DEFAULT_LIMITS):
    """The application (`raytron serve` and Python): `replicas` copies, or as many as
    Serve's `autoscaling` config (min_replicas, max_replicas, target_ongoing_requests)
    asks for, each with `num_gpus` GPUs (0: on the CPU) and `limits`; request metrics to
    MLflow at `tracking_uri`. An empty `api_key` is refused (None: no key)."""
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return ModelServer.options(ray_actor_options={"num_gpus": num_gpus},
                               **limits.serve_options(), **scaling).bind(
        source, name, checked_key(api_key, "the API key"), max_batch_size, tracking_uri,
        limits)


class ServeArgs(BaseModel):
    """The arguments of `serve run raytron.platform.serving.app:application key=value ...`
    and of a RayService's `args:`. The API key comes from $RAYTRON_API_KEY (set and
    empty: refused)."""

    source: str
    name: str | None = None  # default: the folder's name
    max_batch_size: int = 8
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None  # set: autoscale
    target_ongoing_requests: float = 8.0
    tracking_uri: str | None = None  # set: request metrics to MLflow
    # GPUs per replica (0.5: two per GPU); unset: 1 where the cluster has GPUs when the
    # application is built, else 0. Give it where GPU nodes may join later (autoscaling).
    num_gpus: float | None = None
    max_queued: int = Field(Limits.max_queued, ge=1)  # requests a replica holds; then 429
    request_timeout_s: float = Field(Limits.request_timeout_s, gt=0)  # then 504

    @field_validator("num_gpus")
    @classmethod
    def ray_takes(cls, value: float | None) -> float | None:
        problem = None if value is None else gpus_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def application(args: ServeArgs):
    """Serve's application builder (one argument, validated by pydantic)."""
    autoscaling = None if args.max_replicas is None else {
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests}
    gpus = default_gpus(cluster_gpus()) if args.num_gpus is None else args.num_gpus
    return build_app(args.source, args.name or Path(args.source).resolve().name,
                     checked_key(os.environ.get(API_KEY_VARIABLE), f"${API_KEY_VARIABLE}"),
                     args.max_batch_size, args.replicas, autoscaling, args.tracking_uri, gpus,
                     Limits(args.max_queued, args.request_timeout_s))
