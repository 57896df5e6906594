"""Credentials in URIs never leave the process.

`postgresql://user:pass@host/db`, `https://token@host` and query strings
(`...?key=...&sig=...`) carry secrets. The process uses the real values; what it writes
(MLflow params and tags, the saved `config.yaml`, every printed line) shows
`user:***@`, `***@` and `key=***` instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MASK = "***"
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
USERINFO = re.compile(r"^(?P<scheme>[^:]+://)(?P<userinfo>[^/?#]*)@")
QUERY_VALUE = re.compile(r"(?P<name>[?&;][^=&#;]+)=(?P<value>[^&#;]*)")
# Query names whose values are no secret and must stay: MLflow's page addresses switch
# its view with it (`.../#/experiments/1/runs/<id>?workflowType=machine_learning`).
PUBLIC_QUERY_NAMES = ("workflowType",)


def redact_uri(uri: str) -> str:
    """`uri` with the password (or a token standing alone) and query values masked."""
    def userinfo(match: re.Match) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"

    def query_value(match: re.Match) -> str:
        public = match["name"][1:] in PUBLIC_QUERY_NAMES
        return match.group() if public else f"{match['name']}={MASK}"

    redacted = USERINFO.sub(userinfo, uri, count=1)
    head, question, query = redacted.partition("?")
    if question:
        query = QUERY_VALUE.sub(query_value, "?" + query)[1:]
    return head + question + query


def redact_text(text: str) -> str:
    """Every URI in `text` redacted."""
    return URI.sub(lambda match: redact_uri(match.group()), text)


def redacted(value: Any) -> Any:
    """A config (or any part of one) with every string redacted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: redacted(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redacted(item) for item in value]
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    return value
