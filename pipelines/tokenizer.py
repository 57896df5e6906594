"""Byte-level BPE tokenizers from Hugging Face `tokenizers`: trained on the corpus or loaded."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raytron.pipelines.chat import TURN_END, TURN_START

EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """A GPT-2 style byte-level BPE: any byte sequence encodes, nothing maps to <unk>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS, TURN_START, TURN_END],  # the last two: for chat fine-tuning
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def eos_id(tokenizer: Tokenizer) -> int:
    """The document separator: our EOS, or the end-of-text token of a given tokenizer."""
    for token in (EOS, "</s>", "<|end_of_text|>", "<eos>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"the tokenizer has none of the end-of-document tokens {EOS}, </s>, "
        "<|end_of_text|>, <eos>. Fix: add one as a special token, or use another tokenizer"
    )


def end_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a generation: the EOS, and the end of a chat turn when the
    tokenizer has one."""
    turn_end = tokenizer.token_to_id(TURN_END)
    return [eos_id(tokenizer)] + ([] if turn_end is None else [turn_end])


def bos_id(tokenizer: Tokenizer) -> int:
    """The beginning-of-document token, for `data.bos=true`."""
    for token in (BOS, "<s>", "<bos>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"data.bos=true, but the tokenizer has none of {BOS}, <s>, <bos>. Fix: use a tokenizer "
        "with a BOS token (raytron's own have one), or set data.bos=false."
    )


def capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The first texts of a stream up to about `max_bytes` of UTF-8."""
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text
