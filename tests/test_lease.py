"""One writer per run: the lease a training takes on its folders, on local disk and on a
real S3-compatible server (moto's), its takeover when stale, and the refusals it causes
(a second `raytron train`, `raytron submit`, a commit by a training that lost it)."""

import json
import subprocess
import sys
import time

import psutil
import pytest
import torch

from raytron.platform.cli import main
from raytron.platform.config.schema import ConfigError
from raytron.platform.storage import lease as leasing
from raytron.platform.storage.checkpoint import COMMIT_MARKER, CheckpointStore
from raytron.platform.storage.lease import (
    LEASE_FILE,
    Holder,
    Lease,
    LeaseLost,
    RunLeases,
    check_token,
)


def write_holder(folder, **fields) -> None:
    holder = {**json.loads(Holder.me("other").encode()), **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE_FILE).write_text(json.dumps(holder))


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = Lease(str(tmp_path), "tiny")
    assert first.acquire() is None
    with pytest.raises(ConfigError, match=r"being written by run 'tiny', pid \d+ on .*Fix: wait"):
        Lease(str(tmp_path), "tiny").acquire()
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    second = Lease(str(tmp_path), "tiny")
    assert second.acquire() is None
    second.release()


def test_a_lease_whose_process_is_gone_is_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    write_holder(tmp_path, pid=child.pid, process_started=started)
    line = Lease(str(tmp_path), "tiny").acquire()
    assert line is not None and f"its process {child.pid}" in line and "is gone" in line
    assert Holder.parse((tmp_path / LEASE_FILE).read_bytes()).pid != child.pid


def test_a_lease_not_renewed_is_taken_over_and_its_holder_loses_it(tmp_path):
    write_holder(tmp_path, host="another-host", renewed=time.time() - leasing.TTL_S - 5)
    line = Lease(str(tmp_path), "tiny").acquire()
    assert line is not None and "not renewed for" in line

    holder = Lease(str(tmp_path), "tiny")  # a holder whose lease another one took over
    (tmp_path / LEASE_FILE).unlink()
    holder.acquire()
    token = holder.holder.token
    write_holder(tmp_path, host="another-host")
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        holder.renew()
    with pytest.raises(LeaseLost):
        check_token(str(tmp_path), token)


def test_a_live_lease_on_this_host_is_not_stale(tmp_path):
    write_holder(tmp_path, pid=psutil.Process().pid)  # this very process, renewed now
    with pytest.raises(ConfigError, match="being written by run 'other'"):
        Lease(str(tmp_path), "tiny").acquire()


def test_a_commit_without_the_lease_writes_nothing(tmp_path):
    folder = str(tmp_path / "checkpoints")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with RunLeases([folder], "tiny") as leases:
        CheckpointStore(folder, 2, leases.tokens()).save(1, [model], [optimizer], {})
        assert (tmp_path / "checkpoints" / "step_00000001" / COMMIT_MARKER).exists()
        stolen = CheckpointStore(folder, 2, {folder: "not-the-token"})
        with pytest.raises(LeaseLost):
            stolen.save(2, [model], [optimizer], {})
        assert CheckpointStore(folder, 2).committed_steps() == [1]


def test_raytron_train_is_refused_at_once_while_the_run_is_leased(tmp_path, capsys):
    root = tmp_path / "runs"
    with RunLeases([str(root / "tiny")], "tiny"):
        started = time.perf_counter()
        assert main(["train", "tiny", f"run.root={root}"]) == 2
        assert time.perf_counter() - started < 10  # before a tokenizer, before Ray
    err = capsys.readouterr().err
    assert err.startswith("raytron: the run is being written by another training:\n")
    assert "is being written by run 'tiny'" in err and "Fix:" in err
    assert not (root / "tiny" / "checkpoints").exists()
    assert not (root / "tiny" / "config.yaml").exists()


