"""`raytron serve`'s Ray Serve application: a model behind OpenAI's completion routes.

Each replica loads the model once; concurrent requests are gathered by `serve.batch`
and decoded together (requests with the same sampling settings share one batch).
"""


import asyncio
import json
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, field_validator
from ray import serve

from raytron.model.generate import PromptError, check_prompts
from raytron.platform.serving.gpus import (
    cluster_gpus,
    default_gpus,
    gpus_problem,
    replica_device,
)
from raytron.platform.serving.metrics import RequestMetrics, Served
from raytron.platform.serving.requests import BadRequest, Job, ParsedRequest, parse

api = FastAPI(title="raytron")


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": None}}, status_code=status)


def sse(value: dict) -> str:
    """A server-sent event. (Defined before the deployment: Ray Serve pickles the class
    where it is decorated, with only the names defined by then.)"""
    return f"data: {json.dumps(value)}\n\n"


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class ModelServer:
    def __init__(self, source: str, name: str, api_key: str | None = None,
                 max_batch_size: int = 8, tracking_uri: str | None = None):
        from raytron.platform.models.loading import load_model

        self.loaded = load_model(source, device=replica_device())
        self.metrics = RequestMetrics(name, tracking_uri)
        self.name, self.api_key = name, api_key
        self.context = self.loaded.model.shape.max_seq_len
        self.created = int(time.time())
        self.generate_batch.set_max_batch_size(max_batch_size)

    def refused(self, request: Request) -> "JSONResponse | None":
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "a valid API key is needed: Authorization: Bearer KEY",
                         "authentication_error")
        return None

    async def parsed(self, request: Request, chat: bool) -> ParsedRequest:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None
        parsed = parse(body, self.name, self.context, chat)
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
        refusal = self.refused(request)
        if refusal:
            self.metrics.record(Served(route, 401, time.perf_counter() - started))
            return refusal
        try:
            parsed = await self.parsed(request, chat)
        except BadRequest as problem:
            self.metrics.record(Served(route, 400, time.perf_counter() - started))
            return JSONResponse(problem.body(), status_code=400)
        if parsed.stream:
            return StreamingResponse(self.events(parsed, route, started),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(self.generate_batch(job) for job in parsed.jobs))
        self.record(route, started, results)
        return self.response(parsed, results)

    def record(self, route: str, started: float, results: list) -> None:
        self.metrics.record(Served(route, 200, time.perf_counter() - started,
                                   sum(g.prompt_tokens for g in results),
                                   sum(len(g.tokens) for g in results)))

    async def events(self, parsed: ParsedRequest, route: str, started: float):
        """Server-sent events: a chunk for each piece of text as it is generated, one with
        each choice's finish reason, then `[DONE]`. A streamed request decodes its own
        prompts together, apart from the batched requests."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = parsed.jobs[0]  # the jobs of one request differ only in prompt and seed

        def on_text(index: int, text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, text))

        def generate() -> list:
            try:
                return self.loaded.generator.generate(
                    [j.prompt for j in parsed.jobs], job.max_tokens, job.sampling, job.seed,
                    job.stop, batch_size=len(parsed.jobs), on_text=on_text)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        finished = loop.run_in_executor(None, generate)
        head = {"id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if parsed.chat else "text_completion",
                "created": int(time.time()), "model": self.name}
        while (item := await queue.get()) is not None:
            yield sse({**head, "choices": [self.chunk(parsed.chat, *item, None)]})
        results = await finished
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
        for (sampling, stop, max_tokens, seed), indices in groups.items():
            generations = self.loaded.generator.generate(
                [jobs[i].prompt for i in indices], max_tokens, sampling, seed, stop,
                batch_size=len(indices))
            for index, generation in zip(indices, generations, strict=True):
                results[index] = generation
        return results


def build_app(source: str, name: str, api_key: str | None = None, max_batch_size: int = 8,
              replicas: int = 1, autoscaling: dict | None = None,
              tracking_uri: str | None = None, num_gpus: float = 0):
    """The application (`raytron serve` and Python): `replicas` copies, or as many as
    Serve's `autoscaling` config (min_replicas, max_replicas, target_ongoing_requests)
    asks for, each with `num_gpus` GPUs (0: on the CPU); request metrics to MLflow at
    `tracking_uri`."""
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return ModelServer.options(ray_actor_options={"num_gpus": num_gpus}, **scaling).bind(
        source, name, api_key, max_batch_size, tracking_uri)


class ServeArgs(BaseModel):
    """The arguments of `serve run raytron.platform.serving.app:application key=value ...`
    and of a RayService's `args:`. The API key comes from $RAYTRON_API_KEY."""

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
                     os.environ.get("RAYTRON_API_KEY"), args.max_batch_size, args.replicas,
                     autoscaling, args.tracking_uri, gpus)
