"""Starting a local Ray: a start the raylet gave up on because its agents were late (a
busy machine, ray-project/ray#65983) is tried once more; any other failure is not."""

import pytest
import ray

from raytron.platform.config.load import load_config
from raytron.platform.control import placement

TIMED_OUT = ("The current node timed out during startup. This could happen because some of "
             "the raylet failed to startup or the GCS has become overloaded.")


def started(monkeypatch, failures: list[Exception]) -> list[str]:
    """What `start_ray` did with a Ray whose starts raise `failures` first, in order."""
    calls: list[str] = []

    def init(**options):
        calls.append(f"init {options['address']}")
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    placement.start_ray(load_config("tiny", ["cluster.dashboard=false"]))
    return calls


def test_a_start_that_timed_out_is_tried_once_more(monkeypatch):
    assert started(monkeypatch, [Exception(TIMED_OUT)]) == [
        "init local", "shutdown", "init local"]


def test_a_second_timeout_and_other_failures_are_raised(monkeypatch):
    with pytest.raises(Exception, match="timed out during startup"):
        started(monkeypatch, [Exception(TIMED_OUT), Exception(TIMED_OUT)])
    with pytest.raises(ValueError, match="bad"):
        started(monkeypatch, [ValueError("bad")])


def test_the_mlflow_run_opens_while_ray_starts_and_a_failed_start_still_ends_it(monkeypatch):
    """Ray's start (in the main thread, where its signal handlers must be made) and the
    MLflow run's opening overlap: here Ray's start waits for the opening to begin. What
    the start raises, Ctrl-C too, is handed back with the opened run, for the run to be
    ended as failed or stopped rather than left open."""
    import threading
    from types import SimpleNamespace

    from raytron.platform.control import run as running

    opening = threading.Event()

    def open_tracking(run, last_start):
        opening.set()
        return "tracking", "run-id", False

    outcomes = [None, RuntimeError("no Ray"), KeyboardInterrupt()]

    def start_ray(config):
        assert opening.wait(timeout=30), "Ray started only after the MLflow run opened"
        if error := outcomes.pop(0):
            raise error

    monkeypatch.setattr(running, "open_tracking", open_tracking)
    monkeypatch.setattr(running, "start_ray", start_ray)
    run = SimpleNamespace(config=None)
    assert running.opened_while_ray_starts(run, None) == (("tracking", "run-id", False), None)
    opening.clear()
    opened, error = running.opened_while_ray_starts(run, None)
    assert opened == ("tracking", "run-id", False) and str(error) == "no Ray"
    opening.clear()
    assert isinstance(running.opened_while_ray_starts(run, None)[1], KeyboardInterrupt)