def test_raytron_submit_is_refused_while_the_run_is_leased(tmp_path, capsys):
    root = tmp_path / "runs"
    with RunLeases([str(root / "tiny")], "tiny"):
        code = main(["submit", "tiny", f"run.root={root}", "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "is being written by run 'tiny'" in capsys.readouterr().err


def test_leases_on_s3_are_atomic_and_taken_over_when_stale(s3, tmp_path, monkeypatch, capsys):
    folder = "s3://checkpoints/leased-run"
    first = Lease(folder, "tiny")
    assert first.acquire() is None
    with pytest.raises(ConfigError, match="being written by run 'tiny'"):
        Lease(folder, "tiny").acquire()
    first.renew()  # a compare-and-swap on its own ETag
    assert main(["train", "tiny", f"run.root={tmp_path}", f"checkpoint.dir={folder}"]) == 2
    assert "s3://checkpoints/leased-run is being written by run 'tiny'" in capsys.readouterr().err

    # the first holder stops renewing past the TTL (its age measured by the server's clock)
    monkeypatch.setattr(leasing, "TTL_S", 1.0)
    time.sleep(2.1)  # S3's LastModified counts whole seconds
    late = Lease(folder, "tiny")
    line = late.acquire()
    assert line is not None and "not renewed" in line
    with pytest.raises(LeaseLost):
        first.renew()
    late.release()
    assert Lease(folder, "tiny").acquire() is None


def test_raytron_status_names_the_training_that_writes_the_run(tmp_path):
    from raytron.platform.config.load import load_config, to_yaml
    from raytron.platform.control.status import describe_run

    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config("tiny", [f"run.root={tmp_path}"])))
    assert "writer       none: no training holds" in describe_run(str(run_dir))
    with RunLeases([str(run_dir)], "tiny"):
        assert f"writer       run 'tiny', pid {psutil.Process().pid} on " in describe_run(
            str(run_dir))


def committed_run(root, name: str, checkpoints: str, with_config: bool = True) -> None:
    """A run `name` under `root` with one committed checkpoint in `checkpoints`, and its
    config saved beside it as `raytron train` saves it."""
    from raytron.platform.config.load import load_config, to_yaml

    store = CheckpointStore(checkpoints, 2)
    model = torch.nn.Linear(2, 2)
    store.save(6, [model], [torch.optim.AdamW(model.parameters())], {})
    if with_config:
        store.claim(to_yaml(load_config("tiny", [f"run.root={root}", f"run.name={name}",
                                                       f"checkpoint.dir={checkpoints}"])))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_another_runs_checkpoints_are_refused_not_adopted(tmp_path, where, request):
    from raytron.platform.config.load import load_config
    from raytron.platform.control.settle import settle

    checkpoints = str(tmp_path / "a" / "checkpoints")
    if where == "s3":
        request.getfixturevalue("s3")
        checkpoints = f"s3://checkpoints/{tmp_path.name}/a"
    committed_run(tmp_path, "a", checkpoints)
    other = load_config("tiny", [f"run.root={tmp_path}", "run.name=b",
                                 f"checkpoint.dir={checkpoints}"])
    with pytest.raises(ConfigError, match=r"holds committed checkpoints \(step 6\) of run 'a', "
                                          r"not of run 'b'\. Fix: resume that run"):
        settle(other)
    assert not (tmp_path / "b" / "tokenizer.json").exists()  # no fresh tokenizer trained


def test_checkpoints_of_no_known_run_are_refused(tmp_path):
    from raytron.platform.config.load import load_config
    from raytron.platform.control.settle import settle

    checkpoints = str(tmp_path / "found" / "checkpoints")
    committed_run(tmp_path, "found", checkpoints, with_config=False)
    config = load_config("tiny", [f"run.root={tmp_path}", "run.name=fresh",
                                  f"checkpoint.dir={checkpoints}"])
    with pytest.raises(ConfigError, match="but no config of the run that wrote them"):
        settle(config)
