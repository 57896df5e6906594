"""`raytron serve`'s Ray Serve application: a model behind OpenAI's completion routes.

Each replica runs one decoding engine (`model/engine.py`) in a process of its own
(`engine_process.py`), which loads the model once: every request, streamed or not, is
submitted to it and decoded in its one batch, which requests join and leave at every
step; handlers only parse, wait on the engine's events and answer, so `/health` and
every stream stay responsive while it decodes. A client that leaves cancels its
sequences; a replica whose engine's process ended fails its health check and is
replaced.
Whatever a client sends is answered: 401 without the key, 415 for a body that is not
JSON (a web page can post text/plain to a local server, never JSON without CORS, and no
CORS header is sent), 429 beyond the replica's limit, 413 and 400 for what the request
parser refuses, 504 after the time-out; a request whose generation fails gets a 500 of
its own, its batch-mates go on.
"""


import asyncio
import json
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from ray import serve

from raytron.model.engine import EngineLimits, PromptError, QueueFull, check_prompt
from raytron.model.engine_limits import DEFAULT_LIMITS as DEFAULT_ENGINE
from raytron.model.generate import encode_prompt
from raytron.pipelines.chat import CHATML
from raytron.platform.serving.access import API_KEY_VARIABLE, authorized, checked_key
from raytron.platform.serving.adapter_names import (
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_RANK,
    AdapterError,
    AdapterSettings,
    name_problem,
)
from raytron.platform.serving.adapters import AdapterLibrary
from raytron.platform.serving.completions import Completions, Finished
from raytron.platform.serving.engine_process import EngineFailed, EngineProcess
from raytron.platform.serving.engine_stats import EngineStats
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
from raytron.platform.serving.model_names import ServedModels
from raytron.platform.serving.requests import (
    MAX_BODY_BYTES,
    MAX_SEQUENCES,
    BadRequest,
    ParsedRequest,
    Prompt,
    parse,
    read_json,
)
from raytron.platform.serving.responses import Bodies

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


def merged(batch: list[tuple]) -> list[tuple]:
    """Consecutive texts of one completion as one (a chunk per completion and message,
    not per token)."""
    out: list[tuple] = []
    for item in batch:
        if out and item[0] == "text" and out[-1][:2] == ("text", item[1]):
            out[-1] = ("text", item[1], out[-1][2] + item[2])
        else:
            out.append(item)
    return out


def sse(value: dict) -> str:
    """A server-sent event. (Defined before the deployment: Ray Serve pickles the class
    where it is decorated, with only the names defined by then.)"""
    return f"data: {json.dumps(value)}\n\n"


