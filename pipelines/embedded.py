"""Corpora that ship with raytron, so that its commands run with no file and no network:
the Python language reference that every CPython carries (pre-training), reverse-words,
a synthetic chat task (fine-tuning): the user gives three to five words, the assistant
says them in reverse order, which a pre-trained model cannot do; and reverse-words-pairs,
the same task as preference pairs (DPO): the words reversed are chosen over the words
as given, between which a pre-trained model is about indifferent."""

from __future__ import annotations

import json
import random

PYTHON_REFERENCE, REVERSE_WORDS = "python-reference", "reverse-words"
REVERSE_WORDS_PAIRS = "reverse-words-pairs"
FORMATS = {PYTHON_REFERENCE: "text", REVERSE_WORDS: "chat",  # what their records are
           REVERSE_WORDS_PAIRS: "preference"}
WORDS = ("apple", "river", "stone", "cloud", "green", "seven", "table", "light", "music",
         "paper", "night", "house", "water", "bread", "glass", "horse", "smile", "train",
         "dream", "field")
REVERSE_WORDS_SAMPLES = 40_000


def embedded_texts(name: str) -> list[str]:
    """The records of an embedded corpus: texts, chat samples as JSON message lists, or
    preference pairs as JSON objects."""
    if name == REVERSE_WORDS:
        return [json.dumps(messages) for messages in reverse_words(REVERSE_WORDS_SAMPLES)]
    if name == REVERSE_WORDS_PAIRS:
        return [json.dumps(pair) for pair in reverse_words_pairs(REVERSE_WORDS_SAMPLES)]
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


def reverse_words_pairs(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Text pairs: the words reversed are chosen, the words as given (an echo) rejected."""
    generator = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = generator.sample(WORDS, generator.randint(3, 5))
        pairs.append({"prompt": f"Reverse: {' '.join(words)}\nReversed:",
                      "chosen": " " + " ".join(reversed(words)), "rejected": " " + " ".join(words)})
    return pairs
