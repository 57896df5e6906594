"""`raytron export`: a model as a Hugging Face folder that `transformers` loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, optionally
logged to the run's MLflow run and registered in MLflow's model registry."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from raytron.model.families import FAMILIES
from raytron.model.hf import DTYPES, hf_config, hf_name, peft_target_modules, to_hf, to_peft
from raytron.model.lora import is_adapter
from raytron.pipelines.chat import CHATML, DEFAULT_TEMPLATE
from raytron.platform.config.resolve import lora_spec
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.models.lora_base import base_weights, check_base
from raytron.platform.models.sources import HF_CONFIG, HUGGING_FACE, ModelSource, open_source
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.storage.run_dir import is_hub_id


def export_hugging_face(source: ModelSource, out: Path, dtype: str = "float32",
                        max_shard_size: str = "5GB",
                        weights: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write the folder (of `weights`, under raytron's names, instead of the source's
    own when given); returns the files written. Refuses a folder that holds files."""
    from huggingface_hub import save_torch_state_dict

    new_folder(out, source)
    shape, tokenizer, family = source.shape, source.tokenizer, FAMILIES[source.family]
    weights = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in
               to_hf(weights or source.read_weights(), shape, family).items()}
    save_torch_state_dict(weights, out, max_shard_size=max_shard_size)
    eos = source.end_ids[0]
    bos = source.bos_id if source.bos_id is not None else bos_token(tokenizer)
    write_json(out / HF_CONFIG, hf_config(shape, family, dtype, bos, eos, eos))
    write_json(out / "generation_config.json", {
        "bos_token_id": bos, "eos_token_id": source.end_ids if len(source.end_ids) > 1 else eos,
        "pad_token_id": eos})
    exported = Tokenizer.from_str(tokenizer.to_str())
    if source.bos_id is not None:  # trained with BOS first: transformers adds it too
        name = tokenizer.id_to_token(source.bos_id)
        exported.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", pair=f"{name} $A {name} $B",
            special_tokens=[(name, source.bos_id)])
    exported.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None if bos is None else tokenizer.id_to_token(bos),
        "eos_token": tokenizer.id_to_token(eos),
        "pad_token": tokenizer.id_to_token(eos),
        "model_max_length": shape.max_seq_len,
        "clean_up_tokenization_spaces": False,  # decode gives back the text as trained
        **chat_template(source),
    })
    mode = (out / HF_CONFIG).stat().st_mode & 0o777  # what the umask gives a new file
    for path in out.iterdir():  # the weights are written through a private (0600) temp file
        path.chmod(mode)
    return sorted(out.iterdir())


def new_folder(out: Path, source: ModelSource) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([f"{out} exists and is not an empty folder; raytron does not "
                           "overwrite it. Fix: give a new folder, or delete this one first."])
    if source.tokenizer is None:
        raise ConfigError([f"{source.path} has no tokenizer.json to export. Fix: export a "
                           "raytron run, or a Hugging Face folder with tokenizer.json."])
    out.mkdir(parents=True, exist_ok=True)


def export_adapter(source: ModelSource, out: Path, dtype: str = "float32") -> list[Path]:
    """A LoRA run's adapters as PEFT writes them (adapter_config.json,
    adapter_model.safetensors), loadable with `PeftModel.from_pretrained` on the base
    that `base_model_name_or_path` names: model.init_from's Hugging Face model, or else
    (a raytron run, the seed's weights, a grown vocabulary) the base exported to
    OUT/base. Its tokenizer files are the run's, as AutoTokenizer reads them."""
    from safetensors.torch import save_file

    config = source.config
    spec = lora_spec(config.train.lora)
    store = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep_last)
    check_base(store, config)
    new_folder(out, source)
    base = hugging_face_base(config, source.shape.vocab_size)
    if base is None:
        export_hugging_face(source, out / "base", dtype, weights=base_weights(config, None))
        base = str((out / "base").resolve())
    family = FAMILIES[source.family]
    adapters = store.read_model(source.step)
    weights = {name: tensor.to(DTYPES[dtype]).contiguous()
               for name, tensor in to_peft(adapters, source.shape, family).items()}
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({name.rsplit(".", 1)[0].split(".", 2)[2] for name in adapters
                      if is_adapter(name)})
    whole = sorted(hf_name(name, family).removesuffix(".weight").rsplit(".", 1)[-1]
                   for name in adapters if not is_adapter(name))
    write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": peft_target_modules(modules, family), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": whole or None,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True})
    source.tokenizer.save(str(out / "tokenizer.json"))
    return sorted(out.iterdir())


def hugging_face_base(config: RaytronConfig, vocab_size: int) -> str | None:
    """model.init_from when it is a Hugging Face model whose embeddings the run kept."""
    init_from = config.model.init_from
    if not init_from:
        return None
    base = open_source(init_from)
    if base.kind != HUGGING_FACE or base.shape.vocab_size != vocab_size:
        return None
    return init_from if is_hub_id(init_from) else str(Path(init_from).resolve())


def chat_template(source: ModelSource) -> dict:
    """The model's chat template, with the special tokens it renders (a model's own
    template keeps the ones it was written for). `apply_chat_template` does not add
    special tokens, so raytron's ChatML, for a run that put BOS first, writes it."""
    template = source.chat_template
    if template is None:
        return {}
    if template == CHATML:
        return {"chat_template": ("{{ bos_token }}" if source.bos_id is not None else "")
                + DEFAULT_TEMPLATE}
    return {"chat_template": template.source, **template.variables()}


def bos_token(tokenizer: Tokenizer) -> int | None:
    from raytron.pipelines.tokenizer import bos_id

    try:
        return bos_id(tokenizer)
    except ValueError:
        return None


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def model_requirements() -> list[str]:
    """What loading the logged model takes, pinned as installed here. (MLflow would infer
    them and add torchvision, which this model does not use and may not be installed.)"""
    from importlib.metadata import version

    return [f"{name}=={version(name)}"
            for name in ("transformers", "torch", "safetensors", "tokenizers")]


def log_to_mlflow(folder: Path, uri: str, run_id: str, register: str | None) -> str:
    """Log the exported folder to an MLflow run as a `transformers` model for text
    generation (and register it under `register`); returns the model's URI. The run
    keeps the status it had (a finished training run stays finished)."""
    import mlflow
    from mlflow import MlflowClient

    from raytron.platform.storage.tracking import quiet_mlflow

    quiet_mlflow()
    # it looks a local folder up on the Hub for a model card and license, and warns
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    client = MlflowClient(tracking_uri=uri)
    status = client.get_run(run_id).info.status
    with global_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=str(folder.resolve()), name="model", task="text-generation",
            registered_model_name=register, pip_requirements=model_requirements())
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return info.model_uri


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`start_run`, `log_model`) reads one global tracking URI, which
    `set_tracking_uri` also exports as $MLFLOW_TRACKING_URI for every later subprocess:
    set it for the block only, and put back what was there."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
