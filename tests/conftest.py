"""Shared fixtures: one small local Ray for the tests that need it (starting one costs ~10 s),
and a local S3-compatible server (moto's) with a small corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"  # real text for tests: never copied into the repo


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False,  # never another's
             log_to_driver=False)
    yield ray
    ray.shutdown()


S3_TEXTS = [f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1)
            for i in range(60)]


@pytest.fixture(scope="module")
def hub_offline(tmp_path_factory):
    """The Hugging Face Hub's offline switches and a datasets cache of the module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        yield


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port; credentials and endpoint in the environment,
    where pyarrow, s3fs and botocore all find them."""
    server_module = pytest.importorskip("moto.server")
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # one of an earlier server's
    filesystem, _ = fsspec.core.url_to_fs("s3://corpus")
    filesystem.mkdir("corpus")
    filesystem.pipe_file("corpus/books/one.txt", "\n\n".join(S3_TEXTS[:30]).encode())
    filesystem.pipe_file("corpus/books/more/two.txt", "\n\n".join(S3_TEXTS[30:]).encode())
    filesystem.pipe_file("corpus/notes.jsonl",
                         "\n".join(json.dumps({"text": t}) for t in S3_TEXTS).encode())
    filesystem.mkdir("checkpoints")
    yield env
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
