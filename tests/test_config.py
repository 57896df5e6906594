"""Config: presets, overrides, and every invalid case rejected with its key and fix."""

import argparse

import pytest

from raytron.platform.cli import EXIT_CONFIG_ERROR, build_parser, main
from raytron.platform.config.load import flatten, load_config, preset_names, to_dict
from raytron.platform.config.schema import ConfigError
from raytron.platform.config.validate import validate


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m", "llama-1b", "sft-tiny", "sft-lora-tiny",
                                    "dpo-lora-tiny", "dpo-tiny", "llama3.2-1b", "qwen2.5-0.5b",
                                    "qwen3-0.6b", "llama3.1-8b", "qwen3-8b"])
def test_presets_load_and_validate(preset):
    config = load_config(preset)
    validate(config)
    assert config.run.name == preset
    assert config.checkpoint.dir == f"runs/{preset}/checkpoints"


def test_presets_are_listed():
    assert {"tiny", "gpt2-124m", "llama-1b"} <= set(preset_names())


def test_overrides_apply_in_order_and_parse_types():
    config = load_config("tiny", ["train.steps=7", "train.lr=1e-4", "train.steps=9",
                                  "data.sources=[{path: a.jsonl, text_field: body}]",
                                  "model.n_kv_heads=null"])
    assert config.train.steps == 9 and config.train.lr == 1e-4
    assert config.data.sources[0].path == "a.jsonl"
    assert config.data.sources[0].text_field == "body" and config.data.sources[0].format == "auto"
    assert config.model.n_kv_heads is None


def test_flatten_names_every_leaf():
    flat = flatten(to_dict(load_config("tiny")))
    assert flat["train.lr"] == 3e-3 and flat["data.sources.0.path"].startswith("embedded:")


