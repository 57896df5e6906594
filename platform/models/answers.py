"""Exact answers of a chat model: greedy replies to chats it never trained on, compared
with the reply each chat holds. The fine-tuning figure the README quotes (reverse-words:
how many of 100 held-out chats a model answers exactly, before and after
`configs/sft-tiny.yaml`) is this count. And its preference figure (reverse-words-pairs:
of 100 held-out pairs, how many a model gives its chosen completion the higher
log-probability, before and after `configs/dpo-lora-tiny.yaml`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raytron.model.gpt import IGNORE
from raytron.pipelines.chat import CHATML, encode_preference, render
from raytron.pipelines.embedded import embedded_texts
from raytron.pipelines.sources import is_validation
from raytron.pipelines.tokenizer import eos_id
from raytron.platform.models.loading import load_model


def held_out_samples(corpus: str, val_share: float, count: int) -> list:
    """The first `count` samples (chats, pairs) of an embedded corpus that a run with
    `data.val_share` held out of training (by the content hash training uses)."""
    return [json.loads(text) for text in embedded_texts(corpus)
            if is_validation(text, val_share)][:count]


def preferred_pairs(run: str | Path, pairs: list[dict]) -> int:
    """Of preference `pairs`, how many the model at `run` (on the CPU) gives its chosen
    completion a higher log-probability than its rejected one, each tokenized as DPO
    training tokenizes it."""
    model = load_model(run, device="cpu")
    source, preferred = model.source, 0
    for pair in pairs:
        ids, learned, first = encode_preference(
            model.tokenizer, json.dumps(pair), eos_id(model.tokenizer), source.bos_id,
            source.chat_template or CHATML)
        logps = []
        for part in (slice(0, first), slice(first, None)):
            tokens = torch.tensor([ids[part]])
            labels = tokens[:, 1:].masked_fill(~torch.tensor([learned[part][1:]]), IGNORE)
            with torch.no_grad():
                logps.append(-model.model(tokens[:, :-1], labels=labels).item())
        preferred += logps[0] > logps[1]
    return preferred


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
