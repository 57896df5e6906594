"""The decoding engine without Ray: requests that arrive, decode and leave at different
steps give exactly what each gives alone; seeded sampling ignores batch-mates; a long
prefill never stalls decoding nor exceeds the token budget; cancelling frees the slot,
and no slot leaks under any sequence of submissions, cancellations and steps."""

import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from raytron.model.engine import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    Engine,
    EngineLimits,
    Event,
    PromptError,
    QueueFull,
)
from raytron.model.generate import generate_ids
from raytron.model.gpt import GPT, GPTShape
from raytron.model.sampling import Sampling

GREEDY = Sampling(greedy=True)
PROMPTS = [[5, 17, 42, 3, 99, 8, 61], [12], [7, 7, 30], list(range(60, 80)), [1, 2, 3, 4]]


@pytest.fixture(scope="module")
def gpt() -> GPT:
    shape = GPTShape(n_layers=3, d_model=48, n_heads=6, n_kv_heads=2, ffn_hidden=96,
                     vocab_size=101, max_seq_len=64, init_std=0.15, tie_embeddings=False)
    return GPT(shape, seed=7).eval()


class Heard:
    """A request's events, as a server's listener would get them."""

    def __init__(self):
        self.tokens: list[int] = []
        self.end: Event | None = None

    def __call__(self, event: Event) -> None:
        assert self.end is None, "an event after the end"
        if event.prompt is not None:
            return
        if event.token is not None:
            self.tokens.append(event.token)
        else:
            self.end = event


def alone(gpt: GPT, prompt: list[int], new: int, **kwargs) -> list[int]:
    return generate_ids(gpt, [prompt], new, GREEDY, **kwargs).ids[0]


def test_staggered_greedy_requests_each_decode_what_they_decode_alone(gpt):
    """Five prompts arrive two steps apart into three slots with a budget of 8 tokens a
    step (the 20-token prompt prefills over several steps while others decode); one is
    cancelled on the way. Each finished one equals its decoding alone, token for token."""
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=3, token_budget=8))
    heard = [Heard() for _ in PROMPTS]
    requests = []
    for step in range(200):
        if step % 2 == 0 and len(requests) < len(PROMPTS):
            index = len(requests)
            requests.append(engine.submit(PROMPTS[index], 10 + index, GREEDY, heard[index]))
        if step == 5:
            engine.cancel(requests[1])
        if not engine.busy() and len(requests) == len(PROMPTS):
            break
        engine.step()
    assert engine.slots_in_use() == 0 and not engine.waiting
    assert heard[1].end.finish_reason == CANCELLED
    for index in (0, 2, 3, 4):
        assert heard[index].end.finish_reason == LENGTH
        assert heard[index].tokens == alone(gpt, PROMPTS[index], 10 + index), index
        assert requests[index].generated == heard[index].tokens


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch(gpt):
    sampling = Sampling(temperature=1.3, top_k=40)

    def run(batch_mates: int) -> list[int]:
        engine = Engine(gpt, limits=EngineLimits(max_num_seqs=4, token_budget=64))
        mine = engine.submit(PROMPTS[0], 16, sampling, Heard(), seed=123)
        for mate in range(batch_mates):
            engine.submit(PROMPTS[mate + 1], 16, Sampling(temperature=0.7), Heard(),
                          seed=mate)
        engine.run_until_done()
        return mine.generated

    together, by_itself = run(3), run(0)
    assert together == by_itself
    assert together != alone(gpt, PROMPTS[0], 16)  # it sampled


def test_a_long_prefill_never_stalls_decoding_nor_exceeds_the_budget(gpt):
    """Two sequences decode while a 40-token prompt arrives: each still gains a token every
    step, and no step computes more than the budget's tokens."""
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=4, token_budget=6))
    computed: list[int] = []
    hook = gpt.register_forward_hook(lambda module, args, output: computed.append(
        args[0].shape[0] if args[0].shape[1] == 1 else args[0].shape[1]))
    try:
        decoding = [engine.submit(p, 30, GREEDY, Heard()) for p in ([3, 4], [9])]
        engine.step()  # their prefills and first tokens
        long = engine.submit(list(range(1, 41)), 4, GREEDY, Heard())
        for _ in range(8):
            before = [len(r.generated) for r in decoding]
            computed.clear()
            engine.step()
            assert [len(r.generated) for r in decoding] == [b + 1 for b in before]
            rows = {r.slot for r in decoding}
            assert sum(computed) - max(rows) - 1 + len(rows) <= 6  # padding rows aside
        assert long.prefilled == 8 * 4  # the rest of each step's budget, 4 tokens a step
    finally:
        hook.remove()
    engine.run_until_done()
    assert long.generated == alone(gpt, list(range(1, 41)), 4)


