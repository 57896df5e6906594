"""Object storage, against a real S3-compatible server (moto's) started by the test:
reading a corpus through the Ray Data pipeline and writing and reading checkpoints."""

import numpy as np
import pytest
import torch

from raytron.model.gpt import GPT, GPTShape
from raytron.pipelines.feeder import DataFeeder
from raytron.pipelines.sources import CorpusFile, list_files, read_records
from raytron.pipelines.stream import ALL, local_texts
from raytron.pipelines.tokenizer import train_bpe
from raytron.platform.config.load import load_config
from raytron.platform.config.schema import TrainConfig
from raytron.platform.control.corpus import stream_spec, with_tokenizer
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.worker.optim import build_optimizer

from conftest import S3_TEXTS as TEXTS


def test_sources_list_and_read_from_s3(s3):
    files = list_files("s3://corpus/books")
    assert files == ["s3://corpus/books/more/two.txt", "s3://corpus/books/one.txt"]
    texts = [r.text for f in files for r in read_records(CorpusFile(f, document="paragraph"))]
    assert sorted(texts) == sorted(t.strip() for t in TEXTS)
    notes = [r.text for r in read_records(CorpusFile("s3://corpus/notes.jsonl"))]
    assert notes == TEXTS


def test_the_feeder_streams_an_s3_mixture_and_caches_it_there(ray_session, s3):
    """The second run reads every file's shard from the token cache on S3."""
    import fsspec

    ray = ray_session
    config = load_config("tiny", ["data.sources=[{path: s3://corpus/books, document: "
                                  "paragraph}, {path: s3://corpus/notes.jsonl}]",
                                  "data.val_share=0", "data.cache=s3://checkpoints/tokens"])
    spec = stream_spec(config)
    tokenizer = train_bpe((t for s in spec.sources for t in local_texts(s, ALL, 0)), 300,
                          show_progress=False)
    filesystem, _ = fsspec.core.url_to_fs("s3://corpus")
    runs = []
    for run in range(2):
        if run:  # the corpus taken away: the second run reads the cache alone
            corpus = {path: filesystem.cat_file(path) for path in filesystem.find("corpus")}
            for path in corpus:
                filesystem.rm(path)
        feeder = ray.remote(DataFeeder).options(
            num_cpus=0, max_concurrency=8, runtime_env={"env_vars": s3}
        ).remote(with_tokenizer(spec, tokenizer), 16, 4, 2, 4)
        ray.get(feeder.seek.remote(0, {}))
        runs.append([ray.get(feeder.batch.remote(step, 0, 1)).tokens for step in range(20)])
        stats = ray.get(feeder.stats.remote())
        assert stats["data/source0_share"] == pytest.approx(0.5, abs=0.05)
        ray.kill(feeder)
    for path, data in corpus.items():
        filesystem.pipe_file(path, data)
    batches, cached = runs
    assert all(b.shape == (4, 17) for b in batches)
    for want, got in zip(batches, cached, strict=True):
        np.testing.assert_array_equal(want, got)
    decoded = tokenizer.decode(np.concatenate([b[:, :-1] for b in batches]).ravel().tolist())
    assert "quick brown fox" in decoded
    assert len(filesystem.find("checkpoints/tokens")) == 3  # one shard a file


def test_checkpoints_commit_load_and_prune_on_s3(s3):
    train = TrainConfig(steps=10, warmup_steps=1)
    model = GPT(GPTShape(2, 16, 2, 1, 32, 50, 8), seed=3)
    optimizer = build_optimizer(model, train, fused=False)
    store = CheckpointStore("s3://checkpoints/run", keep_last=2)
    for step in (1, 2, 3):
        store.save(step, [model], [optimizer], {"cursor": {"epoch": step}})
    assert store.committed_steps() == [2, 3] and store.latest() == 3
    fresh = GPT(GPTShape(2, 16, 2, 1, 32, 50, 8), seed=4)
    fresh_optimizer = build_optimizer(fresh, train, fused=False)
    meta = store.load(3, [fresh], [fresh_optimizer])
    assert meta["cursor"] == {"epoch": 3}
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, msg=name)
