"""Penalties on the tokens a sequence has generated: the repetition penalty equals
`transformers`' RepetitionPenaltyLogitsProcessor, presence and frequency penalties
OpenAI's documented formula, on the same logits; in generation they keep each sequence
what it would be alone, and a large one stops greedy decoding from repeating itself."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from raytron.model.generate import generate_ids
from raytron.model.sampling import Sampling, penalized

from model_runs import small_model

VOCAB = 50


def generated_so_far(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of 4 rows, the ids each row generated (with repeats), and their counts."""
    random = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCAB, generator=random) * 5  # positive and negative
    ids = torch.randint(0, VOCAB, (4, 30), generator=random)
    counts = torch.zeros(4, VOCAB).scatter_add_(1, ids, torch.ones(4, 30))
    return logits, ids, counts


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers_processor(penalty):
    logits, ids, counts = generated_so_far(1)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.allclose(penalized(logits, counts, Sampling(repetition_penalty=penalty)),
                          expected)


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.3), (-1.0, 2.0)])
def test_presence_and_frequency_penalties_follow_openais_formula(presence, frequency):
    """mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, token by token."""
    logits, ids, _ = generated_so_far(2)
    expected = logits.clone()
    for row in range(4):
        for token in range(VOCAB):
            count = int((ids[row] == token).sum())
            expected[row, token] -= count * frequency + float(count > 0) * presence
    counts = torch.zeros(4, VOCAB).scatter_add_(1, ids, torch.ones(4, 30))
    sampling = Sampling(presence_penalty=presence, frequency_penalty=frequency)
    assert torch.allclose(penalized(logits, counts, sampling), expected)


def test_penalties_apply_in_generation_and_keep_each_sequence_its_own():
    model = small_model(64, max_seq_len=64)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    plain = generate_ids(model, prompts, 40, Sampling(greedy=True)).ids
    assert any(len(set(ids)) < len(ids) for ids in plain)  # greedy alone repeats tokens
    penalty = Sampling(greedy=True, frequency_penalty=1e4)
    # row r stops after 40 - 10 r tokens: the rows left keep their own counts
    together = generate_ids(model, prompts, 40, penalty,
                            on_token=lambda row, ids: len(ids) == 40 - 10 * row).ids
    assert [len(ids) for ids in together] == [40, 30, 20]
    assert all(len(set(ids)) == len(ids) for ids in together)
    assert together == [generate_ids(model, [prompt], 40 - 10 * row, penalty).ids[0]
                        for row, prompt in enumerate(prompts)]
    mixed = generate_ids(model, prompts, 12, Sampling(greedy=True, repetition_penalty=1.5,
                                                      presence_penalty=0.5)).ids
    assert mixed != [ids[:12] for ids in plain]
    with pytest.raises(ValueError, match="repetition_penalty must be more than 0"):
        Sampling(repetition_penalty=0)
