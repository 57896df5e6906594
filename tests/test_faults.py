"""Fault drills, their validation, and how failures are summarized."""

import pytest

from raytron.platform.cli import EXIT_CONFIG_ERROR, main
from raytron.platform.controller import failure_gist
from raytron.platform.faults import Injection, parse_injections
from raytron.platform.layout import Layout


def test_drills_parse():
    assert parse_injections(["kill rank 3 at step 7", "hang rank 1 at step 5",
                             "raise in rank 0 at step 2",
                             "raise in rank 0 during checkpoint at step 10"]) == [
        Injection(0, "kill", 3, 7), Injection(1, "hang", 1, 5), Injection(2, "raise", 0, 2),
        Injection(3, "raise", 0, 10, during_checkpoint=True)]


@pytest.mark.parametrize(("entry", "expected"), [
    ("explode rank 1 at step 2", "is not a drill"),
    ("kill rank 1 during checkpoint at step 2", "is not a drill"),
    ("kill rank 7 at step 2", "rank 7 does not exist with cluster.workers=1"),
])
def test_bad_drills_are_config_errors(capsys, entry, expected):
    assert main(["config", "tiny", f"faults.inject=[{entry}]"]) == EXIT_CONFIG_ERROR
    assert expected in capsys.readouterr().err


def test_failures_are_summarized_per_rank_with_coordinates():
    error = RuntimeError(
        "Training failed due to worker errors:\n"
        "[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n...\n"
        "RuntimeError: Connection closed by peer [127.0.0.1]:1234\n"
        "[Rank 3 Error Snippet]:\nA worker health check failed.\nWorker info: Worker(\n")
    gist = failure_gist(error, Layout(1, 2, 2))
    assert gist == ("rank 0 (pp=0, dp=0, tp=0): RuntimeError: Connection closed by peer "
                    "[127.0.0.1]:1234; rank 3 (pp=0, dp=1, tp=1): A worker health check failed.")
    assert failure_gist(RuntimeError("boom\nlast words"), Layout()) == "last words"
