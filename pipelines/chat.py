"""Chat and prompt-completion samples as tokens and a loss mask, for supervised fine-tuning.

A conversation is rendered to text by a Jinja chat template the way `transformers`
renders `tokenizer.chat_template` (`apply_chat_template`): in an immutable sandbox with
`trim_blocks`, `lstrip_blocks`, loop controls, transformers' `tojson`, `raise_exception`
and `strftime_now`, and the tokenizer's special tokens as variables. So a model's own
template (read from its Hugging Face folder by `model_chat_template`) gives exactly the
text transformers gives, and raytron's ChatML default (`CHATML`) serves models without one.

The loss mask is true on the tokens the model must learn to produce: each assistant turn
and the end token after it. They are found by rendering, for any template: an assistant
turn is what rendering the conversation up to and including it adds to the rendering of
the turns before it with the generation prompt, less trailing whitespace (ChatML's
`content<|im_end|>`, Llama 3's `content<|eot_id|>`). A template must therefore render a
conversation's first turns as a prefix of the whole, as chat templates do; one that does
not is refused with ChatError rather than trained on with a wrong mask.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

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
TEMPLATE_FILE, TOKENIZER_CONFIG_FILE = "chat_template.jinja", "tokenizer_config.json"
MAX_FILE_BYTES = 1 << 20  # a chat template or tokenizer config is kilobytes


class ChatError(ValueError):
    """A sample that is no conversation raytron can train on, or a chat template it cannot
    use; the message says why."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens transformers passes it as variables
    (None: not passed, so the template sees them undefined, as in transformers)."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None

    def variables(self) -> dict[str, str]:
        return {name: value for name in ("bos_token", "eos_token", "pad_token", "unk_token")
                if (value := getattr(self, name)) is not None}


CHATML = ChatTemplate(DEFAULT_TEMPLATE)


