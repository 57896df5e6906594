"""Run a function on a local group of CPU processes joined by gloo: the cheap way to
exercise any layout without Ray or devices (tests, benchmarks, debugging a layout)."""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, folder: str, fn: Callable, args: tuple,
               threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            Path(folder, "result.pkl").write_bytes(pickle.dumps(result))
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # A rank that is done leaves without the interpreter's teardown: there, now and then,
    # a gloo thread still joinable aborts the process ("terminate called without an active
    # exception", SIGABRT) after its work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Ranks are forked from a server process that imported torch and the parallel harness once
# and never ran an op or made a group, so each rank starts clean without importing torch
# again (a spawned rank spends seconds on it: most of a small layout test's time).
mp.set_forkserver_preload(["torch", "torch.distributed", "parallel_harness"])


def run_on_gloo(world: int, fn: Callable, *args, threads: int = 1):
    """`fn(*args)` on `world` fresh ranks with a gloo process group; returns rank 0's
    result. `fn` must be importable (a module-level function)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_main, args=(world, folder, fn, args, threads), nprocs=world,
                           start_method="forkserver")
        return pickle.loads(Path(folder, "result.pkl").read_bytes())
