"""Who may use the API. Authentication fails closed: an empty key is a mistake (an unset
Secret, a typo in an export), never "no key"; a server that other machines can reach
needs a key unless that is asked for; the key is compared in constant time, so that
the time an answer takes tells nothing of how much of a guess was right."""

from __future__ import annotations

import hmac
import ipaddress

API_KEY_VARIABLE = "RAYTRON_API_KEY"


def checked_key(key: str | None, where: str = f"${API_KEY_VARIABLE}") -> str | None:
    """`key`, or None for no key; ValueError for an empty one."""
    if key is not None and not key.strip():
        raise ValueError(f"{where} is empty, and an empty API key would let anyone in. Fix: "
                         "give a key, or none at all to serve without one")
    return key


def authorized(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries `key` (Bearer), compared in constant time."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {key}".encode())


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to any address
        return False
