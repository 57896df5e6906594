"""Files that arrive with a model or a run are data, never instructions: a shared run's
config.yaml is not interpolated, a Hugging Face folder's config.json and index are bounded
and kept inside the folder, and a checkpoint's metadata names only files inside it (a
submitted job's quoted command line: test_submit.py). No Ray, no training."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import yaml

from raytron.model.families import FAMILIES
from raytron.model.gpt import GPT, GPTShape
from raytron.model.hf import hf_config, to_hf
from raytron.platform.config.load import load_config, to_yaml
from raytron.platform.config.schema import ConfigError
from raytron.platform.models.sources import HF_CONFIG, SAFETENSORS, SAFETENSORS_INDEX, open_source
from raytron.platform.storage.run_dir import RunPaths, read_run_config
from raytron.platform.storage.safe_reading import UnsafeCheckpoint, safe_reader

from model_runs import run_cli

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


# -- 2. a Hugging Face folder is bounded and kept inside itself -----------------------------

SHAPE = GPTShape(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                 vocab_size=64, max_seq_len=32, tie_embeddings=False)
ABSENT = object()


def llama_folder(folder: Path, **changes: object) -> Path:
    """A small Llama folder as `save_pretrained` writes it (config.json, model.safetensors),
    with the `changes` written over its config.json (ABSENT: the key left out)."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = hf_config(SHAPE, FAMILIES["llama"], "float32", 1, 2, None) | changes
    config = {key: value for key, value in config.items() if value is not ABSENT}
    (folder / HF_CONFIG).write_text(json.dumps(config))
    weights = to_hf(GPT(SHAPE, seed=1).state_dict(), SHAPE, FAMILIES["llama"])
    save_file(weights, folder / SAFETENSORS)
    return folder


