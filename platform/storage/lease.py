"""One writer per run: a lease that a `raytron train` takes before anything else.

Two drivers writing one run directory or one `checkpoint.dir` would delete each other's
checkpoints and interleave their commits. The driver therefore takes a lease on each
folder it writes (the run directory, and `checkpoint.dir` when it lies elsewhere) before
it trains a tokenizer or takes any Ray resource, renews it while the run lives, and
releases it at the end. The lease is a small JSON object, `LEASE`, naming its holder
(host, pid, process start time, run) and a token. Taking it is atomic: on local disk
(or NFS) under an exclusive `flock` of a guard file, on S3 with a conditional put
(`If-None-Match: *` to create, `If-Match: <ETag>` to renew or take over). A lease whose
holder process is gone (same host) or that was not renewed for `TTL_S` is stale and
taken over, with a line saying so. Workers check the token before each commit, so a
driver that lost its lease (suspended past the TTL, then resumed) commits nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import psutil

from raytron.platform.config.schema import ConfigError
from raytron.platform.storage.run_dir import RunPaths, is_local_path

LEASE_FILE = "LEASE"
TTL_S = 60.0  # a lease not renewed for this long is stale
RENEW_S = TTL_S / 4
MAX_LEASE_BYTES = 4096  # a lease file is data: never read more


class LeaseHeld(ConfigError):
    """Another training holds the run's lease: this one does not start (exit status 2)."""

    heading = "the run is being written by another training"


class LeaseLost(RuntimeError):
    """Another process holds the run's lease: this one must not write it any more."""


