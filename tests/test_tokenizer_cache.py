"""A run's tokenizer is trained once per corpus sample: a second run on the same corpus
takes the kept one (the same tokenizer, bit for bit), a changed file or vocabulary trains
anew, and a damaged kept tokenizer is trained again instead of failing the run."""

from pathlib import Path

import pytest

from raytron.pipelines.tokenizer_cache import kept_path, sample_key
from raytron.platform.config.load import load_config
from raytron.platform.control.corpus import sample_bytes, stream_spec
from raytron.platform.control.settle import run_tokenizer
from raytron.platform.storage.run_dir import RunPaths


def tokenizer_of(root: Path, name: str, *overrides: str):
    config = load_config("tiny", [f"run.root={root}", f"run.name={name}",
                                  f"data.sources=[{root / 'corpus'}]", *overrides])
    spec = stream_spec(config)
    key = sample_key(spec, config.data.vocab_size, sample_bytes(config))
    return run_tokenizer(config, RunPaths.of(config), spec, resuming=False), spec, key


@pytest.fixture
def root(tmp_path: Path) -> Path:
    from pydoc_data.topics import topics

    (tmp_path / "corpus").mkdir()
    for index, key in enumerate(sorted(topics)[:40]):
        (tmp_path / "corpus" / f"{index}.txt").write_text(topics[key])
    return tmp_path


def test_a_second_run_on_the_same_corpus_takes_the_kept_tokenizer(root, capsys):
    first, spec, key = tokenizer_of(root, "one")
    assert "Training a 2048-token" in capsys.readouterr().out
    assert Path(kept_path(spec.cache, key)).is_file()
    second, _, same = tokenizer_of(root, "two")
    assert same == key and second.to_str() == first.to_str()
    assert f"Using the 2048-token tokenizer trained on the same corpus before " \
           f"({kept_path(spec.cache, key)})" in capsys.readouterr().out
    smaller, _, other = tokenizer_of(root, "three", "data.vocab_size=1024")
    assert other != key and smaller.get_vocab_size() == 1024
    assert "Training a 1024-token" in capsys.readouterr().out


def test_a_changed_file_or_a_damaged_kept_tokenizer_trains_anew(root, capsys):
    first, spec, key = tokenizer_of(root, "one")
    Path(kept_path(spec.cache, key)).write_text('{"not": "a tokenizer"')
    again, _, same = tokenizer_of(root, "two")
    assert same == key and again.to_str() == first.to_str()
    assert capsys.readouterr().out.count("Training a 2048-token") == 2
    with open(root / "corpus" / "0.txt", "a") as grown:
        grown.write("\nA paragraph more.")
    _, _, changed = tokenizer_of(root, "three")
    assert changed != key
    assert tokenizer_of(root, "four", "data.cache=null")[2] is None  # nowhere to keep it
