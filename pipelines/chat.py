"""Chat and prompt-completion samples as tokens and a loss mask, for supervised fine-tuning.

A conversation is rendered to text by a Jinja chat template, the form `transformers`
uses (`tokenizer.chat_template`, rendered in a sandbox with `trim_blocks` and
`lstrip_blocks`), so that `apply_chat_template` in transformers gives exactly the text
raytron trains on. The loss mask is true on the tokens the model must learn to produce:
each assistant turn and the end token after it. They are found by rendering: an
assistant turn is what the conversation up to it adds after the generation prompt, up
to and including its end text; a template must therefore render a conversation's first
turns as a prefix of the whole, as chat templates do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

from tokenizers import AddedToken, Tokenizer

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
# ChatML: every turn is <|im_start|>role\ncontent<|im_end|>\n
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A sample that is no conversation raytron can train on; the message says why."""


@lru_cache(maxsize=8)
def compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


def render(messages: Sequence[dict], template: str = DEFAULT_TEMPLATE,
           add_generation_prompt: bool = False) -> str:
    return compiled(template).render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt)


def checked_messages(messages) -> list[dict]:
    """The conversation, or ChatError: a list of {role, content} with known roles, string
    contents, and at least one assistant turn to learn from."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages is not a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ChatError(f"message {index} has no role among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"message {index} has no text content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError("the conversation has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def target_spans(messages: Sequence[dict], template: str = DEFAULT_TEMPLATE,
                 end_text: str = TURN_END) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, each up
    to and including `end_text`."""
    text = render(messages, template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:index], template, add_generation_prompt=True)
        end = text.find(end_text, len(prefix) + len(message["content"]))
        if not text.startswith(prefix) or end < 0:
            raise ChatError("the chat template does not render the conversation's first turns "
                            f"as a prefix of the whole, or no {end_text} ends an assistant turn")
        spans.append((len(prefix), end + len(end_text)))
    return text, spans


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the turn markers as special tokens (one id each, never split)."""
    extended = Tokenizer.from_str(tokenizer.to_str())
    extended.add_special_tokens([AddedToken(TURN_START, special=True),
                                 AddedToken(TURN_END, special=True)])
    return extended


def encode_chat(tokenizer: Tokenizer, messages, template: str = DEFAULT_TEMPLATE,
                end_text: str = TURN_END) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and which of them are targets (a token is
    one when its text lies in an assistant turn)."""
    text, spans = target_spans(checked_messages(messages), template, end_text)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    mask = [any(start <= first and last <= end for start, end in spans)
            for first, last in encoding.offsets]
    return encoding.ids, mask


def encode_prompt_completion(tokenizer: Tokenizer, prompt: str, completion: str,
                             end_id: int) -> tuple[list[int], list[bool]]:
    """Prompt then completion and the end token; the completion and the end are targets."""
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise ChatError("a sample needs a text prompt and a non-empty text completion")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    completion_ids = tokenizer.encode(completion, add_special_tokens=False).ids + [end_id]
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def sample_text(sample_format: str, text: str) -> str:
    """The text a fine-tuning record trains on, for training a tokenizer on the corpus."""
    from raytron.pipelines.sources import CHAT

    value = json.loads(text)
    try:
        if sample_format == CHAT:
            return render(checked_messages(value))
        return value["prompt"] + value["completion"]
    except (ChatError, KeyError, TypeError):
        return ""  # not trained on: the tokenizer stage counts it as invalid


def encode_sample(tokenizer: Tokenizer, sample_format: str, text: str, eos: int,
                  bos: int | None = None) -> tuple[list[int], list[bool]]:
    """A fine-tuning record as the reader hands it (JSON text: a chat's messages, or its
    prompt and completion), with BOS first when given; ChatError when it is no sample."""
    from raytron.pipelines.sources import CHAT

    value = json.loads(text)
    if sample_format == CHAT:
        ids, mask = encode_chat(tokenizer, value)
    else:
        ids, mask = encode_prompt_completion(tokenizer, value["prompt"], value["completion"], eos)
    if bos is None:
        return ids, mask
    return [bos, *ids], [False, *mask]