@dataclass(frozen=True)
class Holder:
    run: str
    host: str
    pid: int
    process_started: float  # the holder's process start time: a reused pid is not it
    started: float
    renewed: float
    token: str

    @classmethod
    def me(cls, run: str) -> Holder:
        now = time.time()
        return cls(run, socket.gethostname(), os.getpid(),
                   psutil.Process().create_time(), now, now, uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: bytes) -> Holder | None:
        """None for anything that is not a lease raytron wrote (then it is stale)."""
        try:
            data = json.loads(text[:MAX_LEASE_BYTES])
            return cls(str(data["run"]), str(data["host"]), int(data["pid"]),
                       float(data["process_started"]), float(data["started"]),
                       float(data["renewed"]), str(data["token"]))
        except (ValueError, TypeError, KeyError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"run '{self.run}', pid {self.pid} on {self.host}, started {started}"

    def gone(self) -> str | None:
        """Why the holder's process is known to be gone; None when it may live."""
        if self.host != socket.gethostname():
            return None
        try:
            alive = abs(psutil.Process(self.pid).create_time() - self.process_started) < 1.0
        except psutil.Error:
            alive = False
        return None if alive else f"its process {self.pid} on {self.host} is gone"


@dataclass(frozen=True)
class Seen:
    """A lease as read: its holder (None: unreadable), a version to compare-and-swap
    against, and how long ago it was last written."""

    holder: Holder | None
    version: str
    age_s: float

    def stale(self) -> str | None:
        """Why the lease may be taken over; None while its holder holds it."""
        if self.holder is None:
            return "it is not a lease raytron wrote"
        gone = self.holder.gone()
        if gone:
            return gone
        return f"it was not renewed for {self.age_s:.0f} s" if self.age_s > TTL_S else None


class LocalLeaseFile:
    """A lease on local disk or NFS: every change under an exclusive `flock` of a guard
    file beside it, so that reading, comparing and writing are one step."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.path = self.folder / LEASE_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f".{LEASE_FILE}.guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def read(self) -> Seen | None:
        try:
            with open(self.path, "rb") as handle:
                text = handle.read(MAX_LEASE_BYTES)
        except FileNotFoundError:
            return None
        holder = Holder.parse(text)
        age = time.time() - holder.renewed if holder else float("inf")
        return Seen(holder, text.decode(errors="replace"), age)

    def write(self, holder: Holder, version: str | None) -> str | None:
        """Write `holder` if the lease is still at `version` (None: absent); its new
        version, or None when someone else changed it first."""
        with self.locked():
            seen = self.read()
            if (seen.version if seen else None) != version:
                return None
            temporary = self.path.with_name(f".{LEASE_FILE}.{holder.token}")
            text = holder.encode()
            with open(temporary, "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            return text.decode()

    def delete(self, version: str) -> None:
        with self.locked():
            seen = self.read()
            if seen is not None and seen.version == version:
                self.path.unlink()


class S3LeaseFile:
    """A lease object on S3 (or an S3-compatible store): created with `If-None-Match: *`,
    replaced with `If-Match: <ETag>`, so that two writers never both succeed. Its age is
    measured by the server's clock (the response's Date minus LastModified)."""

    def __init__(self, uri: str):
        import boto3

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.bucket, self.key = bucket, f"{prefix.rstrip('/')}/{LEASE_FILE}".lstrip("/")
        self.client = boto3.client("s3")

    def read(self) -> Seen | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        text = response["Body"].read(MAX_LEASE_BYTES)
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (now - response["LastModified"]).total_seconds()
        return Seen(Holder.parse(text), response["ETag"], age)

    def write(self, holder: Holder, version: str | None) -> str | None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self.key,
                                              Body=holder.encode(), **condition)
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (404, 409, 412):  # changed, created or deleted by someone else
                return None
            raise
        return response["ETag"]

    def delete(self, version: str) -> None:
        seen = self.read()
        if seen is not None and seen.version == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class GcsLeaseFile:
    """A lease object on Google Cloud Storage: created with `if_generation_match=0`,
    replaced with the generation read (google-cloud-storage, which gcsfs installs)."""

    def __init__(self, uri: str):
        from google.cloud import storage

        bucket, _, prefix = uri.removeprefix("gs://").partition("/")
        key = f"{prefix.rstrip('/')}/{LEASE_FILE}".lstrip("/")
        self.blob = storage.Client().bucket(bucket).blob(key)

    def read(self) -> Seen | None:
        from google.api_core.exceptions import NotFound

        try:
            self.blob.reload()  # its generation and update time; then its bytes
            text = self.blob.download_as_bytes(end=MAX_LEASE_BYTES - 1)
        except NotFound:
            return None
        age = time.time() - self.blob.updated.timestamp()
        return Seen(Holder.parse(text), str(self.blob.generation), age)

    def write(self, holder: Holder, version: str | None) -> str | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.blob.upload_from_string(holder.encode(),
                                         if_generation_match=int(version or 0))
        except (PreconditionFailed, NotFound):
            return None
        return str(self.blob.generation)

    def delete(self, version: str) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        with contextlib.suppress(PreconditionFailed, NotFound):
            self.blob.delete(if_generation_match=int(version))


def lease_file(folder: str) -> LocalLeaseFile | S3LeaseFile | GcsLeaseFile:
    """The lease of a folder: a local path, or an s3:// or gs:// URI."""
    if folder.startswith("s3://"):
        return S3LeaseFile(folder)
    if folder.startswith("gs://"):
        return GcsLeaseFile(folder)
    if "://" in folder:
        raise ConfigError([f"{folder}: raytron holds a run's lease on local disk, NFS, S3 or "
                           "GCS only. Fix: put checkpoint.dir on one of them."])
    return LocalLeaseFile(folder)


def run_folders(paths: RunPaths) -> list[str]:
    """The folders a run writes: its directory, and `checkpoint.dir` when not inside it."""
    inside = is_local_path(paths.checkpoints) and Path(paths.checkpoints).is_relative_to(
        paths.dir)
    return [str(paths.dir)] + ([] if inside else [paths.checkpoints])


def writer_line(folders: list[str]) -> str:
    """`raytron status`: which training, if any, holds a run's lease."""
    for folder in folders:
        try:
            seen = lease_file(folder).read()
        except Exception as error:  # storage this machine cannot read
            return f"writer       unknown: the lease of {folder} cannot be read ({error})"
        if seen is not None:
            why = seen.stale()
            who = seen.holder.describe() if seen.holder else "an unreadable lease"
            return (f"writer       {who} (renewed {seen.age_s:.0f} s ago)" if why is None else
                    f"writer       none: the lease of {who} is stale ({why})")
    return "writer       none: no training holds the run's lease"


