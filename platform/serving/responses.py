"""OpenAI's response bodies for finished and streamed completions: choices, chunks,
usage, and token log-probabilities in the legacy completions shape (`tokens`,
`token_logprobs` with null first under echo, `top_logprobs`, `text_offset`) and the
chat shape (`content`: token, logprob, bytes, top_logprobs)."""

from __future__ import annotations

import time
import uuid

from tokenizers import Tokenizer

from raytron.model.engine import Scored
from raytron.platform.serving.completions import Finished
from raytron.platform.serving.requests import ParsedRequest


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(results: list[Finished]) -> dict:
    prompt = sum(len(f.prompt_ids) for f in results)
    completion = sum(len(f.tokens) for f in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class Bodies:
    """The bodies of one request's answer."""

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer, model: str,
                 echoed: list[str]):
        self.parsed, self.tokenizer = parsed, tokenizer
        self.echoed = echoed  # per completion: the prompt text it starts with (echo)
        self.head = {"id": response_id(parsed.chat), "created": int(time.time()),
                     "model": model}

    def response(self, results: list[Finished]) -> dict:
        chat = self.parsed.chat
        choices = []
        for index, finished in enumerate(results):
            choice = {"index": index, "finish_reason": finished.finish_reason,
                      "logprobs": self.logprobs(index, finished)}
            text = self.echoed[index] + finished.text
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {**self.head, "object": "chat.completion" if chat else "text_completion",
                "choices": choices, "usage": usage(results)}

    def chunk(self, index: int, text: str, finished: Finished | None = None) -> dict:
        """A streamed piece of completion `index`; its last one has the finish reason and
        (when asked for) the scores of all its tokens."""
        reason = None if finished is None else finished.finish_reason
        scores = None if finished is None else self.logprobs(index, finished)
        if self.parsed.chat:
            delta = {"role": "assistant", "content": text} if text else {}
            choice = {"index": index, "delta": delta, "finish_reason": reason,
                      "logprobs": scores}
        else:
            choice = {"index": index, "text": text, "finish_reason": reason,
                      "logprobs": scores}
        return {**self.head, "choices": [choice], "object": "chat.completion.chunk"
                if self.parsed.chat else "text_completion"}

    def usage_chunk(self, results: list[Finished]) -> dict:
        return {**self.head, "object": "chat.completion.chunk" if self.parsed.chat else
                "text_completion", "choices": [], "usage": usage(results)}

    def logprobs(self, index: int, finished: Finished) -> dict | None:
        if self.parsed.logprobs is None:
            return None
        if self.parsed.chat:
            return {"content": [self.chat_entry(s) for s in finished.scores]}
        # the scored tokens: those generated and the end token that ended them, if one
        # did (vLLM's shape: lm-evaluation-harness drops the last as the generated one)
        scores: list[Scored | None] = list(finished.scores)
        ids = [score.token for score in finished.scores]
        if self.parsed.echo:
            ids, scores = [*finished.prompt_ids, *ids], [*finished.prompt_scores, *scores]
        tokens = [self.piece(token) for token in ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {"tokens": tokens,
                "token_logprobs": [None if s is None else s.logprob for s in scores],
                "top_logprobs": [None if s is None else {self.piece(t): lp for t, lp in s.top}
                                 for s in scores],
                "text_offset": offsets}

    def chat_entry(self, score: Scored) -> dict:
        return {**self.token_entry(score.token, score.logprob), "top_logprobs": [
            self.token_entry(token, logprob) for token, logprob in score.top]}

    def token_entry(self, token: int, logprob: float) -> dict:
        piece = self.piece(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)
