"""Waiting for the application to run, out loud: Serve's own wait is silent and endless
when a replica cannot be placed or keeps failing to start, so the command says what
Serve reports while it waits and gives up, once, after --start-timeout-s."""

import time
from collections.abc import Callable

REPORT_EVERY_S = 30.0


class ServeStartFailed(RuntimeError):
    """The application failed to deploy, or did not run within the start timeout."""


def named(state) -> str:
    """An enum of Serve's by its value ("RUNNING"), whatever its class."""
    return str(getattr(state, "value", state))


def status_text(application) -> str:
    """What Serve says of the application and of each deployment that is not healthy."""
    parts = [application.message] if application.message else []
    for name, deployment in application.deployments.items():
        if named(deployment.status) == "HEALTHY":
            continue
        states = ", ".join(f"{count} {named(state).lower()}"
                           for state, count in deployment.replica_states.items() if count)
        detail = f"{name}: {named(deployment.status).lower()}"
        detail += f" ({states})" if states else ""
        detail += f": {deployment.message}" if deployment.message else ""
        parts.append(detail)
    return "; ".join(parts) or "starting"


def wait_until_running(application: Callable[[], object | None], timeout_s: float,
                       say: Callable[[str], None], poll_s: float = 0.5,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> None:
    """Returns once `application()` (Serve's status of it, None before Serve has it)
    runs; raises ServeStartFailed when it failed, or still does not run after
    timeout_s. Says what Serve reports every REPORT_EVERY_S meanwhile."""
    start = clock()
    reported = start
    while True:
        status = application()
        state = named(status.status) if status is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        text = status_text(status) if status is not None else "starting"
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeStartFailed(f"the application failed to start: {text}")
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise ServeStartFailed(
                f"the application did not run within --start-timeout-s {timeout_s:g}: {text}. "
                "Fix: give the cluster what the replicas ask for (see `ray status`), or "
                "raise --start-timeout-s for a model that loads slowly.")
        if clock() - reported >= REPORT_EVERY_S:
            say(f"Waiting for the replicas ({elapsed:.0f} s): {text}")
            reported = clock()
        sleep(poll_s)
