"""Exact answers of a chat model: greedy replies to chats it never trained on, compared
with the reply each chat holds. The fine-tuning figure the README quotes (reverse-words:
how many of 100 held-out chats a model answers exactly, before and after
`configs/sft-tiny.yaml`) is this count."""

from __future__ import annotations

import json
from pathlib import Path

from raytron.pipelines.chat import CHATML, render
from raytron.pipelines.embedded import embedded_texts
from raytron.pipelines.sources import is_validation
from raytron.platform.models.loading import load_model


def held_out_chats(corpus: str, val_share: float, count: int) -> list[list[dict]]:
    """The first `count` chats of an embedded corpus that a run with `data.val_share`
    held out of training (by the content hash training uses)."""
    return [json.loads(text) for text in embedded_texts(corpus)
            if is_validation(text, val_share)][:count]


def exact_answers(run: str | Path, chats: list[list[dict]], max_new_tokens: int = 24) -> int:
    """How many `chats` the model at `run` answers, greedily and on the CPU, with exactly
    the reply of their second message when given their first."""
    model = load_model(run, device="cpu")
    template = model.source.chat_template or CHATML
    answers = model.generate([render(chat[:1], template, add_generation_prompt=True)
                              for chat in chats],
                             max_new_tokens=max_new_tokens, greedy=True, batch_size=50)
    return sum(answer.text == chat[1]["content"]
               for answer, chat in zip(answers, chats, strict=True))
