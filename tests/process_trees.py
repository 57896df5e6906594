"""Stopping what a test started, at once and whole."""

import contextlib
import os
import signal

import psutil


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant: Ray's worker processes
    have process groups of their own, and would otherwise work on for the moment they
    take to notice that Ray is gone; and a Ray asked to stop (SIGTERM) drains its node
    first, ~30 s of a Serve proxy's wait."""
    try:
        tree = psutil.Process(pid)
        processes = [tree, *tree.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
