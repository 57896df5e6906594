"""A rank's random-number state as JSON: saved beside its shards, read without unpickling.

On a GPU, only the rank's own device's state: Ray shows every worker of a node all the
node's GPUs, so saving `get_rng_state_all` wrote every device's state into each rank's
file, and a resume that sees fewer devices (an elastic shrink, one GPU) indexed past them.
"""

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
        state["cuda"] = encode(torch.cuda.get_rng_state())  # the current device's
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
            "cuda": device_states(state.get("cuda")),
        }
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"not a JSON random state ({type(error).__name__}: {error})") from None


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available():
        own = own_device_state(state["cuda"], torch.cuda.current_device())
        if own is not None:
            torch.cuda.set_rng_state(own)


def device_states(saved: str | list[str] | None) -> list[torch.Tensor]:
    """The saved CUDA states: one (the rank's device), or, in checkpoints written before
    raytron saved only that one, one per device the rank could see."""
    if saved is None:
        return []
    return [decode(text) for text in ([saved] if isinstance(saved, str) else saved)]


def own_device_state(states: list[torch.Tensor], device: int) -> torch.Tensor | None:
    """The state for the device this rank trains on: the one saved, or in a checkpoint
    with every visible device's, the one at this device's index if it was saved (a run
    resumed on fewer devices leaves the others' unused)."""
    if len(states) == 1:
        return states[0]
    return states[device] if device < len(states) else None


def encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
