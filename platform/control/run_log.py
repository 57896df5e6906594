"""The console is raytron's: what Ray, its workers and the libraries they run say goes to
the run's log file.

A run's console used to carry Ray's token-authentication notice, Ray Train's controller
lines, a deprecation warning of torch's per rank, DTensor's and NumPy's warnings and,
with another Ray on the machine, a 30-line traceback of Ray Train's placement-group
cleaner: nothing a user acts on, and it buried raytron's own lines. While a training
runs, Ray's driver-side loggers, Python warnings raised in the driver and every line a
Ray worker prints (which Ray forwards to the driver) are written to
`<run dir>/raytron.log`, each worker line prefixed with the actor and process that said
it. raytron reports failures itself (which ranks, what, what to do), and names the file;
the lines its own worker code prints for the user (`raytron: ...`) still reach the
console.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

LOG_FILE = "raytron.log"
OWN_PREFIX = "raytron: "  # how raytron's worker code starts a line meant for the user
RAY_PRINTER = "ray_print_logs"  # the name Ray gives its handler of forwarded worker output
OURS = "raytron_run_log"


class RunLog:
    """Routes Ray's driver logging and Python warnings to `path` while entered;
    `capture_workers` (once Ray is up) routes the workers' forwarded output there too."""

    def __init__(self, path: Path):
        self.path = path
        self.file: TextIO | None = None
        self.handler: logging.Handler | None = None
        self.console_handlers: list[logging.Handler] = []
        self.showwarning = warnings.showwarning
        self.printer: Any = None  # Ray's own printer of the raylets' notices, while replaced

    def __enter__(self) -> RunLog:
        import ray  # noqa: F401 (importing it installs its console handler, replaced here)

        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger = logging.getLogger("ray")
        self.console_handlers = [h for h in ray_logger.handlers
                                 if type(h) is not logging.FileHandler]
        for handler in self.console_handlers:
            ray_logger.removeHandler(handler)
        ray_logger.addHandler(self.handler)
        self.showwarning = warnings.showwarning
        warnings.showwarning = self.warning
        return self

    def __exit__(self, *exc: object) -> None:
        warnings.showwarning = self.showwarning
        ray_logger = logging.getLogger("ray")
        ray_logger.removeHandler(self.handler)
        for handler in self.console_handlers:
            ray_logger.addHandler(handler)
        self.release_workers()
        self.file.close()

    def warning(self, message: Warning | str, category: type[Warning], filename: str,
                lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
        self.file.write(warnings.formatwarning(message, category, filename, lineno, line))

    def capture_workers(self) -> None:
        """The lines Ray's workers print, which Ray forwards to this driver, into the log:
        instead of Ray's printer of them, never beside it; and the raylets' error notices
        ("a worker died ..."), which Ray prints to the console directly."""
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(RAY_PRINTER)
        dispatcher.remove_handler(OURS)
        dispatcher.add_handler(OURS, self.worker_lines)
        self.printer = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = lambda data, ignore_prefix: self.worker_lines(data)

    def release_workers(self) -> None:
        try:
            import ray._private.worker as ray_worker
            from ray._private.ray_logging import global_worker_stdstream_dispatcher
        except ImportError:  # no Ray in this process
            return
        global_worker_stdstream_dispatcher.remove_handler(OURS)
        if self.printer is not None:
            ray_worker.print_to_stdstream = self.printer

    def worker_lines(self, data: dict[str, Any]) -> None:
        """One batch of a worker's forwarded output: `lines` with who said them. A line
        raytron's own worker code printed (a drill firing, the watchdog failing a rank:
        `raytron: ...`) is shown on the console too."""
        who = data.get("actor_name") or data.get("task_name") or (
            "raylet" if data.get("pid") == "raylet" else "worker")
        prefix = f"({who} pid={data.get('pid')}{', stderr' if data.get('is_err') else ''}) "
        lines = data.get("lines", [])
        self.file.write("".join(f"{prefix}{line}\n" for line in lines))
        for line in lines:
            if line.startswith(OWN_PREFIX):
                tqdm.write(line, file=sys.stderr)
