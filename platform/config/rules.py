"""How `schema.py` declares a key, so that adding one is one edit: its default, the rule its
value must satisfy, and what a resumed run does with a new value (`key`, `section`).

A rule is a small function `(key, value) -> problem | None`; each problem names the key,
the value and the fix. `validate.py` checks every value with its key's rule before the
rules between keys; `resume.py` reads the resume kinds.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raytron.platform.config.drills import parse_injection

MAX_COUNT = 2**31 - 1  # any count: beyond it, no run is meant
MAX_LAYERS = 4096  # a model beyond these sizes is a typo, and `raytron plan` would
MAX_WIDTH = 2**20  # ... spend minutes building it on the meta device
MAX_VOCABULARY = 2**24
MAX_SEQUENCE = 2**24
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
DECLARATION = "raytron"  # the field metadata entry holding a key's `Declaration`

Rule = Callable[[str, Any], "str | None"]


@dataclass(frozen=True)
class Resume:
    """What a resumed run does with a new value of a key (`resume.py` says why)."""

    kind: str  # applied | refused | free
    why: str = ""  # refused: why a resumed run cannot take a new value


APPLIED = Resume("applied")
FREE = Resume("free")


def refused(why: str) -> Resume:
    return Resume("refused", why)


@dataclass(frozen=True)
class Declaration:
    """What a field of the schema declares besides its type and default."""

    rule: Rule | None = None  # its value's; None for a section
    entries: Rule | None = None  # each value of a list or mapping of plain values
    resume: Resume | None = None  # for the key and every key below it (a section's, a list's)


def key(default: Any, rule: Rule, resume: Resume | None = None, *,
        entries: Rule | None = None) -> Any:
    """A config key: its default, its value's rule, its entries' (a list or mapping of
    values), and its resume kind unless the section or list above it declares one."""
    metadata = {DECLARATION: Declaration(rule, entries, resume)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(kind: type, resume: Resume | None = None) -> Any:
    """A section of keys; with `resume`, the kind of every key in it."""
    return field(default_factory=kind, metadata={DECLARATION: Declaration(resume=resume)})


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    return is_int(value) and value >= 1


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def example(key: str, fallback: Any) -> str:
    """The key's default, as a problem's example; `fallback` when it has none."""
    from raytron.platform.config.keys import default_of  # keys.py reads the schema, which
    # is declared with these rules

    value = default_of(key)
    return f"{value:g}" if isinstance(value, float) else str(value if value else fallback)


def count(maximum: int = MAX_COUNT, optional: bool = False) -> Rule:
    """A whole number from 1 to `maximum`."""
    def rule(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not is_int(value) or value < 1:
            unset = " or leave it unset" if optional else ""
            return (f"{key}={value!r} must be a whole number of 1 or more. Fix: set {key} to "
                    f"e.g. {example(key, 1)}{unset}.")
        if value > maximum:
            return (f"{key}={value} is larger than {maximum}, more than any run needs. Fix: "
                    f"use a value up to {maximum} (e.g. {example(key, 1)}).")
        return None
    return rule


def natural(key: str, value: Any) -> str | None:
    """A whole number from 0."""
    if not is_int(value) or not 0 <= value <= MAX_COUNT:
        return f"{key}={value!r} must be a whole number of 0 or more. Fix: use e.g. " \
               f"{example(key, 0)}."
    return None


def natural_or_none(key: str, value: Any) -> str | None:
    """A whole number from 0, or None."""
    return None if value is None else natural(key, value)


def number(minimum: float = 0.0, positive: bool = True, below: float | None = None,
           optional: bool = False) -> Rule:
    """A finite number above `minimum` (or from it, unless `positive`), below `below`."""
    def rule(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        low_ok = is_number(value) and (value > minimum if positive else value >= minimum)
        if low_ok and math.isfinite(value) and (below is None or value < below):
            return None
        what = f"more than {minimum:g}" if positive else f"{minimum:g} or more"
        if below is not None:
            what += f" and less than {below:g}"
        unset = " or leave it unset" if optional else ""
        return (f"{key}={value!r} must be a finite number {what}. Fix: use e.g. "
                f"{example(key, 1.0)}{unset}.")
    return rule


def one_of(choices: tuple[str, ...]) -> Rule:
    def rule(key: str, value: Any) -> str | None:
        if value in choices:
            return None
        return f"{key}={value!r} is unknown. Fix: use one of {', '.join(choices)}."
    return rule


def count_or(choices: tuple[str, ...], meaning: str, lowest: int = 1) -> Rule:
    """One of `choices`, or a whole number from `lowest`."""
    def rule(key: str, value: Any) -> str | None:
        if value in choices or is_int(value) and lowest <= value <= MAX_COUNT:
            return None
        return (f"{key}={value!r} must be a whole number of {lowest} or more or "
                f"{' or '.join(choices)}. Fix: {meaning}.")
    return rule


def text(optional: bool = False) -> Rule:
    """A non-empty string."""
    def rule(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, str) and value.strip() and "\x00" not in value:
            return None
        unset = ", or leave it unset (null)" if optional else ""
        return f"{key}={value!r} must be a non-empty text without NUL characters. Fix: " \
               f"give a value{unset}."
    return rule


def folder_name(key: str, value: Any) -> str | None:
    """A name that becomes one folder: it cannot climb out of its parent."""
    if (isinstance(value, str) and value.strip() and value not in (".", "..")
            and not re.search(r"[/\\\x00-\x1f]", value) and len(value.encode()) <= 200):
        return None
    return (f"{key}={value!r} must be one folder name (no '/', '\\', '..' or control "
            f"characters; at most 200 bytes): it becomes a path under run.root. Fix: use e.g. "
            f"{example(key, 'my-run')}.")


def run_name(key: str, value: Any) -> str | None:
    """A folder name safe anywhere it goes: the run's folder, its MLflow run, the file and
    the command line of a submitted job."""
    if (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", value)
            and len(value) <= 200):
        return None
    return (f"{key}={value!r} must be one folder name of letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-'; at most 200 characters): it names the run's "
            f"folder, its MLflow run and a submitted job's files. Fix: use e.g. {key}=my-run.")


def a_list(non_empty: bool = False) -> Rule:
    def rule(key: str, value: Any) -> str | None:
        if isinstance(value, list) and (value or not non_empty):
            return None
        return f"{key} is empty. Fix: give at least one entry, e.g. {key}='[corpus/]'."
    return rule


def optional_list(key: str, value: Any) -> str | None:
    return None if value is None or isinstance(value, list) else f"{key} must be a list."


def drill(key: str, value: Any) -> str | None:
    try:
        parse_injection(int(key.rsplit(".", 1)[1]), value)
    except ValueError as error:
        return str(error)
    return None


def worker_resource(key: str, value: Any) -> str | None:
    name = key.removeprefix("cluster.worker_resources.")
    if name in RAY_BUILTIN_RESOURCES or not name.strip():
        return (f"cluster.worker_resources names '{name}', which raytron sets itself. Fix: "
                "use cluster.cpus_per_worker / cluster.gpus_per_worker, and worker_resources "
                "only for custom resources such as {trainer: 1}.")
    return number()(key, value)


def anything(key: str, value: Any) -> str | None:
    """A value OmegaConf has checked already: a bool, a typed mapping."""
    return None
