"""Files that arrive with a model or a run are data, never instructions: a shared run's
config.yaml is not interpolated, a Hugging Face folder's config.json and index are bounded
and kept inside the folder, a checkpoint's metadata names only files inside it, and a
submitted job's command line runs nothing its arguments spell. No Ray, no training."""

from __future__ import annotations

import yaml

from raytron.platform.config.load import load_config, to_yaml
from raytron.platform.storage.run_dir import RunPaths, read_run_config

SECRET = "hunter2-secret-value"


def saved_run(tmp_path, written: dict[str, object], dropped: tuple[str, ...] = ()
              ) -> RunPaths:
    """A run folder whose config.yaml is the tiny preset's with the `written` keys
    (section.name) set and the `dropped` sections left out, as a shared or older file."""
    config = load_config("tiny", [f"run.root={tmp_path}", "run.name=shared"])
    tree = yaml.safe_load(to_yaml(config))
    for key, value in written.items():
        section, name = key.split(".")
        tree[section][name] = value
    for section in dropped:
        del tree[section]
    paths = RunPaths.of(config)
    paths.dir.mkdir(parents=True)
    paths.config_file.write_text(yaml.safe_dump(tree))
    return paths


# -- 1. a run's config.yaml is read as written ----------------------------------------------

def test_a_saved_config_is_never_interpolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_SECRET", SECRET)
    paths = saved_run(tmp_path, {"checkpoint.dir": "${oc.env:SOME_SECRET}",
                                 "tracking.run_name": "a \\${x} and ${run.name}"})
    config = read_run_config(paths.dir)
    assert config.checkpoint.dir == "${oc.env:SOME_SECRET}"
    assert config.tracking.run_name == "a \\${x} and ${run.name}"
    saved = paths.saved_config()
    assert saved["checkpoint.dir"] == "${oc.env:SOME_SECRET}"
    assert SECRET not in repr(config) + repr(saved)


def test_keys_an_older_config_lacks_get_the_schemas_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_SECRET", SECRET)
    paths = saved_run(tmp_path, {"run.root": "${oc.env:SOME_SECRET}"},
                      dropped=("checkpoint",))
    config = read_run_config(paths.dir)
    assert config.checkpoint.dir == "${oc.env:SOME_SECRET}/shared/checkpoints"
    assert config.model.max_seq_len == config.data.seq_len
    assert SECRET not in repr(config)
