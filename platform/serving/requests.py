"""OpenAI-style request bodies, read from bytes and checked: every problem is a 4xx with
OpenAI's error object, never an exception in the replica. Each field has a bound, so
that no request can ask for more than a replica can give, or for what makes sampling
fail (a temperature of 1e-39 divides the logits into infinities)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raytron.pipelines.chat import ChatTemplate

if TYPE_CHECKING:
    from raytron.model.sampling import Sampling

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 64 prompts of a 2048-token context fit in half of it
MAX_SEQUENCES = 64  # prompts x n in one request
MAX_N = 16
MAX_STOP, MAX_STOP_CHARS = 4, 64  # stop strings, as OpenAI allows; their length
MAX_INT_DIGITS = 1000  # Python refuses to read more than 4300 (a ValueError)
GREEDY_BELOW = 1e-5  # a lower temperature is greedy: its division overflows float32


class BadRequest(ValueError):
    """A request the server refuses (400 unless `status` says otherwise); `param` names
    the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error",
                          "param": self.param, "code": self.code}}


MAX_LOGPROBS = 20  # most likely tokens per position (vLLM's default limit)

Prompt = str | list[int]  # text, or token ids


@dataclass(frozen=True)
class Job:
    """One completion to generate: a prompt and how."""

    prompt: Prompt
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
    prompts: list[Prompt] = field(default_factory=list)
    logprobs: int | None = None  # score each token, with this many most likely ones
    echo: bool = False  # completions: the prompt in the text (and scored, with logprobs)
    include_usage: bool = False  # a stream's last chunk: the token counts


def read_json(raw: bytes) -> dict:
    """The body's JSON object. More than `MAX_BODY_BYTES` is a BadRequest (413); so are
    integers of more than `MAX_INT_DIGITS` digits, nesting deeper than Python's recursion
    limit, invalid UTF-8 and text that is not valid Unicode (a lone surrogate such as
    \\ud800). NaN and Infinity are read, and refused by the field that holds them."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the body has more than {MAX_BODY_BYTES} bytes", status=413)
    try:
        body = json.loads(raw, parse_int=bounded_int)
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for key, value in body.items():
        if not valid_unicode(key, value):
            raise BadRequest(f"{key if valid_unicode(key) else 'a field'} holds text that is "
                             "not valid Unicode (a lone surrogate such as \\ud800)",
                             key if valid_unicode(key) else None)
    return body


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"an integer has {len(text.lstrip('-'))} digits; at most "
                         f"{MAX_INT_DIGITS} are read")
    return int(text)


def valid_unicode(*values: Any) -> bool:
    """Whether every string in `values` (nested lists and objects too) encodes as UTF-8."""
    pending = list(values)
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return True


def shown(value: Any) -> str:
    """A client's value in an error message, cut short."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def number(body: dict, key: str, default: Any, kind: type, low: float, high: float | None = None,
           above: bool = False) -> Any:
    """body[key] (default when absent or null): a finite `kind` in [low, high] (above: more
    than low). Compared as given, so an integer of 400 digits is refused, not converted."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and isinstance(value, float) and not value.is_integer()):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}", key)
    too_low = value <= low if above else value < low
    if (isinstance(value, float) and not math.isfinite(value)) or too_low or \
            (high is not None and value > high):
        bound = f"more than {low}" if above else f"at least {low}"
        raise BadRequest(f"{key} must be {bound}{'' if high is None else f' and at most {high}'}"
                         f", not {shown(value)}", key)
    return kind(value)


def parse(body: dict, served_model: str, context: int, chat: ChatTemplate | None
          ) -> ParsedRequest:
    """The request's jobs (`body` from `read_json`); BadRequest for anything the server
    cannot honour. `model` is `served_model` unless the body names one (which the caller
    finds). `chat`: the template of a chat request; None: a completions one."""
    from raytron.model.sampling import Sampling  # torch: `raytron serve --help` reads the bounds

    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    echo = flag(body, "echo") if chat is None else False
    max_tokens = number(body, "max_tokens", 16, int, 0 if echo else 1, context - 1)
    temperature = number(body, "temperature", 1.0, float, 0, 2)
    sampling = Sampling(
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=number(body, "top_p", 1.0, float, 0, 1, above=True),
        presence_penalty=number(body, "presence_penalty", 0.0, float, -2, 2),
        frequency_penalty=number(body, "frequency_penalty", 0.0, float, -2, 2),
        repetition_penalty=number(body, "repetition_penalty", 1.0, float, 0.01, 10))
    n = number(body, "n", 1, int, 1, MAX_N)
    seed = number(body, "seed", None, int, -(2**63), 2**63 - 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise BadRequest(f"stop must be a string or a list of up to {MAX_STOP} strings, each "
                         f"of 1 to {MAX_STOP_CHARS} characters", "stop")
    stream = flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                        bool):
        raise BadRequest("stream_options must be {\"include_usage\": true or false}",
                         "stream_options")
    prompts = completion_prompts(body, n) if chat is None else chat_prompt(body, chat)
    jobs = [Job(prompt, max_tokens, sampling, tuple(stop),
                None if seed is None else seed + index)
            for prompt in prompts for index in range(n)]
    return ParsedRequest(model, jobs, stream, chat is not None, prompts,
                         requested_logprobs(body, chat is not None),
                         echo, stream and options.get("include_usage", False))


def flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false", key)
    return bool(value)


def requested_logprobs(body: dict, chat: bool) -> int | None:
    """How many most likely tokens to give per position, or None for no scores: OpenAI's
    `logprobs: k` in completions; `logprobs: true` and `top_logprobs: k` in chats."""
    if not chat:
        return number(body, "logprobs", None, int, 0, MAX_LOGPROBS)
    if not flag(body, "logprobs"):
        if body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return number(body, "top_logprobs", 0, int, 0, MAX_LOGPROBS)


def completion_prompts(body: dict, n: int) -> list[Prompt]:
    """OpenAI's four shapes: a string, a list of strings, a list of token ids, a list of
    lists of token ids (which the engine checks against the vocabulary)."""
    prompt = body.get("prompt")
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                         all(is_token(t) for t in prompt))
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, list) or not prompts or not all(
            (isinstance(p, str) and p) or (isinstance(p, list) and p and all(map(is_token, p)))
            for p in prompts):
        raise BadRequest("prompt must be a non-empty string, a list of them, a list of token "
                         "ids or a list of such lists", "prompt")
    if len(prompts) * n > MAX_SEQUENCES:
        raise BadRequest(f"{len(prompts)} prompts x n {n} asks for {len(prompts) * n} "
                         f"completions; a request may ask for at most {MAX_SEQUENCES}",
                         "prompt")
    return prompts


def is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_prompt(body: dict, template: ChatTemplate) -> list[str]:
    """The conversation in the model's template, ending with the assistant's generation
    prompt."""
    from raytron.pipelines.chat import ChatError, render

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages):
        raise BadRequest("messages must be a non-empty list of {role, content} with roles "
                         "system, user or assistant", "messages")
    try:
        return [render(messages, template, add_generation_prompt=True)]
    except ChatError as error:
        raise BadRequest(str(error), "messages") from None
