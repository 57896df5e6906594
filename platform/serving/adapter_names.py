"""What a server is told about its adapters (`--adapter`, `--adapters-dir`, the bank's
bounds) and what a valid adapter name is, without torch: the serve command checks them
before a model loads (`adapters.py` reads the adapters)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_RANK = 8, 16  # per replica (SGLang's 8); vLLM's rank


class AdapterError(ValueError):
    """An adapter that cannot be served: why, and the fix."""


@dataclass
class AdapterSettings:
    paths: dict[str, str] = field(default_factory=dict)  # NAME -> PATH (--adapter)
    directory: str | None = None  # --adapters-dir: NAME is the folder DIR/NAME
    max_adapters: int = DEFAULT_MAX_ADAPTERS  # on the device at once, per replica
    max_rank: int = DEFAULT_MAX_RANK  # the largest rank the bank takes

    @property
    def enabled(self) -> bool:
        return bool(self.paths) or self.directory is not None


def name_problem(name: str) -> str | None:
    if not NAME.fullmatch(name):
        return f"an adapter's name is {NAME_RULE}, and {name[:80]!r} is not"
    return None
