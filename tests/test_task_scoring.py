"""train.eval_tasks: a task's requests scored on the trained weights in the training
layout give, at pp2×cp2, dp2×tp2 and 1×1×1, the scores of the unsplit model scored alone
(within 1e-4) and the same lm_eval accuracies."""

import dataclasses
import math

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")  # the [eval] extra; CI installs it
pytestmark = pytest.mark.usefixtures("hub_offline")  # no call may wait on the Hub

from raytron.model.gpt import GPT  # noqa: E402
from raytron.model.scoring import continuation_scores  # noqa: E402
from raytron.pipelines.packing import Batch  # noqa: E402
from raytron.pipelines.sources import embedded_records  # noqa: E402
from raytron.pipelines.tokenizer import end_ids, train_bpe  # noqa: E402
from raytron.platform.config.layout import Layout  # noqa: E402
from raytron.platform.config.load import load_config  # noqa: E402
from raytron.platform.config.resolve import gpt_shape, resolve_model  # noqa: E402
from raytron.platform.config.schema import ConfigError  # noqa: E402
from raytron.platform.models.task_judge import TaskJudge  # noqa: E402
from raytron.platform.worker.task_scoring import score_in_layout  # noqa: E402
from raytron.platform.worker.trainer import Sequences, Trainer  # noqa: E402

from model_runs import small_tokenizer  # noqa: E402
from parallel_harness import config, final_parameters, run_parallel, run_single  # noqa: E402

SEQ_LEN = 16  # the harness's training shape: longer requests keep their last 17 tokens
VOCAB = 128  # the harness's model: the tokenizer's ids are folded into it
LAYOUTS = {"pp2-cp2": ["parallel.pp=2", "parallel.cp=2"],
           "dp2-tp2": ["parallel.dp=2", "parallel.tp=2"]}


def judge_config(*overrides: str):
    return load_config("tiny", [f"data.seq_len={SEQ_LEN}",
                                "train.eval_tasks=[raytron_word_choice, raytron_last_word]",
                                "train.eval_task_limit=12", *overrides])


@pytest.fixture(scope="module")
def judge() -> TaskJudge:
    return TaskJudge(judge_config(), small_tokenizer().to_str())


