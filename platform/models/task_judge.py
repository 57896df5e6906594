"""lm-evaluation-harness tasks scored during training (`train.eval_tasks`).

The workers hold the trained weights, sharded in the training layout; lm_eval wants a
model object it can ask. So the asking and the answering are split: the `TaskJudge`
runs lm_eval with a model that only records what it is asked (the (context ids,
continuation ids) pairs of every request, tokenized as `raytron eval --tasks` tokenizes
them), the workers score those pairs in their layout (`worker/task_scoring.py`), and
the judge runs lm_eval again with a model that answers from those scores: lm_eval's own
task definitions, few-shot sampling (seeded: the same requests every time), filters and
metrics decide the numbers, as they do in process and through `raytron serve`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Sequence

from tokenizers import Tokenizer

from raytron.model.scoring import ContinuationScore, scored_rows
from raytron.pipelines.tokenizer import bos_id, end_ids
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.models.harness import Pairs, RaytronTokens
from raytron.platform.models.task_eval import (
    offline_unless_hub_answers,
    score_tasks,
    task_manager,
    task_metrics,
)
from raytron.platform.storage.metric_names import EVAL_TASKS

KEY = "train.eval_tasks"
Pair = tuple[tuple[int, ...], tuple[int, ...]]
UNANSWERED = ContinuationScore(0.0, False)


class AnsweredLM(RaytronTokens):
    """A model that answers each pair from `answers`; without them, it records the pairs
    it is asked and answers each with `UNANSWERED`."""

    def __init__(self, tokenizer: Tokenizer, bos: int | None, ends: Sequence[int],
                 max_length: int, answers: dict[Pair, ContinuationScore] | None = None):
        super().__init__(tokenizer, bos, ends, max_length)
        self.answers = answers
        self.asked: dict[Pair, None] = {}  # in the order first asked

    def score_pairs(self, pairs: Pairs, on_batch: Callable[[int], None]
                    ) -> list[ContinuationScore]:
        keys = [(tuple(context), tuple(continuation)) for context, continuation in pairs]
        on_batch(len(keys))
        if self.answers is None:
            self.asked.update(dict.fromkeys(keys))
            return [UNANSWERED] * len(keys)
        return [self.answers[key] for key in keys]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise ConfigError([f"{KEY}: a task that generates text (output_type "
                           "generate_until) is not scored during training. Fix: score it "
                           "with raytron eval RUN --tasks NAME, and keep train.eval_tasks to "
                           "tasks that score continuations (multiple_choice, loglikelihood, "
                           "loglikelihood_rolling)."])


class TaskJudge:
    """The requests of a run's `train.eval_tasks`, and the metrics of their scores.

    Built twice per run: by `settle` (an unknown task, a missing file or a continuation
    longer than data.seq_len is a ConfigError before any Ray resource is taken) and as
    the run's Ray actor beside the tracker."""

    def __init__(self, config: RaytronConfig, tokenizer_json: str):
        t = config.train
        self.tasks, self.limit, self.fewshot = list(t.eval_tasks), t.eval_task_limit, \
            t.eval_task_fewshot
        tokenizer = Tokenizer.from_str(tokenizer_json)
        self.width = config.data.seq_len  # the training shape: no sequence is longer
        self.model_args = (tokenizer, bos_id(tokenizer) if config.data.bos else None,
                           end_ids(tokenizer), self.width)
        offline_unless_hub_answers()
        self.manager = task_manager(self.tasks, [], KEY, t.eval_task_data_dir)
        recorder = AnsweredLM(*self.model_args)
        self.evaluate(recorder)
        self.pairs = list(recorder.asked)
        try:
            scored_rows(self.pairs, self.width)
        except ValueError as error:
            raise ConfigError([f"{KEY}: {error} (data.seq_len={self.width}). Fix: leave out "
                               "the task, or train with a longer data.seq_len."]) from None

    def requests(self) -> list[Pair]:
        """Every (context ids, continuation ids) pair the tasks ask about, once each."""
        return self.pairs

    def metrics(self, scores: Sequence[tuple[float, bool]]) -> dict[str, float]:
        """`Eval/<task>/<metric>` from the scores of `requests()`, in their order."""
        answers = {pair: ContinuationScore(float(logprob), bool(greedy))
                   for pair, (logprob, greedy) in zip(self.pairs, scores, strict=True)}
        return task_metrics(self.evaluate(AnsweredLM(*self.model_args, answers)), EVAL_TASKS)

    def evaluate(self, model: AnsweredLM) -> dict:
        """lm_eval's results; its progress bars and notes, and what its probe of the
        current directory's git commit says, kept off the training's console."""
        with silenced_stderr(), contextlib.redirect_stdout(io.StringIO()):
            return score_tasks(model, self.tasks, self.manager, self.fewshot, self.limit,
                               log_samples=False, key=KEY)

    def judge(self, step: int, scores: Sequence[tuple[float, bool]], tracker) -> None:
        """As the run's actor: the metrics of step `step`'s scores to the tracker (a
        failure is a note on the run, not the end of training)."""
        import ray

        try:
            metrics = self.metrics(scores)
        except Exception as error:  # noqa: BLE001 (the run trains on; the note says why)
            ray.get(tracker.note.remote(step, "eval_tasks", f"scoring {KEY} at step {step} "
                                        f"failed: {type(error).__name__}: {error}"))
            return
        ray.get(tracker.log.remote(step, metrics))

    def ready(self) -> bool:
        """Answered after every call before it: every judgement is in the tracker."""
        return True


@contextlib.contextmanager
def silenced_stderr():
    """This process's stderr (file descriptor 2, which subprocesses inherit) to nowhere
    for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
