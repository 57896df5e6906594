"""Where a trained model comes from: a run directory (its latest committed checkpoint), one
checkpoint folder of a run, or a Hugging Face folder of a family raytron computes
(`model/families.py`). Each gives the model's shape, its family, its weights under
raytron's names (whole tensors, whatever layout wrote them), its tokenizer and end
tokens, and, for a run, where its MLflow run is.

Nothing is unpickled: checkpoints are read through `storage/safe_reading.py`, Hugging
Face weights only from safetensors files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from raytron.model.families import FAMILIES
from raytron.model.gpt import GPTShape
from raytron.model.hf import from_hf, raytron_name, shape_from_hf_config
from raytron.pipelines.chat import (
    CHATML,
    TURN_START,
    ChatError,
    ChatTemplate,
    model_chat_template,
    turn_end_id,
)
from raytron.pipelines.tokenizer import bos_id, end_ids, eos_id
from raytron.platform.config.resolve import gpt_shape
from raytron.platform.config.rules import (
    MAX_LAYERS,
    MAX_SEQUENCE,
    MAX_VOCABULARY,
    MAX_WIDTH,
)
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.storage.checkpoint import COMMIT_MARKER, CheckpointStore, step_of
from raytron.platform.storage.run_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    is_hub_id,
    read_run_config,
)
from raytron.platform.storage.tracking import RUN_ID_FILE, saved_tracking_uri

RUN, CHECKPOINT, HUGGING_FACE = "run", "checkpoint", "huggingface"
HF_CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
HF_MAXIMA = {  # config.json's sizes: the bounds raytron's own config has (rules.py)
    "num_hidden_layers": MAX_LAYERS, "hidden_size": MAX_WIDTH,
    "num_attention_heads": MAX_WIDTH, "num_key_value_heads": MAX_WIDTH,
    "head_dim": MAX_WIDTH, "intermediate_size": 4 * MAX_WIDTH,
    "vocab_size": MAX_VOCABULARY, "max_position_embeddings": MAX_SEQUENCE,
}


@dataclass
class ModelSource:
    kind: str  # run | checkpoint | huggingface
    path: Path
    shape: GPTShape
    tokenizer: Tokenizer | None  # None: a Hugging Face folder without tokenizer.json
    end_ids: list[int]  # tokens that end a generation
    bos_id: int | None  # put first in every prompt, as training put it before documents
    family: str  # its Hugging Face family (families.py), which export writes
    chat_template: ChatTemplate | None  # how to render a chat for it; None: it has none
    step: int | None = None  # the checkpoint's step (raytron sources)
    run_dir: Path | None = None
    config: RaytronConfig | None = None  # the run's saved config (raytron sources)

    def read_weights(self, names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors under raytron's names: those in `names`, or all (a LoRA run's:
        its base's with the adapters folded in)."""
        if self.kind == HUGGING_FACE:
            return read_hf_weights(self.path, self.shape, self.family, names)
        assert self.config is not None and self.step is not None
        store = CheckpointStore(self.config.checkpoint.dir, self.config.checkpoint.keep_last)
        if self.config.train.lora.rank:  # adapters only: folded into the base
            from raytron.platform.models.lora_base import merged_run_weights

            return merged_run_weights(self.config, store, self.step, names)
        return store.read_model(self.step, names)

    def mlflow_run(self) -> tuple[str | None, str | None]:
        """(tracking URI, MLflow run id) of a run's source; Nones when unknown."""
        if self.run_dir is None or not (self.run_dir / RUN_ID_FILE).is_file():
            return None, None
        uri = saved_tracking_uri(self.config.tracking.uri if self.config else None,
                                 self.run_dir)
        return uri, (self.run_dir / RUN_ID_FILE).read_text().strip()

    def describe(self) -> str:
        where = f"step {self.step} of {self.run_dir}" if self.step is not None else self.path
        return f"{self.kind} {where}"


def open_source(path: str | Path) -> ModelSource:
    """The model at `path`, or named by a Hub id (`Qwen/Qwen3-0.6B`) that is in the local
    Hugging Face cache; ConfigError saying what to give instead when it holds none."""
    folder = Path(path).expanduser()
    if is_hub_id(str(path)):
        folder = hub_snapshot(str(path))
    if (folder / HF_CONFIG).is_file():
        return hugging_face_source(folder)
    if (folder / CONFIG_FILE).is_file():
        config = read_run_config(folder)
        store = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep_last)
        step = store.latest()
        if step is None:
            raise ConfigError([f"{path}: the run has no committed checkpoint yet in "
                               f"{config.checkpoint.dir}. Fix: train it first (`raytron "
                               "train`), or give a checkpoint folder or a Hugging Face folder."])
        return run_source(folder, config, step, RUN)
    step = step_of(str(folder))
    if step is not None and folder.is_dir():
        if not (folder / COMMIT_MARKER).is_file():
            raise ConfigError([f"{path} is a checkpoint that was never committed (its save did "
                               "not finish). Fix: give a committed one, or the run directory."])
        for run_dir in (folder.parent.parent, folder.parent):
            if (run_dir / CONFIG_FILE).is_file():
                return run_source(run_dir, read_run_config(run_dir), step, CHECKPOINT, folder)
        raise ConfigError([f"{path}: no {CONFIG_FILE} of its run found beside it. Fix: give "
                           "the run directory (<run.root>/<run.name>), which holds the "
                           "config and the tokenizer."])
    raise ConfigError([f"{path} is no model. Fix: give a run directory (e.g. runs/tiny), one "
                       "of its checkpoint folders (runs/tiny/checkpoints/step_00000200), a "
                       f"Hugging Face folder (with {HF_CONFIG} and safetensors weights) or "
                       "the Hub id of a model in the local Hugging Face cache "
                       "(Qwen/Qwen3-0.6B)."])


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of a Hub model. Nothing is downloaded: a run must not start
    pulling gigabytes on every node, nor depend on the Hub being up."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ConfigError([f"{repo_id} is no folder, and no model of that Hub id is in the "
                           f"local Hugging Face cache ({cache}). Fix: download it once with "
                           f"`hf download {repo_id}` (HF_HOME chooses the cache), or give "
                           "the model's folder; raytron downloads nothing itself."]) from None