@pytest.fixture(scope="module")
def pairs(judge) -> list:
    return [([i % VOCAB for i in context], [i % VOCAB for i in continuation])
            for context, continuation in judge.requests()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def single(pairs, checkpoints) -> dict:
    """Three steps in one process, the pairs scored after them, the weights saved."""
    return run_single([], stop=3, checkpoints=checkpoints, pairs=pairs)


def test_the_judge_asks_each_request_once(judge):
    """raytron_last_word asks about the paragraphs and words of raytron_word_choice's
    right choices: 12 samples of four choices, and nothing more."""
    requests = judge.requests()
    assert len(requests) == len(set(requests)) == 12 * 4


def test_one_process_scores_as_the_model_scored_alone(pairs, single, checkpoints):
    model = GPT(gpt_shape(config([]).model))
    model.load_state_dict(final_parameters(checkpoints, 3))
    model.init_rope()
    alone = continuation_scores(model.eval(), pairs, batch_size=5, max_length=SEQ_LEN)
    ours = single["task_scores"]
    assert [logprob for logprob, _ in ours] == \
        pytest.approx([score.logprob for score in alone], abs=1e-4)
    assert [greedy for _, greedy in ours] == [score.greedy for score in alone]


def test_scores_are_the_log_softmax_of_every_position_of_a_whole_forward(pairs):
    """Scoring computes the head only where a continuation is predicted, and shares a
    long context between choices: the same numbers as each pair's own whole forward."""
    model = GPT(gpt_shape(config([]).model), seed=3).eval()
    got = continuation_scores(model, pairs, batch_size=5, max_length=SEQ_LEN)
    for (context, continuation), score in zip(pairs, got, strict=True):
        row = (context + continuation)[-(SEQ_LEN + 1):]
        with torch.inference_mode():
            logprobs = model(torch.tensor([row[:-1]]))[0].log_softmax(-1)
        predicting = logprobs[-len(continuation):]
        targets = torch.tensor(continuation)
        assert score.logprob == pytest.approx(
            float(predicting.gather(-1, targets[:, None]).sum()), abs=1e-4)
        assert score.greedy == bool((predicting.argmax(-1) == targets).all())


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_gives_the_scores_and_accuracies_of_one_process(name, judge, pairs,
                                                                    single):
    got = run_parallel(LAYOUTS[name], stop=3, pairs=pairs)["task_scores"]
    expected = single["task_scores"]
    assert [logprob for logprob, _ in got] == \
        pytest.approx([logprob for logprob, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    metrics, reference = judge.metrics(got), judge.metrics(expected)
    assert metrics == pytest.approx(reference, rel=1e-4)  # a perplexity: exp(-mean logprob)
    assert {k: v for k, v in metrics.items() if "acc" in k} == \
        {k: v for k, v in reference.items() if "acc" in k}
    assert set(metrics) == {
        "Eval/raytron_word_choice/acc", "Eval/raytron_word_choice/acc_norm",
        "Eval/raytron_last_word/acc", "Eval/raytron_last_word/perplexity"}


@pytest.mark.parametrize("overrides, says", [
    (["train.eval_tasks=[no_such_task]"], "train.eval_tasks: no task named no_such_task"),
    (["data.seq_len=2"], "does not fit"),
])
def test_tasks_that_cannot_be_scored_are_config_errors(overrides, says):
    with pytest.raises(ConfigError, match=says):
        TaskJudge(judge_config(*overrides), small_tokenizer().to_str())


def test_a_generation_task_is_refused_with_what_to_do_instead(tmp_path):
    yaml = tmp_path / "gen.yaml"
    yaml.write_text(GENERATION_TASK.format(data=tmp_path / "data.jsonl"))
    (tmp_path / "data.jsonl").write_text('{"q": "1 + 1 =", "a": " 2"}\n')
    cfg = judge_config(f"train.eval_tasks=[{yaml}]")
    with pytest.raises(ConfigError, match="raytron eval RUN --tasks"):
        TaskJudge(cfg, small_tokenizer().to_str())


GENERATION_TASK = """task: sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
"""



def test_an_unknown_task_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from raytron.platform.cli import main

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ray, "init", must_not_start)
    small_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert main(["train", "tiny", f"run.root={tmp_path}", "model.vocab_size=512",
                 f"data.tokenizer={tmp_path / 'tokenizer.json'}",
                 "train.eval_tasks=[no_such_task]"]) == 2
    assert "train.eval_tasks: no task named no_such_task" in capsys.readouterr().err


def above_chance(accuracy: float, samples: int, chance: float = 0.25) -> bool:
    """Whether `accuracy` over `samples` is above `chance` beyond doubt: the lower end of
    its 99% confidence interval (normal approximation) is."""
    return accuracy - 2.576 * math.sqrt(accuracy * (1 - accuracy) / samples) > chance


def corpus_stream(tokenizer) -> np.ndarray:
    """The Python reference (raytron's embedded corpus) as one stream of ids, each
    document ended by EOS."""
    end = end_ids(tokenizer)[0]
    return np.array([i for record in embedded_records("python-reference")
                     for i in [*tokenizer.encode(record.text).ids, end]], dtype=np.int32)


def test_a_trained_tiny_model_scores_above_chance_and_an_untrained_one_does_not():
    """raytron_word_choice, all 300 samples, scored as during training: the tiny shape
    (2 layers, 64 tokens) untrained, then after 200 steps on the Python reference."""
    tokenizer = train_bpe([r.text for r in embedded_records("python-reference")][:200],
                          1024, show_progress=False)
    cfg = load_config("tiny", ["model.n_layers=2", "data.seq_len=64", "model.vocab_size=1024",
                               "train.steps=200", "train.warmup_steps=10",
                               "train.eval_tasks=[raytron_word_choice]"])
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, 1024))
    judge = TaskJudge(cfg, tokenizer.to_str())
    trainer = Trainer(cfg, Layout(), torch.device("cpu"), None)

    def accuracy() -> float:
        return judge.metrics(score_in_layout(trainer, judge.requests())
                             )["Eval/raytron_word_choice/acc"]

    untrained = accuracy()
    stream, windows = corpus_stream(tokenizer), np.random.default_rng(0)
    for _ in range(200):  # 16 windows of 65 tokens a step, from anywhere in the corpus
        starts = windows.integers(0, len(stream) - 65, 16)
        batch = Batch.of([stream[start : start + 65] for start in starts])
        trainer.train_step(Sequences.of(batch, torch.device("cpu")))
    trained = accuracy()
    assert not above_chance(untrained, 300), untrained
    assert above_chance(trained, 300), trained