def test_cancelling_frees_the_slot_for_a_waiting_request(gpt):
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=1, token_budget=16))
    first, second = Heard(), Heard()
    running = engine.submit(PROMPTS[0], 40, GREEDY, first)
    waiting = engine.submit(PROMPTS[2], 5, GREEDY, second)
    engine.step()
    assert running.slot == 0 and waiting.slot is None
    engine.cancel(running)
    engine.step()
    assert first.end.finish_reason == CANCELLED and waiting.slot == 0
    engine.run_until_done()
    assert second.tokens == alone(gpt, PROMPTS[2], 5)


def test_end_tokens_stop_strings_and_limits_end_only_their_request(gpt):
    free = alone(gpt, PROMPTS[0], 10)
    engine = Engine(gpt, end_ids=[free[3]], limits=EngineLimits(max_num_seqs=3,
                                                                 token_budget=32))
    ended, stopped, long = Heard(), Heard(), Heard()
    engine.submit(PROMPTS[0], 10, GREEDY, ended)
    engine.submit(PROMPTS[2], 10, GREEDY, stopped, stops=lambda ids: len(ids) == 2)
    engine.submit([1] * 60, 10, GREEDY, long)  # 60 of the 64 positions: 4 tokens fit
    engine.run_until_done()
    assert ended.tokens == free[:3] and ended.end.finish_reason == STOP
    assert len(stopped.tokens) == 2 and stopped.end.finish_reason == STOP
    assert len(long.tokens) == 4 and long.end.finish_reason == LENGTH


def test_a_failing_request_fails_alone(gpt):
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=2, token_budget=32))
    good, bad = Heard(), Heard()

    def broken(ids: list[int]) -> bool:
        raise UnicodeError("a stop check that fails")

    engine.submit(PROMPTS[0], 6, GREEDY, good)
    engine.submit(PROMPTS[2], 6, GREEDY, bad, stops=broken)
    engine.run_until_done()
    assert bad.end.finish_reason == ERROR and "UnicodeError" in bad.end.error
    assert good.tokens == alone(gpt, PROMPTS[0], 6)


def test_bad_prompts_and_a_full_queue_are_refused_at_submission(gpt):
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=1, token_budget=8, max_waiting=2))
    for prompt in ([], [1] * 64, [101], [-1]):
        with pytest.raises(PromptError):
            engine.submit(prompt, 4, GREEDY, Heard())
    engine.submit([1], 4, GREEDY, Heard())
    engine.submit([2], 4, GREEDY, Heard())
    with pytest.raises(QueueFull):
        engine.submit([3], 4, GREEDY, Heard())
    with pytest.raises(ValueError, match="token_budget"):
        EngineLimits(max_num_seqs=8, token_budget=8)


def test_a_threaded_engine_serves_requests_from_other_threads(gpt):
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=2, token_budget=32))
    engine.start()
    try:
        heard = [Heard() for _ in range(3)]
        for prompt, listener in zip(PROMPTS, heard, strict=False):
            engine.submit(prompt, 5, GREEDY, listener)
        deadline = time.monotonic() + 30
        while any(h.end is None for h in heard) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    for prompt, listener in zip(PROMPTS, heard, strict=False):
        assert listener.tokens == alone(gpt, prompt, 5)


