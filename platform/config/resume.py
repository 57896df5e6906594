"""What may change when a run resumes from its checkpoints: every key is applied,
refused or free, so that no change is silently ignored. Each key's kind is declared with
it in `schema.py` (or, for all of a section's or a list's keys, on the section or list).

- applied: optimizer and schedule keys; they come from the config at every step, never
  from a checkpoint, so a new value takes effect from the resumed step on;
- refused: what decides the model's shape or the data each step sees (sources, seed,
  shuffle, tokenizer), and where the checkpoints and the MLflow run live; a resumed run
  could not honour a new value, so it is an error naming the saved and the new value;
- free: everything else (the layout, the cluster, intervals, fault settings...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raytron.platform.config.keys import resume_of


def rule_of(key: str) -> tuple[str, str] | None:
    """(the key the refusal is declared on, why) for a refused key; None for the others."""
    declared = resume_of(key)
    if declared is None or declared[1].kind != "refused":
        return None
    return declared[0], declared[1].why


def kind_of(key: str) -> str | None:
    """applied, refused or free; None for a key declared without one."""
    declared = resume_of(key)
    return declared[1].kind if declared else None


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
            which: Callable[[str], bool] = lambda key: True) -> list[str]:
    """'key: old -> new' for each key (`which` takes) that changed."""
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed(saved, current).items()
            if which(key)]


def applied_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each applied key that changed."""
    return changes(saved, current, lambda key: kind_of(key) == "applied")


# what decides the rows of a full fine-tune's DPO reference table (worker/references.py)
REFERENCE_ROWS = ("train.steps", "train.global_batch", "data.val_sequences")


def reference_problems(saved: dict[str, Any], current: dict[str, Any], run_name: str,
                       step: int) -> list[str]:
    """train.objective=dpo without LoRA keeps what decides its reference table's rows:
    its starting weights computed them once, and trained weights cannot compute more."""
    if current.get("train.objective") != "dpo" or current.get("train.lora.rank"):
        return []
    diffs = changes(saved, current, lambda key: key in REFERENCE_ROWS)
    if not diffs:
        return []
    return [f"{'; '.join(diffs)}: run '{run_name}' trains with train.objective=dpo without "
            "LoRA, whose reference log-probabilities were computed before its first step "
            "for the rows these keys gave, and trained weights cannot compute others; it "
            f"cannot resume from step {step} with them. Fix: keep the saved values, or start "
            f"a new run from its checkpoint (model.init_from, run.name={run_name}-2)."]
