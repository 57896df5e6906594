"""Whether `raytron serve` can listen where it is asked to, found before Ray starts: Ray
Serve would otherwise end in a long traceback for a port another program holds, and a
second `raytron serve` on this machine would have joined the first one's Serve and
replaced its model."""

from __future__ import annotations

import errno
import json
import socket
import urllib.request

ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def port_problem(host: str, port: int, api_key: str | None = None) -> str | None:
    """Why nothing can listen on host:port (bound and let go at once, as the server will
    bind it: SO_REUSEADDR, so a port that a stopped server left in TIME_WAIT is free),
    or None."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, protocol) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except socket.gaierror as error:
        return f"--host {host} is no address this machine knows ({error.strerror})"
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return (f"port {port} on {host} is taken by {holder(host, port, api_key)}. Fix: "
                    f"stop it, or give another --port")
        if error.errno == errno.EADDRNOTAVAIL:
            return f"--host {host} is no address of this machine. Fix: give one of its own"
        return f"cannot listen on {host}:{port}: {error.strerror}. Fix: give another --port"
    return None


def holder(host: str, port: int, api_key: str | None) -> str:
    """What holds the port, by asking it for OpenAI's model list as raytron answers it."""
    host = ANY_ADDRESS.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=2) as answer:
            models = json.loads(answer.read(1 << 16))["data"]
        if models and all(model["owned_by"] == "raytron" for model in models):
            bases = [m["id"] for m in models if not m.get("parent")]  # not its adapters
            return f"another raytron serve (model {', '.join(bases)})"
    except Exception:  # anything that is not raytron's answer: another program
        pass
    return "another program"
