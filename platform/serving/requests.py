"""OpenAI-style request bodies, checked: every problem is a 400 with OpenAI's error object,
never an exception in the replica."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raytron.model.sampling import Sampling


class BadRequest(ValueError):
    """A request the server refuses with 400; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error",
                          "param": self.param, "code": None}}


@dataclass(frozen=True)
class Job:
    """One completion to generate: a prompt and how."""

    prompt: str
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class ParsedRequest:
    model: str
    jobs: list[Job]  # n per prompt, prompt after prompt
    stream: bool = False
    chat: bool = False
    prompts: list[str] = field(default_factory=list)


def number(body: dict, key: str, default: Any, kind: type, low: float, high: float | None = None,
           above: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()):
        raise BadRequest(f"{key} must be a {kind.__name__}", key)
    too_low = value <= low if above else value < low
    if too_low or (high is not None and value > high):
        bound = f"more than {low}" if above else f"at least {low}"
        raise BadRequest(f"{key} must be {bound}{f' and at most {high}' if high else ''}, "
                         f"not {value}", key)
    return kind(value)


def parse(body: Any, served_model: str, context: int, chat: bool) -> ParsedRequest:
    """The request's jobs; BadRequest for anything the server cannot honour."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:
        raise BadRequest(f"model '{model}' is not served here; this server serves "
                         f"'{served_model}'", "model")
    max_tokens = number(body, "max_tokens", 16, int, 1, context - 1)
    sampling = Sampling(temperature=number(body, "temperature", 1.0, float, 0, 2),
                        top_p=number(body, "top_p", 1.0, float, 0, 1, above=True))
    n = number(body, "n", 1, int, 1, 16)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    prompts = chat_prompt(body) if chat else completion_prompts(body)
    jobs = [Job(prompt, max_tokens, sampling, tuple(stop),
                None if seed is None else seed + index)
            for prompt in prompts for index in range(n)]
    return ParsedRequest(model, jobs, stream, chat, prompts)


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or \
            not all(isinstance(p, str) and p for p in prompts):
        raise BadRequest("prompt must be a non-empty string or a list of them", "prompt")
    return prompts


def chat_prompt(body: dict) -> list[str]:
    """The conversation, as text ending with the assistant's generation prompt."""
    from raytron.pipelines.chat import ChatError, render

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages):
        raise BadRequest("messages must be a non-empty list of {role, content} with roles "
                         "system, user or assistant", "messages")
    try:
        return [render(messages, add_generation_prompt=True)]
    except ChatError as error:
        raise BadRequest(str(error), "messages") from None
