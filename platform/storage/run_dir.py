"""Where one run keeps its files, and the config it saved there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
        return flatten(OmegaConf.to_container(OmegaConf.load(self.config_file)))


def absolute(location: str) -> str:
    """A local path made absolute; a URI (`s3://...`) or an embedded corpus as it is."""
    if "://" in location or location.startswith("embedded:"):
        return location
    return str(Path(location).expanduser().absolute())


def read_run_config(folder: Path) -> RaytronConfig:
    """The config a run directory saved, through the schema (older files get today's
    defaults for keys they lack); ConfigError when `folder` holds no run."""
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError([f"{folder} holds no raytron run (no {CONFIG_FILE}). Fix: give the "
                           "run directory, <run.root>/<run.name>, e.g. runs/tiny."])
    try:
        config = OmegaConf.merge(OmegaConf.structured(RaytronConfig),
                                 OmegaConf.load(folder / CONFIG_FILE))
        return OmegaConf.to_object(config)  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError, TypeError) as error:
        raise ConfigError([f"{folder / CONFIG_FILE} is not a raytron run's config "
                           f"({str(error).splitlines()[0]}). Fix: give the directory of a "
                           "run that `raytron train` started."]) from None
