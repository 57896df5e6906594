"""Printing a benchmark's table and keeping its latest results in docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Each section is written by the benchmark named in it, with the command that produced it;
ratios are against a baseline measured in the same run, on the same machine. On the
shared 2-core machines of this project the absolute figures move by 10-25% between
runs (the same bench measured the bare loop at 680 and at 502 tokens/s); the ratios
move less.
"""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import os

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers."""
    text = DOC.read_text() if DOC.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + section + "\n")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
