"""A rank's random state holds its own GPU's state, and a checkpoint written where a rank
saw more GPUs loads where it sees fewer (an elastic shrink, a move to one GPU). The GPUs
are simulated: torch.cuda's state functions replaced by devices that refuse an index past
their count, as CUDA does."""

import json

import pytest
import torch

from raytron.platform.storage.rng_state import (
    encode,
    parse_rng_state,
    rng_state_json,
    set_rng_state,
)


class SimulatedGPUs:
    def __init__(self, count: int, current: int = 0):
        self.current = current
        self.states = [torch.full((16,), index, dtype=torch.uint8) for index in range(count)]

    def index(self, device) -> int:
        index = self.current if device == "cuda" else torch.device(device).index
        if index >= len(self.states):
            raise RuntimeError(f"Invalid device index {index}: {len(self.states)} devices")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()

    def install(self, monkeypatch) -> "SimulatedGPUs":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        return self


def test_a_rank_saves_its_own_gpu_and_resumes_where_there_is_one(monkeypatch):
    SimulatedGPUs(8, current=5).install(monkeypatch)
    saved = rng_state_json()
    assert isinstance(json.loads(saved)["cuda"], str)  # one state, not the node's eight
    one = SimulatedGPUs(1).install(monkeypatch)
    set_rng_state(parse_rng_state(saved.encode()))
    assert one.states[0].tolist() == [5] * 16  # device 5's state, now on device 0


def test_a_checkpoint_with_every_visible_gpus_state_loads_with_fewer(monkeypatch):
    """As raytron wrote them before: each rank of an 8-GPU node saved all eight."""
    eight = SimulatedGPUs(8)
    text = json.loads(rng_state_json())  # the CPU states, this process's
    text["cuda"] = [encode(state) for state in eight.states]
    one = SimulatedGPUs(1).install(monkeypatch)
    set_rng_state(parse_rng_state(json.dumps(text).encode()))
    assert one.states[0].tolist() == [0] * 16
    two = SimulatedGPUs(2, current=1).install(monkeypatch)
    set_rng_state(parse_rng_state(json.dumps(text).encode()))
    assert two.states[1].tolist() == [1] * 16


@pytest.mark.parametrize("cuda", [7, [7], {"a": 1}])
def test_a_malformed_gpu_state_is_refused_as_data(cuda):
    text = json.loads(rng_state_json())
    text["cuda"] = cuda
    with pytest.raises(ValueError, match="not a JSON random state"):
        parse_rng_state(json.dumps(text).encode())