def hub_cache() -> Path:
    """The Hugging Face cache as the environment names it now (huggingface_hub reads it
    once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) \
        / "huggingface"
    return Path(home).expanduser() / "hub"


def run_source(run_dir: Path, config: RaytronConfig, step: int, kind: str,
               folder: Path | None = None) -> ModelSource:
    if folder is not None:  # a checkpoint folder is read where it is
        config.checkpoint.dir = str(folder.resolve().parent)
    tokenizer_file = run_dir / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ConfigError([f"{run_dir} has no {TOKENIZER_FILE}. Fix: give the directory of a "
                           "run that `raytron train` started."])
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    # a run started before runs kept their template trained with ChatML, if with any
    template = chat_template_of(run_dir) or (
        CHATML if tokenizer.token_to_id(TURN_START) is not None else None)
    return ModelSource(kind, folder or run_dir, gpt_shape(config.model), tokenizer,
                       with_turn_end(end_ids(tokenizer), tokenizer, template),
                       bos_id(tokenizer) if config.data.bos else None,
                       config.model.family, template, step, run_dir, config)


def with_turn_end(ends: list[int], tokenizer: Tokenizer | None,
                  template: ChatTemplate | None) -> list[int]:
    """`ends` and the token that ends an assistant turn in the model's template."""
    end = None if tokenizer is None or template is None else turn_end_id(tokenizer, template)
    return ends if end is None or end in ends else [*ends, end]


def hugging_face_source(folder: Path) -> ModelSource:
    config = read_json(folder / HF_CONFIG)
    try:
        shape = shape_from_hf_config(config, HF_MAXIMA)
    except ValueError as error:
        raise ConfigError([f"{folder}: {error}."]) from None
    weight_files(folder)  # refused now, before the model is built
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    generation = read_json(folder / "generation_config.json") \
        if (folder / "generation_config.json").is_file() else {}
    end_ids = token_ids(folder, "eos_token_id", generation.get("eos_token_id",
                                                               config.get("eos_token_id")),
                        shape.vocab_size)
    if not end_ids and tokenizer is not None:
        end_ids = [eos_id(tokenizer)]
    template = chat_template_of(folder)
    return ModelSource(HUGGING_FACE, folder, shape, tokenizer,
                       with_turn_end(end_ids, tokenizer, template),
                       added_bos(tokenizer, config.get("bos_token_id")), config["model_type"],
                       template)


def chat_template_of(folder: Path) -> ChatTemplate | None:
    try:
        return model_chat_template(folder)
    except ChatError as error:
        raise ConfigError([f"{folder}: {error}."]) from None


def token_ids(folder: Path, key: str, value: Any, vocab_size: int) -> list[int]:
    """A token id, or a list of them (a model may end on several), each in the vocabulary."""
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        return ids
    raise ConfigError([f"{folder}: {key}={value!r} is neither a token id below vocab_size="
                       f"{vocab_size} nor a list of them. Fix: correct it in {HF_CONFIG} (or "
                       "generation_config.json)."])


def added_bos(tokenizer: Tokenizer | None, bos: int | None) -> int | None:
    """The BOS id when the tokenizer puts it before every text (its post-processor does)."""
    if tokenizer is None or bos is None:
        return None
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    return bos if with_special[:1] == [bos] else None


def read_hf_weights(folder: Path, shape: GPTShape, family_name: str,
                    names: Collection[str] | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    family = FAMILIES[family_name]
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(folder / file), framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
                ours = raytron_name(key, family)
                if ours is not None and (names is None or ours in names):
                    weights.update(from_hf({key: tensors.get_tensor(key)}, shape, family))
    return weights


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a Hugging Face folder: those its index names, else the one
    file; ConfigError when there are none, or when one is not a file inside the folder (an
    index is untrusted input and may name `../..` or an absolute path)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map = read_json(folder / SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(file, str) for file in weight_map.values()):
            raise ConfigError([f"{folder / SAFETENSORS_INDEX} has no weight_map object of "
                               "file names. Fix: give a valid index (`save_pretrained` writes "
                               "one)."])
        files = sorted(set(weight_map.values()))
    elif (folder / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        raise ConfigError([f"{folder} has no {SAFETENSORS} (nor {SAFETENSORS_INDEX}); raytron "
                           "reads safetensors only, never pickled weights. Fix: save the model "
                           "with `save_pretrained(..., safe_serialization=True)`."])
    for file in files:
        if not is_file_inside(folder, file):
            raise ConfigError([f"{folder}: its weights name {file!r}, which is not a file "
                               "inside the folder. Fix: keep the weight files in the folder "
                               "itself, named by their plain file names."])
    return files


def is_file_inside(folder: Path, name: str) -> bool:
    """A relative name, without `..`, of a file in `folder`. A link there is followed: the
    Hugging Face cache's snapshot folders hold links into its blobs, and a link is put
    there by whoever owns the folder, not by a file's text."""
    if not name or "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    return (folder / name).is_file()


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError([f"{path} cannot be read ({error}). Fix: give a folder whose "
                           f"{path.name} is valid JSON."]) from None
    if not isinstance(value, dict):
        raise ConfigError([f"{path} is not a JSON object. Fix: give a valid {path.name}."])
    return value
