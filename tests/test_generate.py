"""Generation: the KV cache against recomputing the whole sequence, batches against single
prompts, sampling, stop strings and streaming."""

import pytest
import torch

from raytron.model.engine import LENGTH, STOP
from raytron.model.generate import TextGenerator, generate_ids
from raytron.model.gpt import GPT, GPTShape
from raytron.model.kv_cache import KVCache
from raytron.model.sampling import Sampling, next_tokens
from raytron.pipelines.tokenizer import EOS, eos_id, train_bpe

GREEDY = Sampling(greedy=True)


def model(**changes) -> GPT:
    """Random weights large enough that the next token depends on the whole context."""
    base = dict(n_layers=3, d_model=48, n_heads=6, n_kv_heads=2, ffn_hidden=96,
                vocab_size=101, max_seq_len=48, init_std=0.15, tie_embeddings=False)
    return GPT(GPTShape(**{**base, **changes}), seed=7).eval()


def recomputed(gpt: GPT, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without a cache: the whole sequence through the model each step."""
    sequence, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = gpt(torch.tensor([sequence]))[0, -1]
            logits.append(last)
            sequence.append(int(last.argmax()))
    return sequence[len(prompt):], logits


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 6, "tie_embeddings": True}])
def test_cached_decoding_equals_recomputing_the_sequence(changes):
    gpt = model(**changes)
    prompt = [5, 17, 42, 3, 99, 8, 61]
    expected, expected_logits = recomputed(gpt, prompt, 20)
    assert len(set(expected)) > 3  # the test model does not just repeat itself
    assert generate_ids(gpt, [prompt], 20, GREEDY).ids == [expected]
    cache = KVCache(1, 48, 3, gpt.shape.n_kv_heads, 8, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        last = gpt(torch.tensor([prompt]), cache)[0, -1]
        for token, reference in zip(expected, expected_logits, strict=True):
            torch.testing.assert_close(last, reference, rtol=0, atol=1e-5)
            last = gpt(torch.tensor([[token]]), cache)[0, -1]


def test_prompts_of_different_lengths_decode_together_as_each_alone():
    gpt = model()
    prompts = [[5, 17, 42, 3, 99, 8, 61], [12], [7, 7, 30], list(range(60, 80))]
    together = generate_ids(gpt, prompts, 12, GREEDY)
    alone = [generate_ids(gpt, [prompt], 12, GREEDY).ids[0] for prompt in prompts]
    assert together.ids == alone
    assert together.finish_reasons == [LENGTH] * 4


def test_an_end_token_ends_only_its_own_sequence():
    gpt = model()
    prompts = [[5, 17, 42], [12, 13]]
    free = generate_ids(gpt, prompts, 10, GREEDY).ids
    end = free[0][3]
    assert end not in free[1]
    ended = generate_ids(gpt, prompts, 10, GREEDY, end_ids=[end])
    assert ended.ids == [free[0][:3], free[1]]
    assert ended.finish_reasons == [STOP, LENGTH]


def test_generation_stops_at_the_models_context():
    gpt = model(max_seq_len=16)
    result = generate_ids(gpt, [list(range(1, 11)), [3]], 100, GREEDY)
    assert [len(ids) for ids in result.ids] == [6, 15]
    assert result.finish_reasons == [LENGTH, LENGTH]
    with pytest.raises(ValueError, match="prompt 1 of 1 has 16 tokens"):
        generate_ids(gpt, [list(range(16))], 5, GREEDY)


def test_sampling_is_seeded_and_filters_as_asked():
    logits = torch.randn(4, 101, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    assert torch.equal(next_tokens(logits, Sampling(top_k=1)), greedy)
    assert torch.equal(next_tokens(logits, Sampling(top_p=1e-6)), greedy)
    assert torch.equal(next_tokens(logits, Sampling(temperature=0)), greedy)
    draws = [next_tokens(logits, Sampling(temperature=1.5, top_k=5),
                         torch.Generator().manual_seed(s)) for s in range(50)]
    top5 = logits.topk(5).indices
    assert all(bool((top5 == d[:, None]).any(-1).all()) for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 1
    again = next_tokens(logits, Sampling(), torch.Generator().manual_seed(3))
    assert torch.equal(again, next_tokens(logits, Sampling(), torch.Generator().manual_seed(3)))
    # top-p keeps the smallest set whose probability reaches p
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = {int(next_tokens(probabilities.log(), Sampling(top_p=0.75),
                            torch.Generator().manual_seed(s))) for s in range(200)}
    assert kept == {0, 1}
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)


@pytest.fixture(scope="module")
def text_generator() -> TextGenerator:
    tokenizer = train_bpe(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20,
                           "héllo wörld ünïcode " * 10], vocab_size=300, show_progress=False)
    gpt = model(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64)
    return TextGenerator(gpt, tokenizer, [eos_id(tokenizer)])


def test_text_streams_and_stops_before_a_stop_string(text_generator):
    free = text_generator.generate(["the cat", "a dog ran"], 30, GREEDY)
    streamed: dict[int, str] = {}
    unlimited = text_generator.generate(
        ["the cat", "a dog ran"], 30, GREEDY, batch_size=1,
        on_text=lambda index, text: streamed.__setitem__(index, streamed.get(index, "") + text))
    assert [g.text for g in unlimited] == [g.text for g in free]
    assert streamed == {0: free[0].text, 1: free[1].text}
    stop = free[0].text[5:8]
    assert stop and stop not in free[0].text[:7]
    streamed.clear()
    cut = text_generator.generate(
        ["the cat"], 30, GREEDY, stop=[stop],
        on_text=lambda index, text: streamed.__setitem__(index, streamed.get(index, "") + text))
    first = free[0].text.find(stop)
    assert cut[0].text == free[0].text[:first] == streamed[0]
    assert cut[0].finish_reason == STOP
    assert cut[0].prompt_tokens == len(text_generator.encode("the cat"))


def test_an_empty_prompt_starts_a_document(text_generator):
    assert text_generator.encode("") == [text_generator.tokenizer.token_to_id(EOS)]
    assert len(text_generator.generate([""], 5, GREEDY)[0].tokens) <= 5
