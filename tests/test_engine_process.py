"""The replica's engine in a process of its own, without Ray: what it decodes equals the
model decoding in this process; a submission it cannot take, a model it cannot load
and a process that dies are each reported, never a hang."""

import asyncio
import time

import pytest

from raytron.model.engine import ERROR, LENGTH, EngineLimits, QueueFull
from raytron.model.sampling import Sampling
from raytron.platform.models import load_model
from raytron.platform.serving.completions import Completions
from raytron.platform.serving.engine_process import EngineFailed, EngineProcess
from raytron.platform.serving.requests import Job

from model_runs import small_model, small_tokenizer, write_run

GREEDY = Sampling(greedy=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs"), "engine",
                     small_model(512, max_seq_len=64), small_tokenizer())


@pytest.fixture(scope="module")
def engine(run_dir):
    from raytron.platform.models.sources import open_source

    process = EngineProcess(open_source(run_dir), "cpu",
                            EngineLimits(max_num_seqs=2, max_waiting=4))
    yield process
    process.close()
    assert process.process.returncode == 0


async def collected(engine, jobs, prompts, **options) -> list:
    completions = Completions(engine, jobs, prompts, **options)
    try:
        return await completions.results(time.perf_counter() + 60)
    finally:
        completions.cancel()


def test_greedy_text_equals_the_model_in_this_process(engine, run_dir):
    local = load_model(run_dir)
    prompts = ["A class", "The import statement", "x"]
    expected = local.generate(prompts, max_new_tokens=12, greedy=True)
    ids = [local.generator.encode(prompt) for prompt in prompts]
    jobs = [Job(prompt, 12, GREEDY) for prompt in prompts]
    finished = asyncio.run(collected(engine, jobs, ids))
    assert [f.tokens for f in finished] == [e.tokens for e in expected]
    assert [f.text for f in finished] == [e.text for e in expected]
    assert all(f.finish_reason == LENGTH and f.first_token_s > 0 for f in finished)


def test_more_sequences_than_it_takes_is_queue_full_and_nothing_leaks(engine):
    jobs = [Job("a", 4, GREEDY)] * 5  # 4 waiting at most
    with pytest.raises(QueueFull):
        asyncio.run(collected(engine, jobs, [[5, 6]] * 5))
    assert engine.outstanding == 0


def test_a_cancelled_request_leaves_and_its_slot_is_freed(engine):
    async def cancel_midway():
        completions = Completions(engine, [Job("a", 50, GREEDY)], [[5, 6, 7]])
        async for batch in completions.batches(time.perf_counter() + 60):
            if any(kind == "text" for kind, _, _ in batch):
                break
        completions.cancel()
        await asyncio.sleep(0)

    before = engine.state["generated_tokens"]
    asyncio.run(cancel_midway())
    deadline = time.time() + 10
    while engine.state["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.state["running"] == 0
    assert engine.state["generated_tokens"] - before < 50


def test_a_bad_submission_fails_that_request_alone(engine):
    finished = asyncio.run(collected(engine, [Job("a", 0, GREEDY)], [[5, 6]]))
    assert finished[0].finish_reason == ERROR and "max_tokens" in finished[0].error
    assert asyncio.run(collected(engine, [Job("a", 3, GREEDY)], [[5, 6]]))[0].tokens


def test_a_model_it_cannot_load_is_reported_with_its_reason(run_dir, tmp_path):
    from raytron.platform.models.sources import open_source

    source = open_source(run_dir)
    source.step = 999  # no such checkpoint
    with pytest.raises(EngineFailed, match="999"):
        EngineProcess(source, "cpu", EngineLimits(max_num_seqs=1))


def test_a_process_that_dies_ends_its_requests_with_the_reason(run_dir):
    from raytron.platform.models.sources import open_source

    process = EngineProcess(open_source(run_dir), "cpu", EngineLimits(max_num_seqs=1))

    async def killed_midway():
        completions = Completions(process, [Job("a", 60, GREEDY)], [[5, 6, 7]])
        process.process.kill()
        return await completions.results(time.perf_counter() + 30)

    finished = asyncio.run(killed_midway())
    assert finished[0].finish_reason == ERROR and "exit code -9" in finished[0].error
    assert not process.alive()
    with pytest.raises(EngineFailed):
        asyncio.run(collected(process, [Job("a", 2, GREEDY)], [[5]]))
    process.close()
