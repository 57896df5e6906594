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
