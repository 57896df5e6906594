"""In-memory snapshots: a rank's share restores the exact training state (training then
goes on as if uninterrupted), bfloat16 survives the trip, a share of another model is
refused naming a tensor, a keeper holds its own copy of each rank's two newest
steps (the oldest one's buffers taking the newest), of one timeline, and a rank hands
its share over while training goes on, a checkpoint of the step written from it."""

import numpy as np
import pytest
import torch
from test_checkpoint import TRAIN, assert_same_weights, step, trainer

from raytron.platform.storage.checkpoint import apply_training_state, training_state
from raytron.platform.storage.rng_state import parse_rng_state, rng_state_json, set_rng_state
from raytron.platform.storage.snapshots import SnapshotKeeper
from raytron.platform.worker.optim import apply_hyperparameters
from raytron.platform.worker.snapshotting import restore_into, share_of


def test_a_share_restores_the_state_and_training_goes_on_alike():
    model, optimizer = trainer()
    for s in range(3):
        step(model, optimizer, s, s)
    keeper = SnapshotKeeper()  # its copy: the share's arrays are views of the live state
    keeper.hold(3, 0, "1x1", share_of(training_state([model], [optimizer])[0],
                                      rng_state_json(), {"at": 3}))
    share = keeper.fetch(3, 0)
    expected_noise = torch.rand(4)
    for s in range(3, 5):
        step(model, optimizer, s, s)

    restored = trainer(seed=99)
    state, keys = training_state([restored[0]], [restored[1]])
    assert restore_into(state, share) is None
    apply_training_state([restored[0]], [restored[1]], state, keys)
    set_rng_state(parse_rng_state(share.rng))
    assert torch.equal(torch.rand(4), expected_noise)  # the RNG is the snapshot's
    apply_hyperparameters(restored[1], TRAIN, 3)
    for s in range(3, 5):
        step(*restored, s, s)
    assert_same_weights(model, restored[0], rtol=0, atol=0)
    assert share.meta == {"at": 3}


def test_bfloat16_travels_as_int16_and_comes_back_exact():
    weights = torch.randn(3, 5).to(torch.bfloat16)
    share = share_of({"model": {"w": weights}}, "{}", {})
    assert share.tensors["model/w"].dtype == np.int16 and share.dtypes["model/w"] == "bfloat16"
    target = {"model": {"w": torch.zeros(3, 5, dtype=torch.bfloat16)}}
    assert restore_into(target, share) is None
    assert torch.equal(target["model"]["w"], weights)


@pytest.mark.parametrize("other, named", [
    ({"model": {"w": torch.zeros(3, 4)}},
     "model/w is float32 (3, 5) in the snapshot, float32 (3, 4) here"),
    ({"model": {"v": torch.zeros(3, 5)}}, "other tensors than this rank's state (model/v)"),
])
def test_a_share_of_another_state_is_refused_naming_a_tensor(other, named):
    share = share_of({"model": {"w": torch.ones(3, 5)}}, "{}", {})
    assert named in restore_into(other, share)
    assert all(not tensor.any() for tensor in other["model"].values())  # nothing copied


def test_a_keeper_holds_its_own_copy_of_each_ranks_two_newest_steps():
    keeper = SnapshotKeeper()
    for at in range(1, 4):
        for rank in (0, 1):
            weights = torch.full((2,), float(at))
            keeper.hold(at, rank, "dp2", share_of({"model": {"w": weights}}, "{}", {}))
            weights.fill_(-1.0)  # training goes on: the held copy does not change
    assert sorted(keeper.held()) == [(2, 0, "dp2"), (2, 1, "dp2"), (3, 0, "dp2"), (3, 1, "dp2")]
    assert keeper.fetch(3, 1).tensors["model/w"].tolist() == [3.0, 3.0]  # in step 1's buffers
    assert keeper.fetch(2, 1).tensors["model/w"].tolist() == [2.0, 2.0]
    assert keeper.fetch(1, 0) is None
    step_3_buffer = keeper.fetch(3, 0).tensors["model/w"]
    keeper.retain(2, "dp2")
    assert sorted(keeper.held()) == [(2, 0, "dp2"), (2, 1, "dp2")]
    keeper.hold(3, 0, "dp2", share_of({"model": {"w": torch.full((2,), 5.0)}}, "{}", {}))
    assert keeper.fetch(3, 0).tensors["model/w"] is step_3_buffer  # the restart's spare
    assert keeper.fetch(3, 0).tensors["model/w"].tolist() == [5.0, 5.0]
    keeper.retain(2, "dp1")  # another layout starts: nothing of this one is kept
    assert keeper.held() == []


