"""A worker's own lines, written to its stderr once. In Ray Train's workers `print` is
patched: a line printed to `sys.stderr` goes to the stream and to Ray Train's logger,
which writes it to stderr again, and Ray forwards both copies to the driver (the console
showed each drill twice). Printing to the process's own `sys.__stderr__` bypasses that."""

from __future__ import annotations

import sys


def say(line: str) -> None:
    print(line, file=sys.__stderr__, flush=True)
