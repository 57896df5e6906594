"""Chat samples for fine-tuning: the template renders as transformers renders it, and the
loss mask covers exactly the assistant turns and their end tokens."""

import pytest
from transformers import PreTrainedTokenizerFast

from raytron.pipelines.chat import (
    DEFAULT_TEMPLATE,
    TURN_END,
    ChatError,
    encode_chat,
    encode_prompt_completion,
    render,
    with_chat_tokens,
)

from model_runs import small_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Which keyword starts a loop?"},
    {"role": "assistant", "content": "for"},
    {"role": "user", "content": "And a function?"},
    {"role": "assistant", "content": "def, then a name"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return with_chat_tokens(small_tokenizer())


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
