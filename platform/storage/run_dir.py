"""Where one run keeps its files, and the config it saved there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from raytron.platform.config.load import flatten
from raytron.platform.config.schema import RaytronConfig

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
