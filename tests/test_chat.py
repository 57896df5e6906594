"""Chat samples for fine-tuning: the template renders as transformers renders it, and the
loss mask covers exactly the assistant turns and their end tokens."""

import itertools
import json

import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from raytron.pipelines.chat import (
    CHATML,
    DEFAULT_TEMPLATE,
    MAX_FILE_BYTES,
    TURN_END,
    ChatError,
    ChatTemplate,
    encode_chat,
    encode_prompt_completion,
    encode_sample,
    model_chat_template,
    render,
    save_chat_template,
    turn_end_id,
    with_chat_tokens,
)
from raytron.pipelines.sources import CHAT

from model_runs import small_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Which keyword starts a loop?"},
    {"role": "assistant", "content": "for"},
    {"role": "user", "content": "And a function?"},
    {"role": "assistant", "content": "def, then a name"},
]


# The chat templates Hugging Face models ship, verbatim: the Jinja text of `chat_template`
# in their tokenizer_config.json, and the special tokens it names.

# meta-llama/Llama-3.2-1B-Instruct (the same text as Llama-3.2-3B-Instruct's): BOS first,
# a system turn with today's date (strftime_now), headers, and <|eot_id|> ending each turn.
LLAMA_3_2_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim)
LLAMA_3_2_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
LLAMA_3_2_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>")

# Qwen/Qwen2.5-0.5B-Instruct (all Qwen2.5 Instruct sizes ship it): ChatML with a default
# system message, and tool blocks; no BOS.
QWEN_2_5_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim)
QWEN_2_5_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
QWEN_2_5_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


# family: (template, its special tokens by name, the tokens to add, the end of a turn,
# what precedes an assistant turn's content)
FAMILIES = {
    "llama-3.2": (LLAMA_3_2_TEMPLATE, LLAMA_3_2_TOKENS, LLAMA_3_2_SPECIAL, "<|eot_id|>",
                  "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen-2.5": (QWEN_2_5_TEMPLATE, QWEN_2_5_TOKENS, QWEN_2_5_SPECIAL, "<|im_end|>",
                 "<|im_start|>assistant\n"),
}


@pytest.fixture(scope="module")
def base_tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module")
def tokenizer(base_tokenizer):
    return with_chat_tokens(base_tokenizer)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, base_tokenizer):
    """A model family's template, a tokenizer with its special tokens, the same as
    transformers' tokenizer, its end of turn and assistant header."""
    source, tokens, special, end, header = FAMILIES[request.param]
    ours = Tokenizer.from_str(base_tokenizer.to_str())
    ours.add_special_tokens([AddedToken(token, special=True) for token in special])
    theirs = PreTrainedTokenizerFast(tokenizer_object=ours, chat_template=source, **tokens)
    return ChatTemplate(source, **tokens), ours, theirs, end, header


def runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of consecutive target tokens."""
    pairs = zip(ids, mask, strict=True)
    return [[i for i, _ in run] for target, run in itertools.groupby(pairs, key=lambda p: p[1])
            if target]


def test_the_mask_covers_the_assistant_turns_and_their_end_tokens(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids, skip_special_tokens=False) == render(CONVERSATION)
    targets = [i for i, m in zip(ids, mask, strict=True) if m]
    end = tokenizer.token_to_id(TURN_END)
    assert tokenizer.decode(targets, skip_special_tokens=False) == \
        f"for{TURN_END}def, then a name{TURN_END}"
    assert targets.count(end) == 2 and ids.count(end) == 5  # system and user ends: no targets
    first = mask.index(True)  # by hand: nothing before the first answer is a target
    assert tokenizer.decode(ids[:first], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n")


def test_transformers_renders_the_same_text(tokenizer):
    theirs = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=DEFAULT_TEMPLATE)
    assert theirs.apply_chat_template(CONVERSATION, tokenize=False) == render(CONVERSATION)
    prompt = CONVERSATION[:2]
    assert theirs.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        render(prompt, add_generation_prompt=True)
    assert theirs.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"] == \
        encode_chat(tokenizer, CONVERSATION)[0]


def test_prompt_completion_targets_the_completion_and_its_end(tokenizer):
    end = tokenizer.token_to_id(TURN_END)
    ids, mask = encode_prompt_completion(tokenizer, "2 + 2 =", " 4", end)
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m],
                            skip_special_tokens=False) == f" 4{TURN_END}"
    assert not any(mask[: len(tokenizer.encode("2 + 2 =").ids)])


@pytest.mark.parametrize("messages", [
    [], "text", [{"role": "user", "content": "hi"}],
    [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}],
])
def test_what_is_no_conversation_is_refused(tokenizer, messages):
    with pytest.raises(ChatError):
        encode_chat(tokenizer, messages)


def test_a_models_template_renders_as_in_transformers(family):
    template, _, theirs, _, _ = family
    assert render(CONVERSATION, template) == theirs.apply_chat_template(CONVERSATION,
                                                                        tokenize=False)
    prompt = CONVERSATION[:2]
    assert render(prompt, template, add_generation_prompt=True) == \
        theirs.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def test_a_models_template_gives_transformers_ids(family):
    template, ours, theirs, _, _ = family
    expected = theirs.apply_chat_template(CONVERSATION, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert encode_chat(ours, CONVERSATION, template)[0] == list(expected)


def test_a_models_template_masks_exactly_the_answers_and_their_end_tokens(family):
    template, ours, _, end, header = family
    ids, mask = encode_chat(ours, CONVERSATION, template)

    def text(part: list[int]) -> str:
        return ours.decode(part, skip_special_tokens=False)

    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [text(run) for run in runs(ids, mask)] == [answer + end for answer in answers]
    before_first = text(ids[: mask.index(True)])
    assert before_first.endswith(header) and CONVERSATION[0]["content"] in before_first


def test_bos_is_first_once_whether_the_template_puts_it_there_or_not(family):
    """Llama 3's template renders BOS itself; Qwen's has none, so the sample gets one."""
    template, ours, _, end, _ = family
    bos, eos = ours.token_to_id("<|begin_of_text|>"), ours.token_to_id(end)
    ids, mask = encode_sample(ours, CHAT, json.dumps(CONVERSATION), eos, bos, template)
    chat_ids, chat_mask = encode_chat(ours, CONVERSATION, template)
    assert ids.count(bos) == 1 and ids[0] == bos and not mask[0]
    assert ids[-len(chat_ids):] == chat_ids and mask[-len(chat_mask):] == chat_mask


@pytest.mark.parametrize("source", [
    "{{ raise_exception('only user turns') }}",  # the template refuses the conversation
    # the end of the conversation differs from the end of a turn inside it: no known mask
    DEFAULT_TEMPLATE + "{% if messages[-1]['role'] == 'assistant' %}<eos>{% endif %}",
    "{% for message in messages %}",  # does not compile
])
def test_a_template_whose_mask_is_unknown_is_refused(tokenizer, source):
    with pytest.raises(ChatError):
        encode_chat(tokenizer, CONVERSATION, ChatTemplate(source))


def test_the_template_of_a_saved_model_folder_is_read(family, tmp_path):
    template, _, theirs, _, _ = family
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()  # where transformers 5 writes it
    assert model_chat_template(tmp_path) == template
    theirs.save_pretrained(tmp_path / "legacy", save_jinja_files=False)  # in the config
    assert model_chat_template(tmp_path / "legacy") == template


def test_a_named_template_list_and_added_token_dicts_are_read(tmp_path):
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
              "unk_token": None,
              "chat_template": [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": DEFAULT_TEMPLATE}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert model_chat_template(tmp_path) == ChatTemplate(DEFAULT_TEMPLATE, bos_token="<s>",
                                                         eos_token="</s>")


def test_a_folder_without_a_template_has_none(tokenizer, tmp_path):
    assert model_chat_template(tmp_path) is None
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    assert model_chat_template(tmp_path) is None


@pytest.mark.parametrize("files, named", [
    ({"chat_template.jinja": "{# #}" * MAX_FILE_BYTES}, "chat_template.jinja"),
    ({"tokenizer_config.json": json.dumps({"chat_template": 42})}, "make it a string"),
    ({"tokenizer_config.json": json.dumps({"chat_template": {"default": "x"}})},
     "make it a string"),
    ({"tokenizer_config.json": json.dumps({"chat_template": [{"name": "a", "template": "x"}]})},
     '"default"'),
    ({"tokenizer_config.json": "{not json"}, "not JSON"),
    ({"chat_template.jinja": "{% if %}"}, "does not compile"),
])
def test_an_oversized_or_malformed_template_is_refused(tmp_path, files, named):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ChatError, match=named):
        model_chat_template(tmp_path)


def test_a_turn_ends_in_the_templates_own_token(family, tokenizer):
    template, ours, _, end, _ = family
    assert turn_end_id(ours, template) == ours.token_to_id(end)
    assert turn_end_id(tokenizer, CHATML) == tokenizer.token_to_id(TURN_END)


def test_the_pipeline_tokenizes_chats_in_the_runs_template_and_caches_them_apart(family,
                                                                                 tmp_path):
    """The Ray Data stage encodes each chat as `encode_chat` does in the run's template;
    the token cache keeps chats of another template in another folder."""
    import pyarrow as pa

    from raytron.pipelines.stream import Tokenize
    from raytron.pipelines.token_cache import TokenCache

    template, ours, _, end, _ = family
    eos = ours.token_to_id(end)
    batch = pa.table({"text": [json.dumps(CONVERSATION)], "reason": [None]})
    table = Tokenize(ours.to_str(), eos, None, CHAT, template)(batch)
    assert (table.column("tokens").to_pylist()[0], table.column("targets").to_pylist()[0]) \
        == tuple(encode_chat(ours, CONVERSATION, template))
    folders = {TokenCache.of(str(tmp_path), ours.to_str(), eos, None, CHAT, t).folder
               for t in (template, CHATML)}
    assert len(folders) == 2


def test_a_saved_template_reads_back_as_it_was(family, tmp_path):
    template = family[0]
    save_chat_template(template, tmp_path)
    assert model_chat_template(tmp_path) == template