class SlotsNeverLeak(RuleBasedStateMachine):
    """Thousands of random submissions, cancellations and steps: a slot is held only by
    a request that has not ended, every request ends exactly once, and once the engine
    is idle every slot is free."""

    def __init__(self):
        super().__init__()
        shape = GPTShape(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                         vocab_size=31, max_seq_len=24)
        self.engine = Engine(GPT(shape, seed=1).eval(), end_ids=[0],
                             limits=EngineLimits(max_num_seqs=3, token_budget=7,
                                                 max_waiting=4))
        self.requests: list[tuple[object, Heard]] = []

    @rule(length=st.integers(1, 22), new=st.integers(1, 8), seed=st.integers(0, 9))
    def submit(self, length, new, seed):
        heard = Heard()
        try:
            request = self.engine.submit([1 + (seed + i) % 30 for i in range(length)], new,
                                         Sampling(temperature=1.0), heard, seed=seed)
        except QueueFull:
            assert len(self.engine.waiting) == 4
            return
        self.requests.append((request, heard))

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0, 1000))
    def cancel(self, pick):
        self.engine.cancel(self.requests[pick % len(self.requests)][0])

    @rule()
    def step(self):
        self.engine.step()

    @invariant()
    def slots_hold_only_live_requests(self):
        for index, request in enumerate(self.engine.slots):
            if request is not None:
                assert request.slot == index and request.finish_reason is None

    def teardown(self):
        self.engine.run_until_done()
        assert self.engine.slots_in_use() == 0 and not self.engine.admitted
        for request, heard in self.requests:
            assert heard.end is not None and request.finish_reason == heard.end.finish_reason
            assert heard.end.finish_reason != ERROR, heard.end.error


TestSlotsNeverLeak = SlotsNeverLeak.TestCase
TestSlotsNeverLeak.settings = settings(max_examples=60, stateful_step_count=50,
                                       deadline=None)


def test_logprobs_of_the_prompt_and_the_output_are_the_models_log_softmax(gpt):
    """Scores as the OpenAI API gives them (echo: the prompt's tokens, the first without
    one), computed from one forward over the whole text; the chosen token always among
    the top ones, even where sampling picked an unlikely one."""
    engine = Engine(gpt, limits=EngineLimits(max_num_seqs=2, token_budget=5))  # chunked
    prompt, heard, prompts = PROMPTS[3], Heard(), []
    scores: list = []

    def listener(event: Event) -> None:
        if event.prompt is not None:
            prompts.append(event.prompt)
        elif event.scored is not None:
            scores.append(event.scored)
        heard(event)

    engine.submit(prompt, 6, Sampling(temperature=5.0), listener, seed=4, logprobs=2,
                  prompt_logprobs=3)
    scoring_only = Heard()
    only = engine.submit(PROMPTS[0], 0, GREEDY, scoring_only, prompt_logprobs=0)
    engine.run_until_done()
    text = prompt + heard.tokens
    with torch.no_grad():
        expected = gpt(torch.tensor([text]))[0].log_softmax(-1)
    (echo,) = prompts
    assert echo[0] is None and len(echo) == len(prompt)
    for position, score in enumerate([*echo[1:], *scores], start=1):
        assert score.token == text[position]
        assert score.logprob == pytest.approx(float(expected[position - 1, score.token]),
                                              abs=1e-4)
        assert score.token in dict(score.top)
    assert all(len(s.top) in (3, 4) for s in echo[1:])
    assert any(len(s.top) == 3 for s in scores)  # 2, and the unlikely token chosen
    assert scoring_only.tokens == [] and scoring_only.end.finish_reason == LENGTH
    assert only.generated == []


def test_the_end_token_that_ends_a_scored_request_is_scored(gpt):
    """lm-evaluation-harness asks for one token with logprobs and drops the last scored
    one as the generated one: an end token is scored like any other."""
    prompt = PROMPTS[0]
    first = alone(gpt, prompt, 1)[0]
    heard = Heard()
    engine = Engine(gpt, end_ids=[first])
    engine.submit(prompt, 1, GREEDY, heard, logprobs=2)
    engine.run_until_done()
    with torch.inference_mode():
        expected = gpt(torch.tensor([prompt]))[0, -1].log_softmax(-1)[first]
    assert heard.tokens == [] and heard.end.finish_reason == STOP
    assert heard.end.scored.token == first
    assert heard.end.scored.logprob == pytest.approx(float(expected), abs=1e-5)
