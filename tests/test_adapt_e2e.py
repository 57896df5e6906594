"""LoRA and DPO learning what the README says they learn, from the model `raytron
train` pre-trains (runs/tiny), with the shipped configs: adapters alone teach it
reverse-words (configs/sft-lora-tiny.yaml), DPO with adapters teaches it to prefer
the reversed words (configs/dpo-lora-tiny.yaml), and DPO of the whole model computes its
reference once (configs/dpo-tiny.yaml). The two learning runs take minutes each: they
are marked `learning`, out of the default run (`python -m pytest -m learning`)."""

import sys
from pathlib import Path

import pytest

from raytron.pipelines.embedded import REVERSE_WORDS, REVERSE_WORDS_PAIRS
from raytron.platform.models.answers import exact_answers, held_out_samples, preferred_pairs

from model_runs import small_model, small_tokenizer, write_run
from test_train_e2e import assert_only_raytron_lines, completed

QUIET = ("cluster.dashboard=false", "train.log_interval=100")


def train(root: Path, *argv: str) -> str:
    result = completed([sys.executable, "-m", "raytron.platform.cli", "train", *argv,
                        f"run.root={root}", *QUIET], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_only_raytron_lines(result.stdout + result.stderr)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapt")


@pytest.fixture(scope="module")
def pretrained(root) -> Path:
    """runs/tiny as the README's `raytron train` leaves it: what the learning runs start
    from (the README's figures are theirs)."""
    train(root, "checkpoint.interval=200")
    return root / "tiny"


@pytest.fixture(scope="module")
def briefly_pretrained(root) -> Path:
    """A small model's run with random weights, written without Ray: a base for what does
    not hang on what the base knows (a pre-training would cost a minute)."""
    tokenizer = small_tokenizer()
    return write_run(root, "brief", small_model(tokenizer.get_vocab_size()), tokenizer)


@pytest.mark.learning
def test_lora_adapters_alone_learn_reverse_words(root, pretrained):
    """Rank-64 adapters (and the embeddings, for the chat tokens the base never read) on
    the frozen base, 450 of the epoch's 808 steps (the LR decaying over them): >= 85 of
    100 held-out chats answered exactly (93 measured; the whole epoch gives the README's
    97, 300 steps 68)."""
    chats = held_out_samples(REVERSE_WORDS, 0.05, 100)
    output = train(root, "sft-lora-tiny", f"model.init_from={pretrained}",
                   "train.steps=450", "checkpoint.interval=1000")
    assert "Finished 450 steps" in output
    assert exact_answers(root / "sft-lora-tiny", chats) >= 85


@pytest.mark.learning
def test_dpo_teaches_the_pretrained_model_a_preference(root, pretrained):
    """Of 100 reverse-words pairs held out of training, the model prefers the chosen
    completion (by log-probability) in about half before, and in >= 90 after; TRL's
    statistics are charted in MLflow."""
    from mlflow import MlflowClient

    pairs = held_out_samples(REVERSE_WORDS_PAIRS, 0.05, 100)
    assert 30 <= preferred_pairs(pretrained, pairs) <= 70
    output = train(root, "dpo-lora-tiny", f"model.init_from={pretrained}")
    assert "Finished 300 steps" in output and "val reward accuracy" in output
    assert preferred_pairs(root / "dpo-lora-tiny", pairs) >= 90
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run((root / "dpo-lora-tiny" / "mlflow_run_id").read_text().strip())
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "eval_rewards/accuracies"} <= set(run.data.metrics)
    assert run.data.metrics["eval_rewards/accuracies"] >= 0.9


def test_a_full_fine_tunes_dpo_computes_its_reference_once(root, briefly_pretrained):
    """Without LoRA, a pass before the first step computes the reference (the first loss
    is ln 2) and stores it; the worker group killed at step 12 restarts from step 11's
    in-memory snapshot and reads it, never computing it again."""
    output = train(root, "dpo-tiny", f"model.init_from={briefly_pretrained}", "train.steps=30",
                   "checkpoint.interval=10", "faults.inject=[kill rank 0 at step 12]")
    assert "Finished 30 steps" in output
    assert output.count("DPO reference: the starting weights' log-probabilities of 960 "
                        "rows") == 1
    assert "step  1/30 | loss 0.6931" in output
    assert "Resuming from step 11 (in-memory snapshot)" in output
    assert (root / "dpo-tiny" / "checkpoints" / "dpo_reference.safetensors").is_file()
