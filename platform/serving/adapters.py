"""The LoRA adapters a server serves by name on its base model: each `--adapter
NAME=PATH`, and, as Ray Serve LLM's dynamic LoRA loading does, each folder NAME of
`--adapters-dir` from the first request for it (one put there while serving is found by
the next request; one changed there is read again).

An adapter is a PEFT LoRA folder (adapter_config.json and adapter_model.safetensors, as
`raytron export` of a LoRA run and PEFT's `save_pretrained` write them) or a raytron
LoRA run (its directory or a checkpoint folder), whose recorded base must be the served
model (a PEFT folder names its base by a path or Hub id that cannot be checked; its
shapes are). Both are read as data: a bounded JSON config, safetensors of a bounded size,
every tensor's name and shape checked against the base; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch

from raytron.model.adapter_bank import Adapter, fit_problem, projections
from raytron.model.families import FAMILIES
from raytron.model.gpt import GPT
from raytron.model.hf import from_peft
from raytron.platform.config.resolve import lora_spec
from raytron.platform.config.schema import ConfigError
from raytron.platform.models.lora_base import base_reference, check_base, model_fingerprint
from raytron.platform.models.sources import HUGGING_FACE, ModelSource, open_source
from raytron.platform.serving.adapter_names import AdapterError, AdapterSettings, name_problem
from raytron.platform.storage.checkpoint import CheckpointStore

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_LISTED = 1000  # adapters of --adapters-dir that /v1/models lists


class AdapterLibrary:
    """Finds and reads the adapters of `settings` for `base`; the last `max_adapters`
    read are kept."""

    def __init__(self, settings: AdapterSettings, base: ModelSource):
        self.settings, self.base = settings, base
        with torch.device("meta"):
            model = GPT(base.shape)
        self.shapes = {name: (m.in_features, m.out_features)
                       for name, m in projections(model).items()}
        self.read: OrderedDict[str, Adapter] = OrderedDict()
        self.base_fingerprint: str | None = None

    def path(self, name: str) -> Path | None:
        """Where adapter `name` is; None when this server has no such adapter."""
        if name in self.settings.paths:
            return Path(self.settings.paths[name]).expanduser()
        directory = self.settings.directory
        if directory is None or name_problem(name):
            return None
        folder = Path(directory).expanduser() / name
        return folder if (folder / ADAPTER_CONFIG).is_file() else None

    def names(self) -> list[str]:
        """Every adapter this server has: those given, then those of its folder."""
        names = list(self.settings.paths)
        if self.settings.directory is not None:
            folder = Path(self.settings.directory).expanduser()
            found = sorted(entry.name for entry in folder.iterdir()
                           if not name_problem(entry.name) and entry.name not in names
                           and (entry / ADAPTER_CONFIG).is_file()) if folder.is_dir() else []
            names += found[:MAX_LISTED]
        return names

    def adapter(self, name: str) -> Adapter:
        """Adapter `name`, read (again when its files changed); AdapterError when it
        cannot be served, KeyError when there is none."""
        path = self.path(name)
        if path is None:
            raise KeyError(name)
        version = files_version(path)
        held = self.read.get(name)
        if held is None or held.version != version:
            held = self.read_adapter(name, path, version)
            self.read[name] = held
        self.read.move_to_end(name)
        while len(self.read) > self.settings.max_adapters:
            self.read.popitem(last=False)
        return held

    def read_adapter(self, name: str, path: Path, version: str) -> Adapter:
        from safetensors import SafetensorError

        try:
            adapter = peft_adapter(name, path, version, self.base,
                                   self.max_file_bytes()) \
                if (path / ADAPTER_CONFIG).is_file() else self.run_adapter(name, path, version)
        except AdapterError:
            raise
        except (OSError, ValueError, SafetensorError) as error:
            raise AdapterError(f"adapter '{name}' ({path}) cannot be read: {error}. Fix: give "
                               "a PEFT LoRA folder or a raytron LoRA run.") from None
        problem = fit_problem(adapter, self.shapes, self.settings.max_rank)
        if problem:
            fix = "raise --max-lora-rank" if adapter.rank > self.settings.max_rank else \
                "serve it on the model it was trained on"
            raise AdapterError(f"adapter '{name}' ({path}) does not fit the served model: "
                               f"{problem}. Fix: {fix}.")
        return adapter

    def max_file_bytes(self) -> int:
        """The most an adapter's weights may hold: every projection at the largest rank,
        in float32 (and 1 MiB of safetensors header)."""
        rank = self.settings.max_rank
        return 4 * rank * sum(fan_in + fan_out for fan_in, fan_out in self.shapes.values()) \
            + (1 << 20)

    def run_adapter(self, name: str, path: Path, version: str) -> Adapter:
        """A raytron LoRA run's adapters, from the checkpoint `path` names; its base must
        be the served model."""
        try:
            source = open_source(path)
        except ConfigError as error:
            raise AdapterError(f"adapter '{name}': {path} is neither a PEFT adapter folder "
                               f"(with {ADAPTER_CONFIG}) nor a raytron LoRA run: "
                               f"{' '.join(error.problems)}") from None
        spec = None if source.kind == HUGGING_FACE else lora_spec(source.config.train.lora)
        if spec is None:
            raise AdapterError(f"adapter '{name}': {path} is a whole model, not LoRA adapters. "
                               "Fix: serve it as a model of its own, or give a LoRA run or "
                               "a PEFT adapter folder.")
        if spec.train_embeddings:
            raise AdapterError(f"adapter '{name}': {path} trained the embeddings and the head "
                               "whole (train.lora.train_embeddings), which an adapter bank "
                               "cannot share. Fix: serve its merged model (`raytron export "
                               "--merge`) as a model of its own.")
        config = source.config
        store = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep_last)
        trained_on = base_reference(config)
        try:
            check_base(store, config, trained_on)
        except ConfigError as error:
            raise AdapterError(f"adapter '{name}': {' '.join(error.problems)}") from None
        if self.base_fingerprint is None:
            self.base_fingerprint = model_fingerprint(self.base)
        if trained_on["fingerprint"] != self.base_fingerprint:
            raise AdapterError(f"adapter '{name}' ({path}) was trained on "
                               f"{trained_on['source']!r}, which is not the served model. "
                               "Fix: serve that base, or export the adapters (`raytron export`) "
                               "and give their PEFT folder.")
        tensors = store.read_model(source.step)
        weights = {module: (tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"])
                   for module in {key.rsplit(".", 1)[0] for key in tensors}}
        return Adapter(name, version, spec.rank, spec.scale, weights)


def peft_adapter(name: str, folder: Path, version: str, base: ModelSource,
                 max_bytes: int) -> Adapter:
    """A PEFT LoRA folder's adapter; AdapterError for what raytron does not compute."""
    from safetensors.torch import load_file

    config = bounded_json(folder / ADAPTER_CONFIG)
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    unsupported = [key for key in ("use_dora", "modules_to_save", "rank_pattern",
                                   "alpha_pattern", "layers_to_transform", "fan_in_fan_out")
                   if config.get(key)]
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        unsupported.append("a peft_type other than LORA, or trained biases")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or \
            not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or \
            not math.isfinite(alpha):
        unsupported.append("r and lora_alpha that are not positive numbers")
    if unsupported:
        raise AdapterError(f"adapter '{name}' ({folder}) uses {', '.join(unsupported)}, which "
                           "a served adapter bank does not compute. Fix: serve its merged "
                           "model as a model of its own.")
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise AdapterError(f"adapter '{name}' ({folder}) has no {ADAPTER_WEIGHTS}; raytron "
                           "reads safetensors only. Fix: save it with `save_pretrained` "
                           "(safe_serialization=True).")
    if weights_file.stat().st_size > max_bytes:
        raise AdapterError(f"adapter '{name}' ({folder}): {ADAPTER_WEIGHTS} holds "
                           f"{weights_file.stat().st_size} bytes, more than adapters of rank "
                           "--max-lora-rank on every projection of this model would.")
    tensors = load_file(str(weights_file))
    if not all(tensor.is_floating_point() for tensor in tensors.values()):
        raise AdapterError(f"adapter '{name}' ({folder}) holds tensors that are not floats")
    adapted = from_peft(tensors, base.shape, FAMILIES[base.family])
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return Adapter(name, version, rank, scale, adapted)


def bounded_json(path: Path) -> dict:
    with path.open("rb") as handle:
        text = handle.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} holds more than {MAX_CONFIG_BYTES} bytes")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise AdapterError(f"{path} is not a JSON object")
    return value


def files_version(path: Path) -> str:
    """What changes when a folder's files are written again: their sizes and times."""
    if not path.is_dir():
        return "absent"
    return ";".join(f"{entry.name}:{entry.stat().st_size}:{entry.stat().st_mtime_ns}"
                    for entry in sorted(path.iterdir()) if entry.is_file())
