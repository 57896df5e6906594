"""What the schema declares for a dotted key (`train.lr`, `data.sources.0.path`,
`cluster.worker_resources.trainer`): its rule, its resume kind and its default, read from
the field each key is declared with in `schema.py` (`rules.key`)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterator
from typing import Any

from raytron.platform.config.rules import DECLARATION, Declaration, Resume, Rule
from raytron.platform.config.schema import RaytronConfig

Step = tuple[str, dataclasses.Field, list[str]]  # a field's dotted key, it, the key's parts
# below it


def declaration(field: dataclasses.Field) -> Declaration:
    """What a field declares; nothing for one declared without `rules.key`."""
    return field.metadata.get(DECLARATION, Declaration())


@functools.cache
def fields_of(section: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """A section's fields by name, each with its type."""
    types = typing.get_type_hints(section)
    return {field.name: (field, types[field.name]) for field in dataclasses.fields(section)}


def steps(key: str) -> list[Step]:
    """The fields of the schema `key` goes through, from its section down, as far as the
    schema has them; a list of sections' index is part of the next step's key."""
    names, found = key.split("."), []
    section: Any = RaytronConfig
    at = 0
    while section is not None and at < len(names) and names[at] in fields_of(section):
        field, kind = fields_of(section)[names[at]]
        at += 1
        found.append((".".join(names[:at]), field, names[at:]))
        section = kind if dataclasses.is_dataclass(kind) else None
        if typing.get_origin(kind) is list and at < len(names) and names[at].isdigit():
            (entry,) = typing.get_args(kind)
            section, at = (entry, at + 1) if dataclasses.is_dataclass(entry) else (None, at)
    return found


def rule_of(key: str) -> Rule | None:
    """A key's rule, or its list's or mapping's rule for their values; None for a key the
    schema lacks or declares without one."""
    found = steps(key)
    if not found:
        return None
    _, field, below = found[-1]
    return declaration(field).entries if below else declaration(field).rule


def resume_of(key: str) -> tuple[str, Resume] | None:
    """A key's resume kind and the key declaring it: the key itself, or the section or
    list above it (`model`, `data.sources`) for all of their keys."""
    return next(((path, declaration(field).resume) for path, field, _ in steps(key)
                 if declaration(field).resume), None)


def default_of(key: str) -> Any:
    """A key's default (a list's sections: a new one's); None for a list's or a mapping's
    values, and for a key the schema lacks."""
    found = steps(key)
    if not found or found[-1][2]:
        return None
    field = found[-1][1]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def schema_keys(section: type = RaytronConfig, prefix: str = "") -> Iterator[
        tuple[str, Declaration]]:
    """Every field's dotted key and declaration in the schema's order, sections' before
    theirs; the values of lists and mappings are not fields."""
    for name, (field, kind) in fields_of(section).items():
        yield prefix + name, declaration(field)
        if dataclasses.is_dataclass(kind):
            yield from schema_keys(kind, f"{prefix}{name}.")
