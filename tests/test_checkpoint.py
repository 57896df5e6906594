"""Checkpoints: DCP round trip, atomic commit, retention, and a crash in the middle of a save."""

from pathlib import Path

import pytest
import torch

from raytron.model.gpt import GPT, GPTShape, cross_entropy
from raytron.platform import checkpoint
from raytron.platform.checkpoint import COMMIT_MARKER, CheckpointStore
from raytron.platform.config import TrainConfig
from raytron.platform.optim import build_optimizer, build_scheduler, lr_at

TRAIN = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, steps=10)


def trainer(seed=0):
    model = GPT(GPTShape(2, 16, 2, 1, 32, 50, 8), seed=seed)
    optimizer = build_optimizer(model, TRAIN, fused=False)
    return model, optimizer, build_scheduler(optimizer, TRAIN)


def step(model, optimizer, scheduler, seed):
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(seed))
    cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_the_exact_training_state(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer, scheduler = trainer()
    for s in range(3):
        step(model, optimizer, scheduler, s)
    store.save(3, [model], [optimizer], scheduler, {"cursor": {"epoch": 1}})
    for s in range(3, 5):
        step(model, optimizer, scheduler, s)

    restored = trainer(seed=99)
    meta = store.load(3, [restored[0]], [restored[1]], [restored[2]])
    assert meta == {"step": 3, "cursor": {"epoch": 1}}
    assert restored[2].last_epoch == 3
    for s in range(3, 5):
        step(*restored, s)
    for (name, a), b in zip(model.state_dict().items(), restored[0].state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert restored[1].param_groups[0]["lr"] == pytest.approx(TRAIN.lr * lr_at(5, TRAIN) / TRAIN.lr)


def test_only_committed_checkpoints_count_and_old_ones_go(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer, scheduler = trainer()
    for s in (10, 20, 30):
        store.save(s, [model], [optimizer], scheduler, {})
    assert store.committed_steps() == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]
    half_written = Path(store.folder(40))
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"partial")
    assert store.latest() == 30


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    model, optimizer, scheduler = trainer()
    store.save(1, [model], [optimizer], scheduler, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, optimizer, scheduler, 0)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint, "write_atomically", crash)
    with pytest.raises(OSError):
        store.save(2, [model], [optimizer], scheduler, {})
    monkeypatch.undo()
    assert store.latest() == 1 and not (Path(store.folder(2)) / COMMIT_MARKER).exists()
    fresh = trainer(seed=5)
    store.load(1, [fresh[0]], [fresh[1]], [fresh[2]])
    for name, value in fresh[0].state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)
    store.save(2, [model], [optimizer], scheduler, {})  # the next save cleans the leftover
    assert store.committed_steps() == [2]


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    model, optimizer, scheduler = trainer()
    store.save(1, [model], [optimizer], scheduler, {"cursor": {"epoch": 1}})
    step(model, optimizer, scheduler, 0)
    store.save(2, [model], [optimizer], scheduler, {"cursor": {"epoch": 2}})
    for shard in Path(store.folder(2)).glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a dying disk
    fresh = trainer(seed=8)
    with pytest.warns(UserWarning, match="checkpoint step 2 .* cannot be loaded"):
        meta = store.load_latest([fresh[0]], [fresh[1]], [fresh[2]])
    assert meta["step"] == 1 and meta["cursor"] == {"epoch": 1}
    assert CheckpointStore(tmp_path / "empty", keep_last=1).load_latest(
        [fresh[0]], [fresh[1]], [fresh[2]]) == {}


def test_a_background_save_holds_the_state_of_its_step_and_commits_later(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    model, optimizer, scheduler = trainer()
    store.save(1, [model], [optimizer], scheduler, {})
    step(model, optimizer, scheduler, 0)
    at_step_2 = {k: v.clone() for k, v in model.state_dict().items()}
    pending = store.write(2, [model], [optimizer], scheduler, {"cursor": 2}, background=True)
    step(model, optimizer, scheduler, 1)  # training goes on while the shards are written
    assert store.latest() == 1  # written is not committed: a crash now resumes from 1
    store.commit(pending)
    assert store.latest() == 2 and pending.written()
    fresh = trainer(seed=3)
    assert store.load(2, [fresh[0]], [fresh[1]], [fresh[2]])["cursor"] == 2
    for name, value in fresh[0].state_dict().items():
        torch.testing.assert_close(value, at_step_2[name], rtol=0, atol=0, msg=name)