@serve.deployment(**DEFAULT_LIMITS.serve_options())
@serve.ingress(api)
class ModelServer:
    def __init__(self, source: str, name: str, api_key: str | None = None,
                 engine: EngineLimits = DEFAULT_ENGINE, tracking_uri: str | None = None,
                 limits: Limits = DEFAULT_LIMITS, adapters: AdapterSettings | None = None):
        from raytron.platform.models.sources import open_source

        self.api_key = checked_key(api_key, "the API key")
        self.source = open_source(source)
        self.tokenizer = self.source.tokenizer
        self.chat_template = self.source.chat_template or CHATML  # the model's own
        self.metrics = RequestMetrics(name, tracking_uri)
        self.name, self.limits = name, limits
        self.admission = Admission(limits.max_queued)
        engine = EngineLimits(engine.max_num_seqs, engine.max_model_len, engine.token_budget,
                              max_waiting=limits.max_queued * MAX_SEQUENCES)  # admission's
        adapters = adapters or AdapterSettings()
        self.library = AdapterLibrary(adapters, self.source) if adapters.enabled else None
        for adapter in adapters.paths:  # one that cannot be served fails the replica now
            self.library.adapter(adapter)  # (a RayService's, unchecked before)
        self.models = ServedModels(name, self.library)
        self.engine = EngineProcess(self.source, replica_device(), engine, adapters)
        self.stats = EngineStats(lambda: self.engine.state, name)
        self.context = engine.positions(self.source.shape)
        self.created = int(time.time())

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine's process ended is replaced."""
        if not self.engine.alive():
            raise EngineFailed(self.engine.ended or "the engine's process ended")

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.source.end_ids, self.source.bos_id)

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

    async def parsed(self, request: Request, chat: bool
                     ) -> tuple[ParsedRequest, list[list[int]], str | None]:
        """The request, each completion's prompt as ids, and the adapter it asks for."""
        parsed = parse(read_json(await body_bytes(request)), self.name, self.context,
                       self.chat_template if chat else None)
        adapter = self.models.adapter_of(parsed.model)
        if adapter is not None:
            try:
                self.library.adapter(adapter)  # read and checked, once per version
            except AdapterError as problem:
                raise BadRequest(str(problem), "model") from None
        encoded = {index: self.encoded(prompt) for index, prompt in enumerate(parsed.prompts)}
        per_prompt = len(parsed.jobs) // len(parsed.prompts)  # n
        return parsed, [encoded[index // per_prompt] for index in range(len(parsed.jobs))], \
            adapter

    def encoded(self, prompt: Prompt) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        try:
            check_prompt(ids, self.context, self.source.shape.vocab_size)
        except PromptError as problem:
            raise BadRequest(str(problem), "prompt") from None
        return ids

    def echoed(self, parsed: ParsedRequest) -> list[str]:
        """Each completion's echoed prompt text (empty without echo)."""
        if not parsed.echo:
            return [""] * len(parsed.jobs)
        return [job.prompt if isinstance(job.prompt, str) else
                self.tokenizer.decode(job.prompt) for job in parsed.jobs]

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/stats")
    async def engine_stats(self, request: Request):
        """The engine's state (also in Ray's metrics: raytron_engine_*)."""
        return self.refused(request) or self.stats.snapshot()

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's: {prompt} or {messages} (with add_generation_prompt) to token ids, as
        the server encodes a prompt; `add_special_tokens: false` leaves out the BOS of a
        model trained with one (lm-evaluation-harness's remote tokenizer asks so)."""
        async def tokens(body: dict) -> dict:
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise BadRequest("add_special_tokens must be true or false",
                                 "add_special_tokens")
            if "messages" in body:
                parsed = parse({**body, "max_tokens": 1}, self.name, self.context,
                               self.chat_template)
                text = parsed.prompts[0]
            else:
                text = body.get("prompt")
                if not isinstance(text, str):
                    raise BadRequest("prompt must be a string (or give messages)", "prompt")
            ids = self.encode(text) if special else \
                self.tokenizer.encode(text, add_special_tokens=False).ids
            return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

        return await self.small(request, tokens)

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        """vLLM's: {tokens} to the text they decode to."""
        async def text(body: dict) -> dict:
            tokens = body.get("tokens")
            vocab = self.source.shape.vocab_size
            if not isinstance(tokens, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                    for t in tokens):
                raise BadRequest(f"tokens must be a list of token ids from 0 to {vocab - 1}",
                                 "tokens")
            return {"prompt": self.tokenizer.decode(tokens)}

        return await self.small(request, text)

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        source, piece = self.source, self.tokenizer.id_to_token
        return self.refused(request) or {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": self.context,
            "vocab_size": self.tokenizer.get_vocab_size(),
            "eos_token": piece(source.end_ids[0]) if source.end_ids else None,
            "bos_token": None if source.bos_id is None else piece(source.bos_id),
            "chat_template": self.chat_template.source}  # what /v1/chat/completions renders

    async def small(self, request: Request, answer) -> JSONResponse | dict:
        """A request that runs no model: the key, JSON, a bounded body, 400 for the rest."""
        refusal = self.refused(request)
        if refusal:
            return refusal
        if not json_content(request):
            return error(415, "the body must be JSON, sent as Content-Type: "
                              "application/json", "invalid_request_error")
        try:
            return await answer(read_json(await body_bytes(request)))
        except BadRequest as problem:
            return JSONResponse(problem.body(), status_code=problem.status)

    @api.get("/v1/models")
    async def models(self, request: Request):
        """The base, and each adapter as BASE:NAME with the base as its `parent`."""
        return self.refused(request) or {"object": "list",
                                         "data": self.models.listed(self.created)}

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
            parsed, prompts, adapter = await asyncio.wait_for(
                self.parsed(request, chat), deadline - time.perf_counter())
            completions = Completions(self.engine, parsed.jobs, prompts, parsed.logprobs,
                                      parsed.echo, adapter)
        except BadRequest as problem:
            self.metrics.record(Served(route, problem.status, time.perf_counter() - started))
            return JSONResponse(problem.body(), status_code=problem.status)
        except TimeoutError:
            self.metrics.record(Served(route, 504, time.perf_counter() - started))
            return error(504, *self.timed_out())
        except EngineFailed as ended:
            self.metrics.record(Served(route, 503, time.perf_counter() - started))
            return error(503, str(ended), "server_error",
                         headers={"Retry-After": str(RETRY_AFTER_S)})
        except QueueFull as full:
            self.metrics.record(Served(route, 429, time.perf_counter() - started))
            return error(429, f"{full}; retry after {RETRY_AFTER_S} s", "rate_limit_error",
                         headers={"Retry-After": str(RETRY_AFTER_S)})
        bodies = Bodies(parsed, self.tokenizer, parsed.model, self.echoed(parsed))
        if parsed.stream:
            return HeldStream(self.events(parsed, completions, bodies, route, started,
                                          deadline), self.admission.release)
        try:  # cancelled too when the client leaves (Serve cancels the handler)
            results = await completions.results(deadline)
        except TimeoutError:
            self.metrics.record(Served(route, 504, time.perf_counter() - started))
            return error(504, *self.timed_out())
        finally:
            completions.cancel()
        failed = [f for f in results if f.error]
        if failed:
            self.metrics.record(Served(route, 500, time.perf_counter() - started))
            return error(500, *self.failed(failed[0].error))
        self.record(route, started, results)
        return bodies.response(results)

    def timed_out(self) -> tuple[str, str]:
        return (f"the request took longer than its time-out of "
                f"{self.limits.request_timeout_s:g} s (--request-timeout-s)", "timeout_error")

    @staticmethod
    def failed(failure: str) -> tuple[str, str]:
        logger.error("generation failed: %s", failure)
        return f"generation failed: {failure}", "server_error"

    def record(self, route: str, started: float, results: list[Finished]) -> None:
        self.metrics.record(Served(route, 200, time.perf_counter() - started,
                                   sum(len(f.prompt_ids) for f in results),
                                   sum(len(f.tokens) for f in results)))
        self.stats.finished(results)

    async def events(self, parsed: ParsedRequest, completions: Completions, bodies: Bodies,
                     route: str, started: float, deadline: float):
        """Server-sent events: each completion's echoed prompt, a chunk for each piece of
        text as it becomes final, one with its finish reason (and its scores), the usage
        when asked for, then `[DONE]`. Decoded in the engine's batch with every other
        request; a client that leaves cancels its sequences."""
        results: list[Finished | None] = [None] * len(parsed.jobs)
        failure = None
        try:
            for index, text in enumerate(bodies.echoed):
                if text:
                    yield sse(bodies.chunk(index, text))
            async for batch in completions.batches(deadline):
                events = []  # one message: Serve streams each yield through its proxy
                for kind, index, value in merged(batch):
                    if kind == "text":
                        events.append(sse(bodies.chunk(index, value)))
                    else:
                        results[index] = value
                        events.append(sse(bodies.chunk(index, "", value)))
                        failure = failure or value.error
                yield "".join(events)
        except TimeoutError:
            failure = TimeoutError
        finally:
            completions.cancel()
        if failure is not None:  # the status is sent: an error event instead
            status, (message, kind) = (504, self.timed_out()) if failure is TimeoutError \
                else (500, self.failed(failure))
            self.metrics.record(Served(route, status, time.perf_counter() - started))
            yield sse({"error": {"message": message, "type": kind, "param": None,
                                 "code": None}})
            return
        if parsed.include_usage:
            yield sse(bodies.usage_chunk(results))
        yield "data: [DONE]\n\n"
        self.record(route, started, results)


def build_app(source: str, name: str, api_key: str | None = None,
              engine: EngineLimits = DEFAULT_ENGINE, replicas: int = 1,
              autoscaling: dict | None = None, tracking_uri: str | None = None,
              num_gpus: float = 0, limits: Limits = DEFAULT_LIMITS,
              adapters: AdapterSettings | None = None):
    """The application (`raytron serve` and Python): `replicas` copies, or as many as
    Serve's `autoscaling` config (min_replicas, max_replicas, target_ongoing_requests)
    asks for, each with `num_gpus` GPUs (0: on the CPU), an engine of `engine`'s slots
    and budget, `limits`, and the LoRA `adapters` it serves by name; request metrics to
    MLflow at `tracking_uri`. An empty `api_key` is refused (None: no key)."""
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return ModelServer.options(ray_actor_options={"num_gpus": num_gpus},
                               **limits.serve_options(), **scaling).bind(
        source, name, checked_key(api_key, "the API key"), engine, tracking_uri, limits,
        adapters)


class ServeArgs(BaseModel):
    """The arguments of `serve run raytron.platform.serving.app:application key=value ...`
    and of a RayService's `args:`. The API key comes from $RAYTRON_API_KEY (set and
    empty: refused)."""

    source: str
    name: str | None = None  # default: the folder's name
    max_num_seqs: int = Field(EngineLimits.max_num_seqs, ge=1)  # sequences decoded together
    max_model_len: int | None = Field(None, ge=2)  # positions per sequence (the model's)
    token_budget: int = Field(EngineLimits.token_budget, ge=2)  # tokens a step computes
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
    adapters: dict[str, str] = {}  # LoRA adapters by name: NAME -> PATH
    adapters_dir: str | None = None  # each folder NAME in it: adapter NAME, on first use
    max_adapters: int = Field(DEFAULT_MAX_ADAPTERS, ge=1)  # on a replica's device at once
    max_lora_rank: int = Field(DEFAULT_MAX_RANK, ge=1)  # the largest adapter rank taken

    @field_validator("adapters")
    @classmethod
    def named_well(cls, value: dict[str, str]) -> dict[str, str]:
        problem = next(filter(None, map(name_problem, value)), None)
        if problem:
            raise ValueError(problem)
        return value

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
                     EngineLimits(args.max_num_seqs, args.max_model_len, args.token_budget),
                     args.replicas, autoscaling, args.tracking_uri, gpus,
                     Limits(args.max_queued, args.request_timeout_s),
                     AdapterSettings(args.adapters, args.adapters_dir, args.max_adapters,
                                     args.max_lora_rank))
