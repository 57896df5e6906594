"""Where one run keeps its files, and the config it saved there."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raytron.platform.config.load import flatten
from raytron.platform.config.schema import ConfigError, RaytronConfig

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class RunPaths:
    """Absolute, since Ray workers run elsewhere."""

    root: Path  # all runs, and the local MLflow store
    dir: Path  # this run: config, tokenizer, MLflow run id
    checkpoints: str  # an absolute path, or an object-storage URI

    @classmethod
    def of(cls, config: RaytronConfig) -> RunPaths:
        root = Path(config.run.root).expanduser().absolute()
        return cls(root, root / config.run.name, absolute(config.checkpoint.dir))

    @property
    def config_file(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.dir / TOKENIZER_FILE

    def saved_config(self) -> dict | None:
        """The flattened config the run saved when it last started; None before that."""
        if not self.config_file.is_file():
            return None
        return flatten(read_config_data(self.config_file))


SQLITE = "sqlite:///"  # the one URI that names a local path


def is_local_path(location: str) -> bool:
    """Not a URI (`s3://...`) nor an embedded corpus."""
    return "://" not in location and not location.startswith("embedded:")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(location: str) -> bool:
    """A Hugging Face Hub id (`Qwen/Qwen3-0.6B`) and no path that exists here."""
    return HUB_ID.fullmatch(location) is not None and not Path(location).expanduser().exists()


def absolute(location: str) -> str:
    """A local path made absolute; a URI or an embedded corpus as it is."""
    return str(Path(location).expanduser().absolute()) if is_local_path(location) else location


def with_locations(config: RaytronConfig, convert: Callable[[str, str], str]) -> RaytronConfig:
    """`config` with each local path it names (run root, checkpoints, a SQLite store, local
    sources, the tokenizer, the token cache, the initial weights, task YAML files and task
    data) replaced by `convert(key, path)`; URIs (`s3://...`) and the embedded corpora are
    no paths and stay as they are."""
    def each(key: str, location: str | None) -> str | None:
        if location and location.startswith(SQLITE):
            return SQLITE + convert(key, location.removeprefix(SQLITE))
        return convert(key, location) if location and is_local_path(location) else location

    def sources(key: str, group: list) -> list:
        return [dataclasses.replace(s, path=each(f"{key}.{i}.path", s.path))
                for i, s in enumerate(group)]

    def tasks(key: str, names: list[str]) -> list[str]:  # task YAML files among task names
        return [each(f"{key}.{i}", name) if name.endswith((".yaml", ".yml")) else name
                for i, name in enumerate(names)]

    d = config.data
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, root=each("run.root", config.run.root)),
        train=dataclasses.replace(
            config.train, eval_tasks=tasks("train.eval_tasks", config.train.eval_tasks),
            eval_task_data_dir=each("train.eval_task_data_dir", config.train.eval_task_data_dir)),
        model=dataclasses.replace(config.model, init_from=config.model.init_from if is_hub_id(
            config.model.init_from or "") else each("model.init_from", config.model.init_from)),
        checkpoint=dataclasses.replace(config.checkpoint,
                                       dir=each("checkpoint.dir", config.checkpoint.dir)),
        tracking=dataclasses.replace(config.tracking,
                                     uri=each("tracking.uri", config.tracking.uri)),
        data=dataclasses.replace(d, sources=sources("data.sources", d.sources),
                                 validation_sources=sources("data.validation_sources",
                                                            d.validation_sources),
                                 tokenizer=each("data.tokenizer", d.tokenizer),
                                 cache=each("data.cache", d.cache)))


def read_run_config(folder: Path) -> RaytronConfig:
    """The config a run directory saved, through the schema (older files get today's
    defaults for keys they lack); ConfigError when `folder` holds no run."""
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError([f"{folder} holds no raytron run (no {CONFIG_FILE}). Fix: give the "
                           "run directory, <run.root>/<run.name>, e.g. runs/tiny."])
    try:
        config = OmegaConf.merge(OmegaConf.structured(RaytronConfig),
                                 as_written(read_config_data(folder / CONFIG_FILE)))
        return OmegaConf.to_object(config)  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError, TypeError) as error:
        raise ConfigError([f"{folder / CONFIG_FILE} is not a raytron run's config "
                           f"({str(error).splitlines()[0]}). Fix: give the directory of a "
                           "run that `raytron train` started."]) from None


INTERPOLATION = re.compile(r"(\\*)\$\{")  # `${`, and the backslashes before it


def read_config_data(path: Path) -> Any:
    """A saved config.yaml as plain data, never interpolated: a run's folder may be shared,
    and a `${oc.env:...}` written in it must not read this machine's environment."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def as_written(value: Any) -> Any:
    """`value` with every `${` of its strings escaped (`\\${`, backslashes before it doubled),
    so that OmegaConf keeps each string as written while the schema's own defaults
    (`checkpoint.dir: ${run.root}/...`) still resolve for keys an older file lacks."""
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda found: "\\" * (2 * len(found[1]) + 1) + "${", value)
    if isinstance(value, dict):
        return {key: as_written(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_written(item) for item in value]
    return value