@lru_cache(maxsize=8)
def compiled(source: str):
    """The template compiled as transformers compiles it (`_compile_jinja_template`);
    chat templates come from model folders, so they are untrusted code for the sandbox."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        """transformers' filter: Jinja's own escapes HTML characters."""
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except TemplateError as error:
        raise ChatError(f"the chat template does not compile: {error}") from None


def render(messages: Sequence[dict], template: ChatTemplate | str = CHATML,
           add_generation_prompt: bool = False) -> str:
    """The conversation as text; a plain string is a template without special tokens.
    ChatError when the template refuses the conversation (`raise_exception`)."""
    from jinja2.exceptions import TemplateError

    if isinstance(template, str):
        template = ChatTemplate(template)
    try:
        return compiled(template.source).render(
            messages=list(messages), tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **template.variables())
    except TemplateError as error:
        raise ChatError(f"the chat template refuses the conversation: {error}") from None


def checked_messages(messages, learned: bool = True) -> list[dict]:
    """The conversation, or ChatError: a list of {role, content} with known roles, string
    contents, and (when it is `learned` from) at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages is not a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ChatError(f"message {index} has no role among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatError(f"message {index} has no text content")
    if learned and not any(m["role"] == "assistant" for m in messages):
        raise ChatError("the conversation has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def target_spans(messages: Sequence[dict], template: ChatTemplate = CHATML
                 ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: from the
    end of the turns before with the generation prompt to the end of the turn, less
    trailing whitespace (the newline a template puts between turns is no target)."""
    text = render(messages, template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:index], template, add_generation_prompt=True)
        turn = render(messages[: index + 1], template).rstrip()
        if not (text.startswith(prefix) and text.startswith(turn) and len(prefix) <= len(turn)):
            raise ChatError(
                f"the chat template does not render the turns before assistant message {index} "
                "(with the generation prompt) and up to it as prefixes of the whole "
                "conversation, so its loss mask is unknown; fix: use a template that renders "
                "earlier turns the same whatever follows them")
        spans.append((len(prefix), len(turn)))
    return text, spans


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the turn markers as special tokens (one id each, never split)."""
    extended = Tokenizer.from_str(tokenizer.to_str())
    extended.add_special_tokens([AddedToken(TURN_START, special=True),
                                 AddedToken(TURN_END, special=True)])
    return extended


def encode_chat(tokenizer: Tokenizer, messages, template: ChatTemplate = CHATML
                ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, as `apply_chat_template(tokenize=True)` gives
    them, and which of them are targets (a token is one when its text lies in an
    assistant turn)."""
    text, spans = target_spans(checked_messages(messages), template)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    mask = [any(start <= first and last <= end for start, end in spans)
            for first, last in encoding.offsets]
    return encoding.ids, mask


def turn_end_id(tokenizer: Tokenizer, template: ChatTemplate) -> int | None:
    """The token that ends an assistant turn in `template` (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>): a generation ends there. None when a turn ends in no single token."""
    reply = "raytron-reply"
    user = [{"role": "user", "content": "?"}]
    try:
        turn = render([*user, {"role": "assistant", "content": reply}], template)
    except ChatError:
        return None
    ending = turn.rstrip().rsplit(reply, 1)[-1]
    ids = tokenizer.encode(ending, add_special_tokens=False).ids
    return ids[0] if len(ids) == 1 else None


def encode_prompt_completion(tokenizer: Tokenizer, prompt: str, completion: str,
                             end_id: int) -> tuple[list[int], list[bool]]:
    """Prompt then completion and the end token; the completion and the end are targets."""
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise ChatError("a sample needs a text prompt and a non-empty text completion")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    completion_ids = tokenizer.encode(completion, add_special_tokens=False).ids + [end_id]
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def encode_preference(tokenizer: Tokenizer, text: str, eos: int, bos: int | None = None,
                      template: ChatTemplate = CHATML) -> tuple[list[int], list[bool], int]:
    """A preference pair (JSON text of its prompt, chosen and rejected) as TRL's
    DPOTrainer tokenizes it: the prompt followed by the chosen, and by the rejected
    completion (text: each with EOS after it; chat messages: rendered by the template
    after the prompt's turns), learned from where the prompt's own tokens and both
    sequences first differ; BOS first as `encode_sample` puts it. Returns both sequences
    end to end, which of their tokens are learned, and the length of the first.
    ChatError when the pair is no pair or one side adds nothing to the prompt."""
    pair = json.loads(text)
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if all(isinstance(value, str) for value in (prompt, chosen, rejected)):
        if not chosen or not rejected:
            raise ChatError("a pair needs a non-empty chosen and rejected completion")
        texts, end = [prompt, prompt + chosen, prompt + rejected], [eos]
    else:
        prompt = checked_messages(prompt, learned=False)
        answers = [checked_messages(turns) for turns in (chosen, rejected)]
        texts = [render(prompt, template, add_generation_prompt=True),
                 *(render(prompt + turns, template) for turns in answers)]
        end = []
    start = [] if bos is None else [bos]
    head, *sequences = [ids if ids[:1] == start else start + ids for ids in
                        (tokenizer.encode(text, add_special_tokens=False).ids for text in texts)]
    sequences = [ids + end for ids in sequences]
    learned_from = min(len(os.path.commonprefix([head, ids])) for ids in sequences)
    if any(len(ids) <= learned_from for ids in sequences):
        raise ChatError("the chosen or the rejected completion adds no token to the prompt")
    masks = [[index >= learned_from for index in range(len(ids))] for ids in sequences]
    return sequences[0] + sequences[1], masks[0] + masks[1], len(sequences[0])


def sample_text(sample_format: str, text: str) -> str:
    """The text a fine-tuning record trains on, for training a tokenizer on the corpus (a
    run that trains its tokenizer has no model's template: ChatML)."""
    from raytron.pipelines.sources import CHAT, PREFERENCE

    value = json.loads(text)
    try:
        if sample_format == CHAT:
            return render(checked_messages(value))
        if sample_format == PREFERENCE:
            parts = [value[name] for name in ("prompt", "chosen", "rejected")]
            if all(isinstance(part, str) for part in parts):
                return "\n".join(parts)
            return "\n".join(render(checked_messages(part, learned=False)) for part in parts)
        return value["prompt"] + value["completion"]
    except (ChatError, KeyError, TypeError):
        return ""  # not trained on: the tokenizer stage counts it as invalid


def encode_sample(tokenizer: Tokenizer, sample_format: str, text: str, eos: int,
                  bos: int | None = None, template: ChatTemplate = CHATML
                  ) -> tuple[list[int], list[bool]]:
    """A fine-tuning record as the reader hands it (JSON text: a chat's messages, or its
    prompt and completion), with BOS first when given and the chat template did not put it
    there already (Llama 3's does); ChatError when it is no sample."""
    from raytron.pipelines.sources import CHAT

    value = json.loads(text)
    if sample_format == CHAT:
        ids, mask = encode_chat(tokenizer, value, template)
    else:
        ids, mask = encode_prompt_completion(tokenizer, value["prompt"], value["completion"], eos)
    if bos is None or ids[:1] == [bos]:
        return ids, mask
    return [bos, *ids], [False, *mask]


def model_chat_template(folder: Path) -> ChatTemplate | None:
    """The chat template a Hugging Face model folder ships, as transformers loads it:
    `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (its "default"
    when it names several), with the config's special tokens; None when it has none.
    The files are untrusted data: read bounded, parsed as JSON, rendered only in the
    sandbox."""
    config_file, template_file = folder / TOKENIZER_CONFIG_FILE, folder / TEMPLATE_FILE
    config = tokenizer_config(config_file) if config_file.is_file() else {}
    if template_file.is_file():
        source, where = bounded_text(template_file), template_file
    else:
        source, where = named_template(config.get("chat_template"), config_file), config_file
    if source is None:
        return None
    try:
        compiled(source)  # fails here, not at the first sample
    except ChatError as error:
        raise ChatError(f"{where}: {error}; fix: correct the template's Jinja") from None
    tokens = {name: special_token(config.get(name), name, config_file)
              for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return ChatTemplate(source, **tokens)


def save_chat_template(template: ChatTemplate, folder: Path) -> None:
    """`template` where `model_chat_template` reads it back: a run keeps the template it
    trained with beside its tokenizer, for every command that later chats with it."""
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(
        {"chat_template": template.source, **template.variables()}, indent=2) + "\n")


def bounded_text(path: Path) -> str:
    """A small UTF-8 file's text; ChatError for a file too big to be a template or config."""
    with path.open("rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ChatError(f"{path} is over {MAX_FILE_BYTES} bytes, too big for a chat template or "
                        "tokenizer config; fix: remove what is not the template from it, or "
                        "use another model folder")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ChatError(f"{path} is not UTF-8 text; fix: save it as UTF-8") from None


def tokenizer_config(path: Path) -> dict:
    try:
        config = json.loads(bounded_text(path))
    except json.JSONDecodeError as error:
        raise ChatError(f"{path} is not JSON ({error}); fix: repair or replace the file"
                        ) from None
    if not isinstance(config, dict):
        raise ChatError(f"{path} is not a JSON object; fix: repair or replace the file")
    return config


def named_template(value, path: Path) -> str | None:
    """The config's `chat_template`: a string, or a list of {"name", "template"} of which
    transformers uses "default"."""
    if isinstance(value, list):
        templates = {entry.get("name"): entry.get("template") for entry in value
                     if isinstance(entry, dict)}
        if "default" not in templates:
            raise ChatError(f"the chat_template list in {path} has no template named "
                            "\"default\"; fix: name the one to train with \"default\"")
        value = templates["default"]
    if value is not None and not isinstance(value, str):
        raise ChatError(f"the chat_template in {path} is a {type(value).__name__}, not Jinja "
                        "text; fix: make it a string, or write the template to "
                        f"{TEMPLATE_FILE} beside it")
    return value


def special_token(value, name: str, path: Path) -> str | None:
    """A special token as a tokenizer config writes it: its text, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ChatError(f"{name} in {path} is neither text nor an AddedToken with text "
                        "content; fix: make it the token's text")
    return value
