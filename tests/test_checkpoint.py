"""Checkpoints: DCP round trip, atomic commit, retention, a crash in the middle of a save,
fallback and refusal when they cannot be read, and loading that never unpickles."""

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from raytron.model.gpt import GPT, GPTShape, cross_entropy
from raytron.platform.config.schema import TrainConfig
from raytron.platform.storage import checkpoint
from raytron.platform.storage.checkpoint import (
    COMMIT_MARKER,
    CheckpointStore,
    CheckpointUnreadable,
)
from raytron.platform.worker.optim import apply_hyperparameters, build_optimizer, lr_at

TRAIN = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, steps=10)


def trainer(seed=0, train=TRAIN):
    model = GPT(GPTShape(2, 16, 2, 1, 32, 50, 8), seed=seed)
    return model, build_optimizer(model, train, fused=False)


def step(model, optimizer, seed, done, train=TRAIN):
    """Optimizer step `done` (0-based) of the schedule."""
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(seed))
    cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad()
    apply_hyperparameters(optimizer, train, done + 1)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, **tolerance) -> None:
    for (name, want), got in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, msg=name, **tolerance)


def test_round_trip_restores_the_exact_training_state(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    for s in range(3):
        step(model, optimizer, s, s)
    store.save(3, [model], [optimizer], {"cursor": {"epoch": 1}})
    for s in range(3, 5):
        step(model, optimizer, s, s)

    restored = trainer(seed=99)
    meta = store.load(3, [restored[0]], [restored[1]])
    assert meta == {"step": 3, "cursor": {"epoch": 1}}
    apply_hyperparameters(restored[1], TRAIN, 3)
    for s in range(3, 5):
        step(*restored, s, s)
    assert_same_weights(model, restored[0], rtol=0, atol=0)
    assert restored[1].param_groups[0]["lr"] == pytest.approx(lr_at(5, TRAIN))


def test_a_checkpoint_holds_tensors_and_json_only(tmp_path):
    """No optimizer hyperparameters, no scheduler, no pickled entry: DCP would unpickle
    them at load."""
    store = CheckpointStore(tmp_path, keep_last=1)
    model, optimizer = trainer()
    step(model, optimizer, 0, 0)
    store.save(1, [model], [optimizer], {})
    metadata = dcp.FileSystemReader(store.folder(1)).read_metadata()
    assert not [k for k, v in metadata.state_dict_metadata.items()
                if isinstance(v, BytesStorageMetadata)]
    assert {k.split(".")[1] for k in metadata.state_dict_metadata if k.startswith("optim.")} \
        == {"state"}
    assert sorted(p.name for p in Path(store.folder(1)).iterdir() if not p.name.startswith(
        "__")) == [".metadata", "COMMITTED", "meta.json", "rng_rank0.json"]


def test_changed_hyperparameters_apply_after_a_load(tmp_path):
    """The moments come from the checkpoint; lr, betas and weight decay from the config."""
    store = CheckpointStore(tmp_path, keep_last=1)
    model, optimizer = trainer()
    for s in range(3):
        step(model, optimizer, s, s)
    store.save(3, [model], [optimizer], {})
    changed = dataclasses.replace(TRAIN, lr=5e-3, min_lr=5e-4, steps=20, beta2=0.99,
                                  weight_decay=0.3)
    fresh_model, fresh_optimizer = trainer(seed=1, train=changed)
    store.load(3, [fresh_model], [fresh_optimizer])
    apply_hyperparameters(fresh_optimizer, changed, 3)
    decayed, norms = fresh_optimizer.param_groups
    assert decayed["lr"] == norms["lr"] == pytest.approx(lr_at(3, changed))
    assert decayed["betas"] == (0.9, 0.99) and decayed["weight_decay"] == 0.3
    assert norms["weight_decay"] == 0.0
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    loaded = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    for want, got in zip(moments, loaded, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_committed_checkpoints_count_and_old_ones_go(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    for s in (10, 20, 30):
        store.save(s, [model], [optimizer], {})
    assert store.committed_steps() == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]
    half_written = Path(store.folder(40))
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"partial")
    assert store.latest() == 30


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, optimizer, 0, 0)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint, "write_atomically", crash)
    with pytest.raises(OSError):
        store.save(2, [model], [optimizer], {})
    monkeypatch.undo()
    assert store.latest() == 1 and not (Path(store.folder(2)) / COMMIT_MARKER).exists()
    fresh = trainer(seed=5)
    store.load(1, [fresh[0]], [fresh[1]])
    for name, value in fresh[0].state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)
    store.save(2, [model], [optimizer], {})  # the next save cleans the leftover
    assert store.committed_steps() == [2]