def refuse_if_held(folders: list[str]) -> None:
    """`ConfigError` when a live training holds one of `folders` (`raytron submit` asks
    before it submits; the job's training takes the lease itself). A lease this machine
    cannot read is left for that training to find."""
    for folder in folders:
        try:
            seen = lease_file(folder).read()
        except Exception:  # storage this machine has no access to: the job will see
            continue
        if seen is not None and seen.holder is not None and seen.stale() is None:
            raise LeaseHeld([held_message(folder, seen.holder)])


class Lease:
    """The lease of one folder, taken by `acquire` and kept until `release`."""

    def __init__(self, folder: str, run: str):
        self.folder, self.file = folder, lease_file(folder)
        self.holder = Holder.me(run)
        self.version: str | None = None

    def acquire(self) -> str | None:
        """Take the lease; a line to print when it took over a stale one. `ConfigError`
        naming the holder when it is held."""
        for _ in range(3):  # a contender may change it between reading and writing
            seen = self.file.read()
            why = seen.stale() if seen else None
            if seen is not None and why is None:
                raise LeaseHeld([held_message(self.folder, seen.holder)])
            self.version = self.file.write(self.holder, seen.version if seen else None)
            if self.version is not None:
                if seen is None:
                    return None
                was = seen.holder.describe() if seen.holder else "an unreadable lease"
                return f"Took over the lease of {self.folder} from {was}: {why}"
        seen = self.file.read()
        raise LeaseHeld([held_message(self.folder, seen.holder if seen else None)])

    def renew(self) -> None:
        """`LeaseLost` when another process took it over."""
        import dataclasses

        renewed = dataclasses.replace(self.holder, renewed=time.time())
        version = self.file.write(renewed, self.version)
        if version is None:
            seen = self.file.read()
            raise LeaseLost(lost_message(self.folder, seen))
        self.holder, self.version = renewed, version

    def release(self) -> None:
        if self.version is not None:
            self.file.delete(self.version)
            self.version = None


def held_message(folder: str, holder: Holder | None) -> str:
    who = holder.describe() if holder else "another process"
    return (f"{folder} is being written by {who}: two trainings must never write one run. "
            "Fix: wait for it to finish (or stop it), or give this training its own "
            "run.name (and checkpoint.dir). A lease whose process is gone, or that is not "
            f"renewed for {TTL_S:.0f} s, is taken over by the next start.")


def lost_message(folder: str, seen: Seen | None) -> str:
    who = seen.holder.describe() if seen and seen.holder else "nobody"
    return (f"this training no longer holds the lease of {folder} (it is now held by "
            f"{who}); it stopped so as not to write beside another.")


def check_token(folder: str, token: str) -> None:
    """Before a commit: `LeaseLost` unless the lease of `folder` still carries `token`."""
    seen = lease_file(folder).read()
    if seen is None or seen.holder is None or seen.holder.token != token:
        raise LeaseLost(lost_message(folder, seen))


class RunLeases:
    """The leases of a run's folders, renewed in a thread while the run lives. Leaving
    releases them; a renewal that finds a lease taken marks the run as lost."""

    def __init__(self, folders: list[str], run: str):
        self.leases = [Lease(folder, run) for folder in dict.fromkeys(folders)]
        self.stop = threading.Event()
        self.lost: LeaseLost | None = None
        self.thread = threading.Thread(target=self.keep, daemon=True)

    def __enter__(self) -> RunLeases:
        taken: list[Lease] = []
        try:
            for lease in self.leases:
                line = lease.acquire()
                taken.append(lease)
                if line:
                    print(line)
        except BaseException:
            for lease in taken:
                lease.release()
            raise
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.lost is None:
            for lease in self.leases:
                lease.release()

    def tokens(self) -> dict[str, str]:
        """folder -> token: what the workers check before each commit."""
        return {lease.folder: lease.holder.token for lease in self.leases}

    def keep(self) -> None:
        while not self.stop.wait(RENEW_S):
            for lease in self.leases:
                try:
                    lease.renew()
                except LeaseLost as error:
                    self.lost = error
                    return
                except Exception:  # storage unreachable for a moment: try again next time
                    continue
