"""The data of raytron's own lm-evaluation-harness tasks, built from the Python language
reference that every CPython carries (raytron's embedded pre-training corpus), so that
they need no file and no network, and the tiny preset's progress shows as accuracy:

- `raytron_last_word`: a paragraph without its last word, and that word (a cloze task,
  as LAMBADA): accuracy is how often greedy decoding gives exactly the word.
- `raytron_next_line`: a line of the reference, and four lines to follow it, one of
  them the line that does (multiple choice; chance is 25%).
- `raytron_last_sentence`: a paragraph without its last sentence, and four sentences
  that end paragraphs, one of them the one that ends this one (multiple choice, as
  HellaSwag: a long context shared by choices of many tokens; chance is 25%).
- `raytron_word_choice`: a paragraph without its last word, and four words of about its
  length that end paragraphs, one of them the word that ends this one (multiple choice;
  chance is 25%, and a model that knows nothing scores it).

The same items every time (a fixed seed): `ITEMS` of each, drawn from all candidates.
"""

import random
import re

import datasets

from raytron.pipelines.embedded import PYTHON_REFERENCE, embedded_texts

ITEMS = 300
CHOICES = 4
ENDS_WITH_A_WORD = re.compile(r"(.{60,}\S) ([A-Za-z]{3,})\.")
SENTENCE_END = re.compile(r"(?<=[.!?]) (?=[A-Z])")
LONGEST_SENTENCE = 160  # characters of a choice: it fits the tiny preset's 128 tokens


def last_word(**_metadata) -> datasets.DatasetDict:
    return test_split(paragraph_ends())


def word_choice(**_metadata) -> datasets.DatasetDict:
    ends = paragraph_ends()
    by_length: dict[int, list[str]] = {}
    for end in ends:
        by_length.setdefault(len(end["target"]), []).append(end["target"])
    generator = random.Random(2)
    candidates = []
    for end in ends:
        choices = [end["target"], *wrong_words(end["target"], by_length, generator)]
        generator.shuffle(choices)
        candidates.append({"context": end["context"], "choices": choices,
                           "label": choices.index(end["target"])})
    return test_split(candidates)


def wrong_words(word: str, by_length: dict[int, list[str]], generator: random.Random
                ) -> list[str]:
    """`CHOICES - 1` other words that end paragraphs, of about the length of `word`,
    each drawn as often as it ends one: the right word and the wrong ones come from one
    distribution, so that a model that knows nothing (it prefers words of fewer tokens:
    frequent ones) is at chance."""
    for spread in range(max(by_length)):
        pool = [other for length in range(len(word) - spread, len(word) + spread + 1)
                for other in by_length.get(length, []) if other != word]
        if len(set(pool)) >= CHOICES - 1:
            break
    chosen: list[str] = []
    while len(chosen) < CHOICES - 1:
        other = generator.choice(pool)
        if other not in chosen:
            chosen.append(other)
    return chosen


def paragraph_ends() -> list[dict]:
    """Each paragraph that ends with a word and a full stop: the text before the word,
    and the word with its space (" word")."""
    ends = []
    for text in embedded_texts(PYTHON_REFERENCE):
        for paragraph in text.split("\n\n"):
            found = ENDS_WITH_A_WORD.fullmatch(" ".join(paragraph.split()))
            if found:
                ends.append({"context": found[1], "target": " " + found[2]})
    return ends


def last_sentence(**_metadata) -> datasets.DatasetDict:
    """Paragraphs of three sentences or more: all but the last, and four last sentences
    of paragraphs, this one's among them (the shape of HellaSwag's questions: a long
    context, choices of a sentence each)."""
    paragraphs = []
    for text in embedded_texts(PYTHON_REFERENCE):
        for paragraph in text.split("\n\n"):
            sentences = SENTENCE_END.split(" ".join(paragraph.split()))
            if len(sentences) >= 3 and sum(map(len, sentences)) > 150 and \
                    len(sentences[-1]) <= LONGEST_SENTENCE:
                paragraphs.append((" ".join(sentences[:-1]), " " + sentences[-1]))
    return test_split(with_wrong_choices(paragraphs, "context", 3))


def next_line(**_metadata) -> datasets.DatasetDict:
    pairs = []
    for text in embedded_texts(PYTHON_REFERENCE):
        lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= 20]
        pairs += zip(lines, lines[1:], strict=False)
    return test_split(with_wrong_choices(pairs, "line", 1))


def with_wrong_choices(pairs: list[tuple[str, str]], key: str, seed: int) -> list[dict]:
    """Each (context, right choice) as a sample of `CHOICES`: the right one, and others
    drawn from the right choices of the other samples."""
    pool = sorted({right for _, right in pairs})
    generator = random.Random(seed)
    candidates = []
    for context, right in pairs:
        others = [other for other in generator.sample(pool, CHOICES + 1)
                  if other != right][: CHOICES - 1]
        choices = [right, *others]
        generator.shuffle(choices)
        candidates.append({key: context, "choices": choices, "label": choices.index(right)})
    return candidates


def test_split(candidates: list[dict]) -> datasets.DatasetDict:
    items = random.Random(0).sample(candidates, min(ITEMS, len(candidates)))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})
