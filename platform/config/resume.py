"""What may change when a run resumes from its checkpoints: every key is applied,
refused or free, so that no change is silently ignored.

- applied: optimizer and schedule keys; they come from the config at every step, never
  from a checkpoint, so a new value takes effect from the resumed step on;
- refused: what decides the model's shape or the data each step sees (sources, seed,
  shuffle, tokenizer), and where the checkpoints and the MLflow run live; a resumed run
  could not honour a new value, so it is an error naming the saved and the new value;
- free: everything else (the layout, the cluster, intervals, fault settings...).
"""

from __future__ import annotations

from typing import Any

APPLIED = ("train.lr", "train.min_lr", "train.warmup_steps", "train.steps",
           "train.weight_decay", "train.beta1", "train.beta2", "train.grad_clip",
           "train.global_batch", "tracking.run_name", "tracking.uri")

# (key or section prefix, why a resumed run cannot take a new value)
REFUSED = (
    ("model.", "it is the model's shape, which the checkpoints were written for"),
    ("data.seq_len", "it is the model's sequence length, which the checkpoints were "
                     "written for"),
    ("data.sources", "they decide the documents every step sees"),
    ("data.validation_sources", "they decide which documents are held out, and whether "
                                "training holds any out of its sources"),
    ("data.val_share", "it decides which documents are held out of training"),
    ("data.shuffle_window", "it decides the order of the documents"),
    ("data.bos", "it changes the tokens of every document"),
    ("data.max_document_mb", "it decides which records are skipped"),
    ("data.packing", "it decides how samples fill the sequences every step sees"),
    ("data.overlong", "it decides which samples are dropped"),
    ("data.tokenizer", "the run keeps the tokenizer it started with (tokenizer.json in its "
                       "directory)"),
    ("data.vocab_size", "the run keeps the tokenizer it started with"),
    ("data.tokenizer_sample_mb", "the run keeps the tokenizer it started with"),
    ("train.seed", "it decides the initial weights and the order of the files"),
    ("checkpoint.dir", "it is where the run's checkpoints are"),
    ("tracking.experiment", "the run's MLflow run lives in the experiment it started in"),
)


def rule_of(key: str) -> tuple[str, str] | None:
    """(the REFUSED entry's key, why) for a refused key; None for the others."""
    for prefix, why in REFUSED:
        if key == prefix or key.startswith(prefix if prefix.endswith(".") else prefix + "."):
            return prefix.rstrip("."), why
    return None


def kind_of(key: str) -> str:
    """applied, refused or free."""
    if key in APPLIED:
        return "applied"
    return "refused" if rule_of(key) else "free"


def changed(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (saved, current) for every flattened key whose value differs."""
    return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)}


def resume_problems(saved: dict[str, Any], current: dict[str, Any], run_name: str,
                    step: int) -> list[str]:
    """One problem per refused rule whose keys changed, with the saved and the new values."""
    by_rule: dict[tuple[str, str], list[str]] = {}
    for key, (old, new) in changed(saved, current).items():
        rule = rule_of(key)
        if rule:
            by_rule.setdefault(rule, []).append(f"{key}: {old!r} -> {new!r}")
    return [f"{name} differs from the run's saved config ({'; '.join(diffs)}), and {why}: "
            f"run '{run_name}' cannot resume from its checkpoint at step {step} with it. Fix: "
            f"keep the saved value (`raytron status` shows the run; its config.yaml holds "
            f"them), or start a new run with another run.name (e.g. run.name={run_name}-2)."
            for (name, why), diffs in by_rule.items()]


def changes(saved: dict[str, Any], current: dict[str, Any],
            keys: tuple[str, ...] | None = None) -> list[str]:
    """'key: old -> new' for each key (of `keys`, if given) that changed."""
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed(saved, current).items()
            if keys is None or key in keys]


def applied_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each applied key that changed."""
    return changes(saved, current, APPLIED)