def run_cli(capsys, *args):
    code = main(["config", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "expected"), [
    (["train.lrr=1"], ["train.lrr: unknown key", "train.lr"]),
    (["tiny.yaml.nope"], ["neither a YAML file nor a preset"]),
    (["train.steps=many"], ["train.steps", "whole number of 1 or more or auto"]),
    (["model.n_heads=3"], ["model.d_model=128 is not divisible by model.n_heads=3"]),
    (["model.n_kv_heads=3"], ["model.n_heads=4 is not divisible by model.n_kv_heads=3"]),
    (["model.family=qwen4", "model.rope_scaling=ntk"], ["model.family='qwen4' is unknown",
                                                        "model.rope_scaling='ntk' is unknown"]),
    (["model.head_dim=7"], ["the head size 7 is odd", "model.head_dim"]),
    (["model.rope_scaling=llama3", "model.rope_high_freq_factor=0.5"],
     ["model.rope_high_freq_factor=0.5 is not above model.rope_low_freq_factor=1.0"]),
    (["data.chat_template=llama"], ["data.chat_template='llama' is unknown", "chatml"]),
    (["train.global_batch=20"], ["train.global_batch=20 is not divisible by",
                                 "multiple of 8"]),
    (["parallel.dp=4", "cluster.workers=2"], ["differs from cluster.workers=2",
                                              "leave cluster.workers unset"]),
    (["parallel.dp=4"], ["train.global_batch=16 is not divisible by train.micro_batch"]),
    (["data.sources.0.path=/no/such/corpus"], ["data.sources.0.path", "matches no file"]),
    (["data.packing=zip", "data.overlong=cut"], ["data.packing='zip' is unknown",
                                                 "data.overlong='cut' is unknown"]),
    (["data.sources=[{path: embedded:reverse-words, format: dialog}]"],
     ["data.sources.0.format='dialog' is unknown", "chat"]),
    (["data.tokenizer=/no/tokenizer.json"], ["data.tokenizer", "is not a file"]),
    (["train.precision=fp8"], ["train.precision='fp8' is unknown"]),
    (["parallel.schedule=zigzag"], ["parallel.schedule='zigzag' is unknown"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps=-1 must be a whole number of 0 or more"]),
    (["faults.mode=sometimes"], ["faults.mode='sometimes' is unknown"]),
    (["faults.mode=replicas", "parallel.dp=3"],
     ["faults.mode=replicas: train.global_batch=16 makes 2 micro-batches of "
      "train.micro_batch=8, fewer than the 3 replicas of parallel.dp=3",
      "Fix: set train.micro_batch=4 (or less, dividing the batch)."]),
    (["faults.mode=replicas", "parallel.tp=2", "parallel.dp=auto", "cluster.workers=4",
      "checkpoint.memory_interval=0"],
     ["faults.mode=replicas with parallel.tp=2: a replica is one worker holding the whole "
      "model", "faults.mode=replicas with checkpoint.memory_interval=0: a replacement loads"]),
    (["faults.mode=replicas", "parallel.dp=auto", "cluster.workers=4"],
     ["train.global_batch=16 makes 2 micro-batches of train.micro_batch=8, fewer than the 4 "
      "replicas of cluster.workers=4 (parallel.dp=auto)"]),
    (["checkpoint.memory_interval=often"], ["checkpoint.memory_interval='often' must be a whole "
                                            "number of 0 or more or auto. Fix: use e.g. 1"]),
    (["train.lr=-1"], ["train.lr=-1.0 must be a finite number more than 0", "e.g. 0.001"]),
    (["parallel.tp=0"], ["parallel.tp=0 must be a whole number of 1 or more"]),
    (["parallel.cp=2", "data.seq_len=18", "train.compile=true", "parallel.pp=2",
      "parallel.schedule=zero-bubble"],
     ["data.seq_len=18 does not split into 2 x parallel.cp=2 equal chunks",
      "train.compile=true with parallel.cp=2", "parallel.schedule=zero-bubble with "
      "parallel.dp_shard=full over 2 ranks", "parallel.dp_shard=grad-op"]),
    (["parallel.cp=2", "parallel.tp=4", "data.seq_len=20"],
     ["data.seq_len=20 / parallel.cp=2 = 10 tokens per rank is not divisible by parallel.tp=4",
      "multiple of 16"]),
    (["model.ffn_multiple_of=0"], ["model.ffn_multiple_of=0 must be a whole number"]),
    (["run.name=../../x"], ["run.name='../../x' must be one folder name"]),
    (["run.name=x;touch /tmp/p"], ["run.name='x;touch /tmp/p' must be one folder name",
                                   "letters, digits", "run.name=my-run"]),
    (["run.name=-rf"], ["run.name='-rf' must be one folder name"]),
    (["run.name=.hidden"], ["run.name='.hidden' must be one folder name"]),
    (["run.name=a b"], ["run.name='a b' must be one folder name"]),
    ([f"run.name={'a' * 201}"], ["at most 200 characters"]),
    (["tracking.experiment=a/b"], ["tracking.experiment='a/b' must be one folder name"]),
    (["tracking.system_metrics_interval_s=0.5"],
     ["tracking.system_metrics_interval_s=0.5 must be a finite number 1 or more", "e.g. 10"]),
    (["data.val_share=1.5"], ["data.val_share=1.5"]),
    (["checkpoint.keep_last=0"], ["checkpoint.keep_last=0 must be a whole number of 1 or more"]),
    (["tiny", "train.steps"], ["is not key=value"]),
    (["train.objective=dpo"], ["data.sources.0 (format auto) holds no preference pairs",
                               "format=preference"]),
    (["data.sources=[{path: embedded:reverse-words-pairs}]"],
     ["holds preference pairs, which only train.objective=dpo learns from"]),
    (["train.objective=dpo", "train.lora.rank=4", "train.lora.train_embeddings=true",
      "train.micro_batch=3", "train.global_batch=12", "data.packing=stream",
      "data.sources=[{path: embedded:reverse-words-pairs}]"],
     ["train.micro_batch=3 is odd", "train.micro_batch=4", "data.packing=stream cuts samples",
      "train.lora.train_embeddings=false"]),
    (["train.objective=ppo", "train.dpo.loss=hinge"], ["train.objective='ppo' is unknown",
                                                       "train.dpo.loss='hinge' is unknown"]),
])
def test_invalid_config_is_rejected_with_key_and_fix(capsys, args, expected):
    code, err = run_cli(capsys, *args)
    assert code == EXIT_CONFIG_ERROR
    for text in expected:
        assert text in err
    assert "Fix:" in err or "fix" in err


def test_every_command_has_a_handler():
    """`main` calls the handler a command's parser sets: a command added without one fails
    here, not when a user runs it."""
    def commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return [leaf for group in groups for sub in group.choices.values()
                for leaf in commands(sub)] if groups else [parser]

    found = commands(build_parser())
    assert len(found) == 11
    assert [c.prog for c in found if not callable(c.get_default("handler"))] == []


@pytest.mark.parametrize(("text", "expected"), [
    ("train: [1, 2\n", "while parsing a flow sequence"),
    ("- a\n- b\n", "it holds a list, not a mapping"),
    ("train:\n  lr: abc\n", "train.lr: Value 'abc'"),
])
def test_a_broken_yaml_file_is_a_config_error(tmp_path, capsys, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["config", str(path)]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert expected in err and "Fix:" in err


def test_all_problems_are_reported_at_once():
    config = load_config("tiny", ["model.n_heads=3", "train.global_batch=20"])
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert len(error.value.problems) >= 2
    assert "model.n_heads=3" in str(error.value) and "train.global_batch=20" in str(error.value)


@pytest.fixture
def no_training(monkeypatch):
    """A config these tests expect refused must never start a run in the test process."""
    from raytron.platform.control import run

    def refuse(config):
        raise AssertionError(f"the config was accepted and training started: {config}")

    monkeypatch.setattr(run, "train", refuse)


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Fails the test if anything starts or joins Ray (whether or not a Ray session of
    another test is up in this process)."""
    import ray

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ray, "init", must_not_start)


def test_cli_rejects_before_ray_starts(capsys, no_training, ray_must_not_start):
    assert main(["train", "model.n_heads=3"]) == EXIT_CONFIG_ERROR


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "tiny", "run.name=x", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "name: x" in out and "steps: 5" in out and "dir: runs/x/checkpoints" in out


def test_help_is_complete(capsys):
    for argv in (["--help"], ["train", "--help"], ["config", "--help"], ["submit", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    out = capsys.readouterr().out
    for text in ("train", "config", "KEY=VALUE", "tiny", "gpt2-124m", "RAY_ADDRESS",
                 "MLFLOW_TRACKING_URI", "mlflow ui", "workflowType=machine_learning",
                 "Exit status", "submit", "--address", "--follow", "--serve", "auth_token"):
        assert text in out


@pytest.mark.parametrize(("args", "expected"), [
    (["parallel.tp=3", "cluster.workers=3"], ["must both be divisible by parallel.tp=3"]),
    (["parallel.tp=2", "model.n_kv_heads=1", "cluster.workers=2"],
     ["model.n_kv_heads=1 must both be divisible by parallel.tp=2"]),
    (["parallel.pp=2", "parallel.schedule=interleaved-1f1b", "parallel.virtual_stages=4",
      "model.tie_embeddings=false", "cluster.workers=2"],
     ["model.n_layers=4 is fewer than the 8 pipeline stages"]),
    (["parallel.pp=2", "parallel.tp=2", "parallel.dp=auto", "cluster.workers=6",
      "model.tie_embeddings=false"], ["cluster.workers=6 is not a multiple of parallel.pp*cp*tp"]),
    (["parallel.dp=2", "cluster.workers=2", "train.global_batch=24"],
     ["train.global_batch=24 is not divisible by train.micro_batch * parallel.dp"]),
    (["parallel.pp=4", "model.tie_embeddings=false", "train.micro_batch=8"],
     ["1f1b needs at least parallel.pp=4 micro-batches per schedule call, got 2",
      "Fix: set train.micro_batch=4"]),
    (["parallel.dp_shard=zero9"], ["parallel.dp_shard='zero9' is unknown"]),
    (["parallel.dp=many"], ["parallel.dp='many' must be a whole number of 1 or more or auto"]),
    (["train.activation_checkpointing=some"], ["train.activation_checkpointing='some'"]),
    (["parallel.tp=2", "train.compile=true"], ["train.compile=true with parallel.tp=2",
                                               "Fix: set train.compile=false"]),
    (["parallel.pp=2", "cluster.workers=2", "model.tie_embeddings=false",
      "parallel.layers_per_stage=[3,3]"], ["parallel.layers_per_stage=[3, 3] must list 2"]),
    (["cluster.device_memory_gb=0.01"], ["needs about", "GB per device"]),
])
def test_wrong_layouts_are_refused_before_ray(capsys, no_training, ray_must_not_start, args,
                                              expected):
    assert main(["train", "tiny", *args]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_the_worker_count_follows_the_layout_unless_given(capsys):
    assert load_config("tiny", ["parallel.dp=2"]).cluster.workers == 2
    assert load_config("tiny", ["parallel.pp=2", "parallel.tp=2", "parallel.dp=2",
                                "model.tie_embeddings=false"]).cluster.workers == 8
    assert main(["config", "tiny", "parallel.dp=2", "cluster.workers=3"]) == EXIT_CONFIG_ERROR
    assert "differs from cluster.workers=3" in capsys.readouterr().err


def test_plain_paths_are_sources_with_default_settings(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text")
    (tmp_path / "more.jsonl").write_text('{"text": "more"}')
    config = load_config("tiny", [
        f"data.sources=[{tmp_path / 'corpus'}, {tmp_path / 'more.jsonl'}]",
        f"data.validation_sources={tmp_path / 'more.jsonl'}"])
    validate(config)
    assert [s.path for s in config.data.sources] == [str(tmp_path / "corpus"),
                                                     str(tmp_path / "more.jsonl")]
    assert config.data.sources[1].weight == 1.0 and config.data.sources[1].format == "auto"
    assert [s.path for s in config.data.validation_sources] == [str(tmp_path / "more.jsonl")]


def test_a_pipeline_gets_a_micro_batch_that_suits_its_schedule(capsys):
    """1f1b with pp=2 needs two micro-batches per replica: tiny's 8 sequences per replica
    at dp=2 give one of 8, so the preset's micro-batch is lowered to 4; a micro-batch the
    user gave is kept, and its error names the value that works."""
    layout = ["parallel.pp=2", "parallel.dp=2", "model.tie_embeddings=false"]
    assert load_config("tiny", layout).train.micro_batch == 4
    assert load_config("tiny", ["parallel.pp=2", "model.tie_embeddings=false"]
                       ).train.micro_batch == 8
    assert main(["config", "tiny", *layout, "train.micro_batch=8"]) == EXIT_CONFIG_ERROR
    assert "got 1. Fix: set train.micro_batch=4" in capsys.readouterr().err


def test_dp_auto_takes_every_worker(capsys):
    assert main(["config", "tiny", "parallel.dp=auto", "cluster.workers=4",
                 "train.global_batch=32"]) == 0
    assert "dp: 4" in capsys.readouterr().out


def test_tokenizer_train_command_writes_a_reusable_tokenizer(tmp_path, capsys):
    from raytron.pipelines.tokenizer import BOS, EOS, load

    output = tmp_path / "tokenizer.json"
    assert main(["tokenizer", "train", "tiny", "data.vocab_size=600", "--output",
                 str(output)]) == 0
    tokenizer = load(output)
    assert tokenizer.get_vocab_size() == 600
    assert tokenizer.token_to_id(EOS) is not None and tokenizer.token_to_id(BOS) is not None
    assert f"data.tokenizer={output}" in capsys.readouterr().out
    assert main(["config", "tiny", f"data.tokenizer={output}"]) == 0


@pytest.mark.parametrize("text", ["- x\n", "parallel: 3\n", "train: [1\n"])
def test_status_of_a_directory_that_holds_no_run_config_is_an_error(tmp_path, capsys, text):
    (tmp_path / "config.yaml").write_text(text)
    assert main(["status", str(tmp_path)]) == EXIT_CONFIG_ERROR
    assert "is not a raytron run's config" in capsys.readouterr().err