def truncate_shards(folder: str) -> None:
    for shard in Path(folder).glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a dying disk


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {"cursor": {"epoch": 1}})
    step(model, optimizer, 0, 0)
    store.save(2, [model], [optimizer], {"cursor": {"epoch": 2}})
    truncate_shards(store.folder(2))
    fresh = trainer(seed=8)
    resumed = store.load_latest([fresh[0]], [fresh[1]])
    assert resumed.step == 1 and resumed.meta["cursor"] == {"epoch": 1}
    assert [s for s, _ in resumed.skipped] == [2]
    assert CheckpointStore(tmp_path / "empty", keep_last=1).load_latest(
        [fresh[0]], [fresh[1]]) is None


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_when_no_checkpoint_loads_the_run_is_refused_and_nothing_changes(tmp_path):
    """A renamed parameter fails step 2, damaged shards step 1: an error naming both,
    never a fresh start; the files are untouched."""
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {})
    step(model, optimizer, 0, 0)
    store.save(2, [model], [optimizer], {})
    truncate_shards(store.folder(1))
    before = snapshot(tmp_path)
    renamed = GPT(GPTShape(2, 16, 2, 1, 32, 50, 8), seed=0)
    renamed.output, renamed.head = None, renamed.output  # as if `output` had been renamed
    with pytest.raises(CheckpointUnreadable) as refused:
        store.load_latest([renamed], [build_optimizer(renamed, TRAIN, fused=False)])
    message = str(refused.value)
    assert "none of the 2 committed checkpoint(s)" in message
    assert "step 2: " in message and "model.head.weight" in message
    assert "step 1: " in message and "Nothing was deleted or overwritten" in message
    assert snapshot(tmp_path) == before
    assert store.newest_intact([1, 2]) == 2  # it looks whole: only loading it tells
    assert store.newest_intact([]) is None
    truncate_shards(store.folder(2))
    with pytest.raises(CheckpointUnreadable) as refused:  # the driver's check, before Ray
        store.newest_intact([1, 2])
    assert "step 2: " in str(refused.value) and "its metadata needs" in str(refused.value)


class CreatesAFile:
    """Unpickling this writes a file: what a crafted checkpoint could do on every worker."""

    target = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def pickle_that_creates(path: Path) -> bytes:
    payload = CreatesAFile()
    CreatesAFile.target = str(path)
    return pickle.dumps(payload)


@pytest.mark.parametrize("crafted", ["rng_rank0.json", "rng_rank0.pt", ".metadata"])
def test_a_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, crafted):
    store = CheckpointStore(tmp_path / "run", keep_last=1)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {})
    folder = Path(store.folder(1))
    victim = tmp_path / "pwned.txt"
    if crafted == "rng_rank0.pt":
        (folder / "rng_rank0.json").unlink()  # as an older raytron left it
    (folder / crafted).write_bytes(pickle_that_creates(victim))
    fresh = trainer(seed=4)
    with pytest.raises(CheckpointUnreadable) as refused:
        store.load_latest([fresh[0]], [fresh[1]])
    assert not victim.exists()
    message = str(refused.value)
    assert "step 1: " in message
    expected = {"rng_rank0.json": "rng_rank0.json is not a JSON random state",
                "rng_rank0.pt": "rng_rank0.pt is a pickle", ".metadata": "refuses to build"}
    assert expected[crafted] in message


def test_a_background_save_holds_the_state_of_its_step_and_commits_later(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {})
    step(model, optimizer, 0, 0)
    at_step_2 = {k: v.clone() for k, v in model.state_dict().items()}
    pending = store.write(2, [model], [optimizer], {"cursor": 2}, background=True)
    step(model, optimizer, 1, 1)  # training goes on while the shards are written
    assert store.latest() == 1  # written is not committed: a crash now resumes from 1
    store.commit(pending)
    assert store.latest() == 2 and pending.written()
    fresh = trainer(seed=3)
    assert store.load(2, [fresh[0]], [fresh[1]])["cursor"] == 2
    for name, value in fresh[0].state_dict().items():
        torch.testing.assert_close(value, at_step_2[name], rtol=0, atol=0, msg=name)