def test_keepers_are_ended_where_the_nodes_memory_cannot_hold_the_snapshots(ray_session):
    """On this machine's Ray: the tiny model's snapshots fit; llama3.1-8b's on CPUs do
    not (its workers' own state alone passes the node's memory), and the keepers go."""
    from raytron.platform.config.load import load_config
    from raytron.platform.config.plan import make_plan
    from raytron.platform.control.snapshot_keepers import SnapshotKeepers

    keepers = SnapshotKeepers()
    assert keepers.unfit(make_plan(load_config("tiny")), 0) is None
    assert len(keepers.place()) == 1
    big = make_plan(load_config("llama3.1-8b", ["cluster.gpus_per_worker=0",
                                                "cluster.cpus_per_worker=1"]))
    why = keepers.unfit(big, 0)  # 4 workers on the session's 4 CPUs
    assert why is not None and why.startswith("a node's keeper may hold 96.4 GB of snapshots")
    assert keepers.by_node == {} and keepers.held() == []


def test_a_share_is_handed_over_while_training_goes_on_and_a_checkpoint_is_written_from_it(
        ray_session, tmp_path):
    """`take` comes back before the keeper holds the share; `settle` (before the next
    update) waits for it, and a joiner asking meanwhile waits for it while its taker
    lives. A checkpoint of the step is written from the kept share, which it need not
    wait for the keeper to copy, while the live state moves on: loading
    either the snapshot or the checkpoint, the next step gives the live model's weights."""
    import time

    from raytron.platform.storage.checkpoint import CheckpointStore
    from raytron.platform.worker.snapshotting import Snapshotter

    class SlowKeeper(SnapshotKeeper):  # its copy takes a while, as a large share's does
        def hold(self, *args):
            time.sleep(1.0)
            super().hold(*args)

    keeper = ray_session.remote(SlowKeeper).options(num_cpus=0).remote()
    snapshots = Snapshotter({"node": keeper}, "node", 0, "1x1")
    model, optimizer = trainer()
    step(model, optimizer, 0, 0)
    started = time.perf_counter()
    snapshots.take(1, [model], [optimizer], {"at": 1}, keep=True)
    assert time.perf_counter() - started < 0.5 and snapshots.stall_s < 0.5
    copy = snapshots.host_copy(1)  # at once: written from the share once it is put
    store = CheckpointStore(tmp_path, keep_last=1)
    pending = store.write(1, [model], [optimizer], {}, background=True, copy=copy)
    assert time.perf_counter() - started < 0.5  # before the keeper's copy
    share = snapshots.fetch(1, coming=lambda: True)  # a joiner waits for it
    assert share is not None and share.meta == {"at": 1}
    asked = time.perf_counter()
    assert snapshots.fetch(2, coming=lambda: False) is None  # its taker died: not waited for
    assert time.perf_counter() - asked < 0.5
    snapshots.settle()
    step(model, optimizer, 1, 1)  # the update: the checkpoint may still be being written
    store.commit(pending)
    for load in (lambda parts, optimizers: snapshots.restore(1, parts, optimizers)[0].meta,
                 lambda parts, optimizers: store.load(1, parts, optimizers)):
        restored = trainer(seed=99)
        load([restored[0]], [restored[1]])
        apply_hyperparameters(restored[1], TRAIN, 1)
        step(*restored, 1, 1)
        assert_same_weights(model, restored[0], rtol=0, atol=0)
    snapshots.take(2, [model], [optimizer], {"at": 2})
    assert snapshots.host_copy(2) is None  # not kept for a checkpoint
    snapshots.settle()
    assert snapshots.waited_s > 0.5  # the slow copy held the step up: counted as its stall
