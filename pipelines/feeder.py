"""The DataFeeder: one Ray actor that turns the token stream into each step's global batch.

Batches are numbered by optimizer step and cut from the stream in order, so the batch of
step s does not depend on how many replicas read it: each data-parallel rank takes its
contiguous slice. A background thread keeps `prefetch_steps` batches ready so training
never waits on tokenization, and remembers the cursor where each batch begins, which is
what a checkpoint of that step stores.

It also keeps the batches made since the last committed checkpoint (up to
`KEPT_BYTES`): when a worker group fails and a new one resumes from that checkpoint, the
feeder, which outlives worker groups, serves them again at once instead of reading and
tokenizing from the checkpoint's cursor anew (the same batches: the cursors match).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np

from raytron.pipelines.file_lists import recorded_lists
from raytron.pipelines.mixture import DataExhausted, MixtureReader
from raytron.pipelines.packing import Batch, Cursor
from raytron.pipelines.stream import ALL, VALIDATION, StreamSpec, token_docs

KEPT_BYTES = 256 * 2**20  # batches kept for a restarted worker group, at most


class DataUnusable(RuntimeError):
    """The data pipeline failed in a way that reading again cannot change (a source with
    no usable document, a tokenizer that cannot encode it): a restart would fail the same."""


def handed_over(error: BaseException) -> BaseException:
    """The feeder's error as the workers get it: `DataExhausted` and `DataUnusable` (for
    errors of the data itself, which no restart fixes) keep their class across Ray, so
    that the controller ends the run at once instead of restarting it; the rest are a
    `RuntimeError` a restart may cure (storage that did not answer, a lost actor)."""
    text = f"the data pipeline failed: {type(error).__name__}: {error}"
    if isinstance(error, DataExhausted):
        return DataExhausted(str(error))
    if isinstance(error, (ValueError, TypeError, LookupError, UnicodeError)):
        return DataUnusable(text)
    return RuntimeError(text)


def batch_bytes(batch: Batch) -> int:
    return sum(a.nbytes for a in (batch.tokens, batch.targets, batch.positions) if a is not None)


class DataFeeder:
    def __init__(self, spec: StreamSpec, seq_len: int, global_batch: int,
                 prefetch_steps: int, val_sequences: int):
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset chatter
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        self.spec = spec
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.prefetch_steps = prefetch_steps
        self.val_sequences = val_sequences
        self.condition = threading.Condition()
        self.ready: OrderedDict[int, tuple[dict, Batch]] = OrderedDict()
        self.wanted = 0  # highest step a worker asked for
        self.next_step = 0  # the step the producer makes next
        self.generation = 0  # bumped by seek(); an older producer thread stops
        self.origin: tuple[int, dict] | None = None  # where that thread began reading
        self.kept_from = 0  # batches from here on are kept: the last committed checkpoint's
        self.checkpointing = 0  # the step of the checkpoint written last (maybe uncommitted)
        self.error: BaseException | None = None
        self.failed_at: tuple[int, dict] | None = None  # (step, cursor) the error stopped at
        self.produced_tokens = 0
        self.busy_seconds = 0.0
        self.validation_set: Batch | None = None
        self.validation_lock = threading.Lock()

    def seek(self, step: int, cursor: dict, ahead: bool = False) -> bool:
        """Serve batches from `step` on, reading from `cursor` (a checkpoint's, or the start).
        True when they are still held (a worker group resuming from a checkpoint that this
        feeder made the batches after) or being made (asked for `ahead` by the driver,
        before the first workers asked: ignored after that): nothing is re-read."""
        cursor = {key: value for key, value in cursor.items() if key != "files"}
        with self.condition:
            if ahead and self.origin is not None:
                return False
            self.kept_from = self.checkpointing = step
            held = step in self.ready and self.ready[step][0] == cursor
            begun_there = self.origin == (step, cursor) and (
                step in self.ready or self.next_step == step)
            if self.error is None and (held or begun_there):
                for old in [s for s in self.ready if s < step]:
                    del self.ready[old]
                self.wanted = step
                self.condition.notify_all()
                return True
            self.generation += 1
            self.ready.clear()
            self.error = self.failed_at = None
            self.wanted = self.next_step = step
            self.origin = (step, cursor)
            self.condition.notify_all()
        thread = threading.Thread(target=self.produce, args=(self.generation, step, cursor),
                                  daemon=True)
        thread.start()
        return False

    def produce(self, generation: int, step: int, cursor: dict) -> None:
        try:
            reader = MixtureReader(self.spec, self.seq_len, cursor)
        except BaseException as error:
            self.fail(generation, error)
            return
        try:
            while True:
                with self.condition:
                    self.condition.wait_for(
                        lambda step=step: generation != self.generation
                        or step < self.wanted + self.prefetch_steps
                    )
                    if generation != self.generation:
                        return
                started = time.perf_counter()
                start = reader.cursor()
                with self.condition:
                    self.failed_at = (step, start)  # where a checkpoint of `step` begins
                samples = self.global_batch // self.spec.rows_per_sample
                batch = Batch.of([reader.next_sequence() for _ in range(samples)],
                                 self.spec.document_mask)
                with self.condition:
                    if generation != self.generation:
                        return
                    self.busy_seconds += time.perf_counter() - started
                    self.produced_tokens += batch.tokens.size
                    self.ready[step] = (start, batch)
                    self.next_step = step + 1
                    self.condition.notify_all()
                step += 1
        except BaseException as error:
            self.fail(generation, error)
        finally:
            reader.close()

    def fail(self, generation: int, error: BaseException) -> None:
        """Hand the error to the workers, who fail with it."""
        with self.condition:
            if generation == self.generation:
                self.error = error
                self.condition.notify_all()

    def wait_for(self, step: int) -> tuple[dict, Batch]:
        """The cursor and batch of `step`, once made; the pipeline's error (see
        `handed_over`) when it failed before making it."""
        with self.condition:
            self.wanted = max(self.wanted, step)
            self.condition.notify_all()
            self.condition.wait_for(
                lambda: step in self.ready or step < self.next_step or self.error is not None
            )
            if step not in self.ready and step >= self.next_step:
                raise handed_over(self.error)
            if step not in self.ready:
                raise ValueError(
                    f"the batch of step {step} is no longer held (steps {min(self.ready)} to "
                    f"{max(self.ready)} are); seek() to re-read from a checkpoint's cursor"
                )
            self.forget_old_batches()
            return self.ready[step]

    def forget_old_batches(self) -> None:
        """Drop the batches no worker asks for again: those before the last committed
        checkpoint, and the oldest beyond `KEPT_BYTES` (a restart then re-reads them)."""
        done = [s for s in self.ready if s < self.wanted - 2]
        held = sum(batch_bytes(self.ready[s][1]) for s in done)
        for old in done:
            if old >= self.kept_from and held <= KEPT_BYTES:
                break
            held -= batch_bytes(self.ready[old][1])
            del self.ready[old]

    def batch(self, step: int, dp_rank: int, dp_size: int) -> Batch:
        """The slice of step `step`'s global batch that replica `dp_rank` of `dp_size` trains on."""
        _, batch = self.wait_for(step)
        share = len(batch) // dp_size
        return batch.rows(dp_rank * share, (dp_rank + 1) * share)

    def part(self, step: int, index: int, count: int, unit: int) -> Batch:
        """Member `index` of `count`'s part of step `step`'s global batch, in whole units
        of `unit` rows (micro-batches), as even as they split (replica mode: whichever
        replicas compute a step, together they take the whole batch)."""
        _, batch = self.wait_for(step)
        units = len(batch) // unit
        return batch.rows(index * units // count * unit, (index + 1) * units // count * unit)

    def cursor(self, step: int) -> dict:
        """Where the batch of `step` begins in the corpus, with the file lists it counts in
        (`file_lists.py`): what a checkpoint at `step` stores (also when the pipeline
        failed making that batch: the run then ends with a checkpoint of its last step).
        Asked when that checkpoint is written, by which time the one before is committed
        (a save commits the last one first): batches before that one are no longer kept."""
        with self.condition:
            failed = self.failed_at if self.error is not None else None
        start = failed[1] if failed and failed[0] == step else self.wait_for(step)[0]
        with self.condition:
            self.kept_from, self.checkpointing = self.checkpointing, step
        return {**start, "files": recorded_lists(self.spec, start)}

    def count_steps(self) -> int:
        """The steps the data gives (`train.steps=auto`): whole global batches until every
        source with an epoch limit is exhausted, counted by one pass over the data from its
        start (which fills the token cache for the training that follows)."""
        reader = MixtureReader(self.spec, self.seq_len, {})
        sequences = 0
        try:
            while reader.limited_sources_left():
                reader.next_sequence()
                sequences += 1
        except DataExhausted:
            pass
        finally:
            reader.close()
        return sequences * self.spec.rows_per_sample // self.global_batch

    def validation(self, dp_rank: int, dp_size: int) -> Batch:
        """This replica's share of the held-out sequences (the same ones at every evaluation)."""
        with self.validation_lock:
            if self.validation_set is None:
                self.validation_set = self.build_validation_set()
        rows = self.spec.rows_per_sample  # a pair stays on one replica
        share = len(self.validation_set) // dp_size // rows * rows
        return self.validation_set.rows(dp_rank * share, (dp_rank + 1) * share)

    def build_validation_set(self) -> Batch:
        """One epoch of each validation source (the held-out documents of the training
        sources, or `data.validation_sources`), each its weight's share of the set."""
        separate = bool(self.spec.validation)
        sources = self.spec.validation if separate else self.spec.sources
        total = sum(s.weight for s in sources)
        sequences: list = []
        for index, source in enumerate(sources):
            wanted = round(self.val_sequences * source.weight / total / self.spec.rows_per_sample)
            docs = token_docs(self.spec, source, index, Cursor(), ALL if separate else VALIDATION,
                              epochs=1)
            packer = self.spec.packer(docs, self.seq_len)
            try:
                for _ in range(wanted):
                    sequences.append(packer.next_sequence())
            except StopIteration:
                pass
            finally:
                docs.close()
        if not sequences:
            return Batch(np.zeros((0, self.seq_len + 1), np.int32))
        return Batch.of(sequences[: self.val_sequences // self.spec.rows_per_sample],
                        self.spec.document_mask)

    def stats(self) -> dict[str, float]:
        """Skipped records by reason, each source's share and the pipeline's throughput, up
        to the last step a worker asked for (the counts a checkpoint there stores)."""
        with self.condition:
            steps = [s for s in self.ready if s <= self.wanted]
            cursor = self.ready[max(steps)][0] if steps else {}
            rate = self.produced_tokens / self.busy_seconds if self.busy_seconds else 0.0
        stats: dict[str, float] = {}
        for counts in cursor.get("skipped", []):
            for reason, count in counts.items():
                stats[f"data/skipped_{reason}"] = stats.get(f"data/skipped_{reason}", 0) + count
        taken = cursor.get("taken", [])
        for index, count in enumerate(taken):
            stats[f"data/source{index}_share"] = count / (sum(taken) or 1)
        stats["data/pipeline_tokens_per_s"] = rate
        return stats
