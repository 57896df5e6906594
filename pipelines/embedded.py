"""Corpora that ship with raytron, so that its commands run with no file and no network:
the Python language reference that every CPython carries (pre-training), and
reverse-words, a synthetic chat task (fine-tuning): the user gives three to five words,
the assistant says them in reverse order, which a pre-trained model cannot do."""

from __future__ import annotations

import json
import random

PYTHON_REFERENCE, REVERSE_WORDS = "python-reference", "reverse-words"
FORMATS = {PYTHON_REFERENCE: "text", REVERSE_WORDS: "chat"}  # what their records are
WORDS = ("apple", "river", "stone", "cloud", "green", "seven", "table", "light", "music",
         "paper", "night", "house", "water", "bread", "glass", "horse", "smile", "train",
         "dream", "field")
REVERSE_WORDS_SAMPLES = 40_000


def embedded_texts(name: str) -> list[str]:
    """The records of an embedded corpus: texts, or chat samples as JSON message lists."""
    if name == REVERSE_WORDS:
        return [json.dumps(messages) for messages in reverse_words(REVERSE_WORDS_SAMPLES)]
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def reverse_words(count: int, seed: int = 0) -> list[list[dict]]:
    generator = random.Random(seed)
    chats = []
    for _ in range(count):
        words = generator.sample(WORDS, generator.randint(3, 5))
        chats.append([{"role": "user", "content": "Reverse: " + " ".join(words)},
                      {"role": "assistant", "content": " ".join(reversed(words))}])
    return chats