def refusal(folder: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        open_source(folder)
    return str(refused.value)


def test_a_well_formed_folder_opens(tmp_path):
    source = open_source(llama_folder(tmp_path / "hf"))
    assert source.shape == SHAPE and source.end_ids == [2]
    assert source.read_weights().keys() == GPT(SHAPE).state_dict().keys()


@pytest.mark.parametrize(("changes", "named"), [
    ({"num_attention_heads": 0}, "num_attention_heads=0"),  # was a ZeroDivisionError
    ({"max_position_embeddings": 10**9}, "max_position_embeddings=1000000000"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers=1000000"),
    ({"vocab_size": 2**40}, f"vocab_size={2**40}"),
    ({"hidden_size": "32"}, "hidden_size='32'"),
    ({"intermediate_size": 64.0}, "intermediate_size=64.0"),
    ({"num_key_value_heads": -2}, "num_key_value_heads=-2"),
    ({"num_hidden_layers": True}, "num_hidden_layers=True"),
    ({"vocab_size": ABSENT}, "no vocab_size"),
    ({"num_attention_heads": 3, "head_dim": ABSENT},
     "hidden_size=32, not divisible by num_attention_heads=3"),
    ({"head_dim": 7}, "odd head size 7"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4, not divisible by num_key_value_heads=3"),
    ({"hidden_size": 12, "num_attention_heads": 4, "head_dim": ABSENT}, "odd head size"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5'"),
    ({"rope_theta": float("nan")}, "rope_theta=nan"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false'"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear'"),  # was an AttributeError
    ({"eos_token_id": 2.5}, "eos_token_id=2.5"),  # was a TypeError
    ({"eos_token_id": [2, 64]}, "eos_token_id=[2, 64]"),
])
def test_a_config_json_out_of_bounds_is_refused_naming_the_value(tmp_path, changes, named):
    message = refusal(llama_folder(tmp_path / "hf", **changes))
    assert named in message and "Fix:" in message


def test_generate_refuses_it_with_exit_status_2(tmp_path):
    folder = llama_folder(tmp_path / "hf", num_attention_heads=0)
    code, _, err = run_cli("generate", str(folder), "--prompt", "x")
    assert code == 2 and "num_attention_heads=0" in err and "Traceback" not in err


def indexed_folder(tmp_path: Path, weight_map: object) -> Path:
    """A Llama folder whose weights are read through an index holding `weight_map`."""
    folder = llama_folder(tmp_path / "hf")
    (folder / SAFETENSORS).rename(tmp_path / "outside.safetensors")
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_an_index_naming_a_file_inside_the_folder_opens(tmp_path):
    folder = indexed_folder(tmp_path, {"model.norm.weight": "shard.safetensors"})
    (tmp_path / "outside.safetensors").rename(folder / "shard.safetensors")
    assert open_source(folder).read_weights().keys() == GPT(SHAPE).state_dict().keys()


def test_a_hugging_face_cache_snapshot_with_links_into_its_blobs_opens(tmp_path):
    """The Hub's cache keeps a snapshot's files as links to ../../blobs/<hash>."""
    folder = indexed_folder(tmp_path, {"model.norm.weight": "shard.safetensors"})
    (tmp_path / "outside.safetensors").rename(tmp_path / "blob")
    (folder / "shard.safetensors").symlink_to(tmp_path / "blob")
    assert open_source(folder).read_weights().keys() == GPT(SHAPE).state_dict().keys()


@pytest.mark.parametrize("name", ["../outside.safetensors", "{tmp}/outside.safetensors",
                                  "missing.safetensors", 7, "bad\x00.safetensors"])
def test_an_index_naming_files_outside_the_folder_is_refused(tmp_path, name):
    name = name.format(tmp=tmp_path) if isinstance(name, str) else name
    folder = indexed_folder(tmp_path, {"model.norm.weight": name})
    message = refusal(folder)
    assert "Fix:" in message and (repr(name) in message or "weight_map" in message)


def test_an_index_without_a_weight_map_object_is_refused(tmp_path):
    assert "weight_map" in refusal(indexed_folder(tmp_path, ["outside.safetensors"]))


# -- 3. a checkpoint's metadata names only files inside it ----------------------------------

def dcp_checkpoint(folder: Path, relative_path: str | None = None) -> Path:
    """A real one-tensor DCP checkpoint; `relative_path` written over where its .metadata
    says each entry is (as a crafted checkpoint in a shared bucket would say)."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"model.x": torch.ones(2)}, checkpoint_id=folder, no_dist=True)
    if relative_path is not None:
        metadata = pickle.loads((folder / ".metadata").read_bytes())  # the test's own file
        for info in metadata.storage_data.values():
            info.relative_path = relative_path
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


def test_a_checkpoints_own_files_are_read(tmp_path):
    metadata = safe_reader(str(dcp_checkpoint(tmp_path / "step")), local=True).read_metadata()
    assert "model.x" in metadata.state_dict_metadata


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "a/../../b", "x\x00y", ""])
def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path, path):
    reader = safe_reader(str(dcp_checkpoint(tmp_path / "step", path)), local=True)
    with pytest.raises(UnsafeCheckpoint, match=re.escape(repr(path))):
        reader.read_metadata()


@pytest.mark.parametrize("text", [
    "", "not json", "[]", '{"step": "3", "global_batch": 8}', '{"step": 3}',
    '{"step": 3, "global_batch": 16}', '{"step": true, "global_batch": 8}',
    '{"step": 3, "global_batch": 8' + " " * 2000 + "}"])
def test_where_the_data_ran_out_is_believed_only_as_written(tmp_path, text):
    """A run's data_end.json, read before Ray starts to say at once that a resume would
    run out again: anything but what the driver writes (at this global batch, within a
    bounded read) is as if nothing were recorded, and the run goes through Ray."""
    from raytron.platform.storage.data_end import DATA_END_FILE, data_ended_at, record_data_end

    (tmp_path / DATA_END_FILE).write_text(text)
    assert data_ended_at(tmp_path, global_batch=8) is None
    record_data_end(tmp_path, 3, 8)
    assert data_ended_at(tmp_path, global_batch=8) == 3
