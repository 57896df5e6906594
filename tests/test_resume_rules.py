"""What may change when a run resumes: every key applied, refused or free."""

from raytron.platform.config.keys import declaration, steps
from raytron.platform.config.load import flatten, load_config, to_dict
from raytron.platform.config.resume import (
    applied_changes,
    kind_of,
    reference_problems,
    resume_problems,
)

KEYS = sorted(set(flatten(to_dict(load_config("tiny")))) | {
    "faults.inject.0", "parallel.layers_per_stage.0", "cluster.worker_resources.trainer",
    "data.validation_sources.0.path"})


def test_every_key_has_one_kind_and_the_issue_examples_are_right():
    """A new key fails here until the schema declares its kind (on it, or on its section
    or list), and a key under a section or list with a kind cannot declare another."""
    declared_on = {key: [path for path, field, _ in steps(key) if declaration(field).resume]
                   for key in KEYS}
    assert {key: paths for key, paths in declared_on.items() if len(paths) != 1} == {}
    kinds = {key: kind_of(key) for key in KEYS}
    assert set(kinds.values()) == {"applied", "refused", "free"}
    for key in ("train.lr", "train.min_lr", "train.warmup_steps", "train.steps",
                "train.weight_decay", "train.beta1", "train.beta2", "train.grad_clip"):
        assert kinds[key] == "applied", key
    for key in ("data.sources.0.path", "data.sources.0.weight", "train.seed",
                "data.shuffle_window", "data.tokenizer", "data.vocab_size", "model.d_model",
                "data.seq_len", "checkpoint.dir"):
        assert kinds[key] == "refused", key
    for key in ("parallel.pp", "parallel.dp", "parallel.tp", "parallel.schedule",
                "cluster.workers", "train.micro_batch", "faults.max_restarts",
                "checkpoint.keep_last"):
        assert kinds[key] == "free", key


def test_a_changed_source_list_is_refused_with_both_values_and_the_fix():
    saved = flatten(to_dict(load_config("tiny")))
    current = flatten(to_dict(load_config("tiny", [
        "data.sources=[embedded:python-reference, /data/more.jsonl]", "train.lr=1e-3",
        "parallel.dp=2", "train.seed=7"])))
    problems = resume_problems(saved, current, "tiny", 100)
    assert len(problems) == 2
    sources = next(p for p in problems if p.startswith("data.sources"))
    assert "data.sources.1.path: None -> '/data/more.jsonl'" in sources
    assert "at step 100" in sources and "Fix:" in sources and "run.name=tiny-2" in sources
    assert any("train.seed: 1234 -> 7" in p for p in problems)
    assert applied_changes(saved, current) == ["train.lr: 0.003 -> 0.001"]


def test_a_full_fine_tunes_dpo_keeps_the_rows_of_its_reference_table():
    """Its reference log-probabilities were computed for the rows train.steps,
    train.global_batch and data.val_sequences gave; with LoRA they are not stored."""
    dpo = ["train.objective=dpo", "data.sources=[embedded:reverse-words-pairs]"]
    saved = flatten(to_dict(load_config("tiny", dpo)))
    current = flatten(to_dict(load_config("tiny", [*dpo, "train.steps=400", "train.lr=1e-3",
                                                   "data.val_sequences=7"])))
    [problem] = reference_problems(saved, current, "dpo", 100)
    assert problem.startswith("data.val_sequences: 32 -> 7; train.steps: 200 -> 400: run "
                              "'dpo' trains with train.objective=dpo without LoRA")
    assert "Fix: keep the saved values" in problem
    lora = [*dpo, "train.lora.rank=4"]
    assert reference_problems(flatten(to_dict(load_config("tiny", lora))), flatten(to_dict(
        load_config("tiny", [*lora, "train.steps=400"]))), "dpo", 100) == []
    assert reference_problems(saved, saved, "dpo", 100) == []
