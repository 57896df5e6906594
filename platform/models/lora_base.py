"""The base model under a LoRA run's adapters.

A LoRA run's checkpoints hold its adapters (and their optimizer state) only: the base
is frozen, so it is read again from where the run took it, `model.init_from` or the
initial weights its seed gives. So that a base that changed since (a run directory that
trained on, a folder overwritten) never passes for the one the adapters were trained
on, the run records the base's source and a fingerprint beside its checkpoints when it
starts (`BASE_FILE`), and a resume, an export or a load checks them.

The fingerprint is cheap at any size: the names and sizes of the source's files and
the first and last MiB of each (a safetensors file starts with its tensors' names,
shapes and offsets), or, for a seeded base, the seed and the model's shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from raytron.model.gpt import GPT
from raytron.model.lora import LoraSpec, is_adapter
from raytron.platform.config.resolve import gpt_shape, lora_spec
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.storage.checkpoint import CheckpointStore, write_atomically

if TYPE_CHECKING:
    from raytron.platform.models.sources import ModelSource

BASE_FILE = "lora_base.json"  # beside the checkpoints, as config.yaml
SAMPLED_BYTES = 1 << 20
MAX_BASE_FILE_BYTES = 1 << 16


def base_reference(config: RaytronConfig) -> dict[str, str]:
    """{"source", "fingerprint"} of the base the config trains adapters on."""
    from raytron.platform.models.sources import open_source

    init_from = config.model.init_from
    if not init_from:
        shape = dataclasses.asdict(gpt_shape(config.model))
        return {"source": f"the initial weights of train.seed={config.train.seed}",
                "fingerprint": digest(json.dumps([config.train.seed, shape]).encode())}
    return {"source": init_from, "fingerprint": model_fingerprint(open_source(init_from))}


def model_fingerprint(source: ModelSource) -> str:
    """The fingerprint of a Hugging Face folder's or a checkpoint's files."""
    from raytron.platform.models.sources import HUGGING_FACE, weight_files

    if source.kind == HUGGING_FACE:
        folder, files = source.path, ["config.json", *weight_files(source.path)]
    else:
        store = CheckpointStore(source.config.checkpoint.dir, source.config.checkpoint.keep_last)
        folder = Path(store.folder(source.step))
        files = sorted(path.name for path in folder.iterdir() if path.is_file())
    return files_fingerprint(folder, files)


def files_fingerprint(folder: Path, files: list[str]) -> str:
    parts = []
    for name in files:
        path = folder / name
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(SAMPLED_BYTES)
            handle.seek(max(size - SAMPLED_BYTES, 0))
            tail = handle.read(SAMPLED_BYTES)
        parts.append(f"{name}:{size}:{digest(head)}:{digest(tail)}")
    return digest("\n".join(parts).encode())


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_base(store: CheckpointStore, reference: dict[str, str]) -> None:
    """Write the base's reference beside the checkpoints at each start: a resume has
    checked it first (`check_base`), a run with no checkpoint yet may change its base."""
    store.fs.makedirs(store.root, exist_ok=True)
    write_atomically(store.fs, f"{store.root}/{BASE_FILE}", json.dumps(reference, indent=2))


def check_base(store: CheckpointStore, config: RaytronConfig,
               current: dict[str, str] | None = None) -> None:
    """ConfigError when the base the config names (`current`: its `base_reference`, when
    the caller has it) is not the one the run's adapters were trained on (nothing
    recorded: a run whose first start wrote no checkpoint yet)."""
    path = f"{store.root}/{BASE_FILE}"
    if not store.fs.exists(path):
        return
    with store.fs.open(path, "rb") as handle:
        text = handle.read(MAX_BASE_FILE_BYTES + 1)
    try:
        recorded = json.loads(text) if len(text) <= MAX_BASE_FILE_BYTES else None
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise ConfigError([f"{path} is not the base reference raytron writes. Fix: restore "
                           "it from a backup of the run, or start a new run.name."])
    current = current or base_reference(config)
    if recorded.get("fingerprint") != current["fingerprint"]:
        raise ConfigError([
            f"the LoRA adapters in {store.root} were trained on {recorded.get('source')!r}, "
            f"and {current['source']!r} is not that model now (its files differ). Fix: "
            "point model.init_from at the base the run started from (a checkpoint folder "
            "rather than a run directory that trained on), or start a new run.name."])


def base_weights(config: RaytronConfig, names: Collection[str] | None
                 ) -> dict[str, torch.Tensor]:
    """The base's whole tensors under raytron's names (those in `names`, or all), as the
    run's first step saw them (a grown vocabulary included)."""
    from raytron.platform.models.initial import grown_vocabulary
    from raytron.platform.models.sources import open_source

    if config.model.init_from:
        weights = open_source(config.model.init_from).read_weights(names)
        return grown_vocabulary(weights, config.model.vocab_size)
    with torch.device("meta"):
        model = GPT(gpt_shape(config.model))
    return {name: model.initial_value(config.train.seed, name, param.shape)
            for name, param in model.named_parameters() if names is None or name in names}


def adapted_weights(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                    spec: LoraSpec) -> dict[str, torch.Tensor]:
    """`base` with each adapter's update folded into its weight, W + (alpha/rank) B A,
    and what trained whole (`train_embeddings`) taken as it trained."""
    merged = {**base, **{name: t for name, t in adapters.items() if not is_adapter(name)}}
    for name, a in adapters.items():
        module = name.removesuffix(".lora_a")
        if module != name and f"{module}.weight" in merged:
            b = adapters[f"{module}.lora_b"]
            weight = merged[f"{module}.weight"]
            merged[f"{module}.weight"] = (weight.float() + spec.scale * b.float() @ a.float()
                                          ).to(weight.dtype)
    return merged


def merged_run_weights(config: RaytronConfig, store: CheckpointStore, step: int,
                       names: Collection[str] | None) -> dict[str, torch.Tensor]:
    """A LoRA run's model at `step` as whole weights: its base, checked, with the
    checkpoint's adapters folded in."""
    check_base(store, config)
    spec = lora_spec(config.train.lora)
    assert spec is not None
    adapters = store.read_model(step, None)
    return adapted_weights(base_weights(config, names), adapters, spec)