def test_background_saves_copy_into_the_buffers_of_one_stager(tmp_path):
    """The state is copied into buffers made at the first background save and reused by
    the next (on a GPU: pinned, allocated once rather than at every save)."""
    store = CheckpointStore(tmp_path, keep_last=3)
    model, optimizer = trainer()
    step(model, optimizer, 0, 0)
    first = store.write(1, [model], [optimizer], {}, background=True)
    first.wait_for_copy()
    store.commit(first)
    stager = store.stager
    cached = stager._state_dict_stager._cached_storage_mapping
    buffers = sorted(id(buffer) for buffer in cached.values())
    step(model, optimizer, 1, 1)
    at_step_2 = {k: v.clone() for k, v in model.state_dict().items()}
    store.commit(store.write(2, [model], [optimizer], {}, background=True))
    assert store.stager is stager
    assert sorted(id(buffer) for buffer in cached.values()) == buffers  # none new
    fresh = trainer(seed=3)
    store.load(2, [fresh[0]], [fresh[1]])
    for name, value in fresh[0].state_dict().items():
        torch.testing.assert_close(value, at_step_2[name], rtol=0, atol=0, msg=name)
    store.close()
    assert store.stager is None


def test_a_background_save_from_a_copy_on_its_way_returns_before_the_copy_is_made(tmp_path):
    """A checkpoint written from a copy being made elsewhere (an in-memory snapshot's
    share): `write` comes back at once, DCP's thread waits for the copy, and the
    checkpoint holds the copy, not the live state that moved on meanwhile."""
    import threading
    from concurrent.futures import Future

    from raytron.platform.storage.rng_state import rng_state_json

    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    step(model, optimizer, 0, 0)
    copied: Future = Future()
    state = checkpoint.training_state([model], [optimizer])[0]
    at_step_1 = {section: {key: tensor.clone() for key, tensor in entries.items()}
                 for section, entries in state.items()}
    pending = store.write(1, [model], [optimizer], {}, background=True,
                          copy=checkpoint.HostCopy(copied, rng_state_json()))
    assert not pending.written()  # back before the copy exists
    step(model, optimizer, 1, 1)  # the live state moves on
    threading.Timer(0.2, copied.set_result, (at_step_1,)).start()
    store.commit(pending)
    fresh = trainer(seed=3)
    store.load(1, [fresh[0]], [fresh[1]])
    loaded = fresh[0].state_dict()
    for name, value in at_step_1["model"].items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_a_damaged_newest_checkpoint_does_not_push_out_a_good_one(tmp_path):
    """keep_last=2 counts the checkpoints that look whole: with step 2 damaged, step 3's
    commit keeps 1 and 3 (and leaves 2, which it does not count, to be looked at)."""
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {})
    store.save(2, [model], [optimizer], {})
    truncate_shards(store.folder(2))
    assert store.intact(1) is None and "its metadata needs" in store.intact(2)
    store.save(3, [model], [optimizer], {})
    assert store.committed_steps() == [1, 2, 3]
    store.save(4, [model], [optimizer], {})
    assert store.committed_steps() == [3, 4]  # the two good ones; older ones go
    fresh = trainer(seed=5)
    assert store.load_latest([fresh[0]], [fresh[1]]).step == 4


def test_every_rank_loads_from_the_steps_the_controller_listed(tmp_path):
    """A listing that missed step 2 (a stale NFS or S3 listing) loads what it lists: the
    controller lists once and hands every rank the same steps."""
    store = CheckpointStore(tmp_path, keep_last=3)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {"cursor": 1})
    step(model, optimizer, 0, 0)
    store.save(2, [model], [optimizer], {"cursor": 2})
    fresh = trainer(seed=6)
    assert store.load_latest([fresh[0]], [fresh[1]], committed=[1]).step == 1
    assert store.load_latest([fresh[0]], [fresh[1]]).step == 2


def test_the_json_files_and_the_commit_marker_reach_the_disk(tmp_path, monkeypatch):
    """The RNG states, meta and the commit marker are each fsynced before their rename,
    and so is the folder that names them: a power loss cannot leave a marker without them."""
    synced: list[str] = []
    real_fsync = checkpoint.os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(Path(f"/proc/self/fd/{descriptor}").resolve().name)
        real_fsync(descriptor)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer = trainer()
    store.save(1, [model], [optimizer], {})
    folder = Path(store.folder(1)).name
    for name in ("rng_rank0.json.tmp", "meta.json.tmp", f"{COMMIT_MARKER}.tmp"):
        assert name in synced
    assert synced.count(folder) >= 3  # each rename's directory
