"""A rank's random-number state as JSON: saved beside its shards, read without unpickling."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import torch


def rng_state_json() -> str:
    """torch (CPU and CUDA), Python and NumPy generator states."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": encode(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = [encode(s) for s in torch.cuda.get_rng_state_all()]
    return json.dumps(state)


def parse_rng_state(text: bytes) -> dict:
    """The states in `text`; ValueError when it is not what `rng_state_json` wrote."""
    try:
        state = json.loads(text)
        version, internal, gauss = state["python"]
        kind, keys, position, has_gauss, cached = state["numpy"]
        return {
            "torch": decode(state["torch"]),
            "python": (int(version), tuple(int(k) for k in internal),
                       None if gauss is None else float(gauss)),
            "numpy": (str(kind), np.asarray(keys, dtype=np.uint32), int(position),
                      int(has_gauss), float(cached)),
            "cuda": [decode(s) for s in state.get("cuda", [])],
        }
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"not a JSON random state ({type(error).__name__}: {error})") from None


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
