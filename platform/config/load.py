"""Loading a run's config: the schema's defaults, a preset or YAML file, then overrides.

Keys the user set (in an override or in a YAML file of their own, not in a shipped
preset) are remembered, so that a derived default (the worker count, a micro-batch
size that suits the pipeline schedule) never replaces a value the user chose.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

import raytron.configs
from raytron.platform.config.resolve import with_derived_defaults
from raytron.platform.config.schema import ConfigError, RaytronConfig

DEFAULT_PRESET = "tiny"
SOURCE_LIST = re.compile(r"^data\.(validation_)?sources$")
SOURCE_ITEM = re.compile(r"^data\.(validation_)?sources\.\d+$")


def preset_dirs() -> list[Path]:
    """Folders holding the shipped presets (configs/), in an editable or a regular install."""
    return [Path(p) for p in raytron.configs.__path__ if Path(p).is_dir()]


def preset_names() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.yaml")})


def find_config_file(name_or_path: str) -> Path:
    """A YAML path as given, or the name of a shipped preset (`tiny`, `gpt2-124m`...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in preset_dirs():
        yaml_file = path.suffix in (".yaml", ".yml")  # a preset's name may hold dots
        candidate = folder / f"{path.stem if yaml_file else name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        [
            f"config '{name_or_path}' is neither a YAML file nor a preset. "
            f"Fix: pass a path to a .yaml file or one of: {', '.join(preset_names())}."
        ]
    )


def is_preset(path: Path) -> bool:
    return any(path.resolve().parent == folder.resolve() for folder in preset_dirs())


def load_config(name_or_path: str | None = None,
                overrides: list[str] | None = None) -> RaytronConfig:
    """Merge schema defaults, a preset or YAML file, and `key=value` overrides, then fill
    the derived defaults. Raises `ConfigError` naming the bad key."""
    path = find_config_file(name_or_path or DEFAULT_PRESET)
    tree = OmegaConf.structured(RaytronConfig)
    tree.run.name = path.stem  # a file that names its run overrides this below
    explicit: set[str] = set()
    try:
        from_file = OmegaConf.to_container(OmegaConf.load(path)) or {}
        if not isinstance(from_file, dict):
            raise ValueError(f"it holds a {type(from_file).__name__}, not a mapping")
        from_file = with_source_dicts("", from_file)
        tree = OmegaConf.merge(tree, from_file)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
        raise ConfigError([describe_load_error(error, f"in {path}")]) from None
    if not is_preset(path):
        explicit |= leaf_keys("", from_file)
    problems = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override '{item}' is not key=value. Fix: write e.g. train.steps=100.")
            continue
        try:
            parsed = with_source_dicts(key, yaml.safe_load(value))
            OmegaConf.update(tree, key, parsed, merge=True)
        except yaml.YAMLError:
            problems.append(f"{key}: cannot parse '{value}'. Fix: quote it, e.g. {key}='...'.")
            continue
        except (OmegaConfBaseException, ValueError) as error:
            problems.append(describe_load_error(error, f"in override '{item}'"))
            continue
        explicit |= leaf_keys(key, parsed)
    if problems:
        raise ConfigError(problems)
    try:
        OmegaConf.resolve(tree)
        config = OmegaConf.to_object(tree)
    except OmegaConfBaseException as error:
        raise ConfigError([describe_load_error(error, "")]) from None
    assert isinstance(config, RaytronConfig)
    return with_derived_defaults(config, explicit)


def with_source_dicts(key: str, value: Any) -> Any:
    """`data.sources=[corpus/, more.jsonl]`: a plain path is a source with default settings
    (and `data.sources=corpus/` a list of that one source)."""
    if SOURCE_ITEM.match(key) and isinstance(value, str):
        return {"path": value}
    if SOURCE_LIST.match(key) and isinstance(value, str):
        return [{"path": value}]
    if SOURCE_LIST.match(key) and isinstance(value, list):
        return [{"path": item} if isinstance(item, str) else item for item in value]
    if isinstance(value, dict):
        return {name: with_source_dicts(f"{key}.{name}" if key else str(name), item)
                for name, item in value.items()}
    return value


def leaf_keys(key: str, value: Any) -> set[str]:
    """The dotted keys an override or a file sets."""
    if isinstance(value, (dict, list)) and value:
        prefix = f"{key}." if key else ""
        return {f"{prefix}{name}" for name in flatten(value)}
    return {key} if key else set()


def describe_load_error(error: Exception, where: str) -> str:
    if not isinstance(error, OmegaConfBaseException):
        text = " ".join(line.strip() for line in str(error).splitlines())
        return f"cannot read the config{f' ({where})' if where else ''}: {text}. Fix: " \
               "write a YAML mapping of sections, as `raytron config` prints."
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(error, "full_key", None) or "?")
    where = f" ({where})" if where else ""
    message = (getattr(error, "msg", None) or str(error)).strip().splitlines()[0]
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        known = known_keys(section)
        return (
            f"{key}: unknown key{where}. Fix: use one of {', '.join(known)} "
            "(`raytron config` prints them all)."
        )
    if isinstance(error, ValidationError):
        return f"{key}: {message}{where}. Fix: give a value of the type `raytron config` shows."
    return f"{key}: {message}{where}. Fix: correct the value of {key}."


def known_keys(section: str) -> list[str]:
    node: Any = OmegaConf.structured(RaytronConfig)
    for part in [p for p in section.split(".") if p]:
        if part.isdigit() and hasattr(node, "__len__") and int(part) < len(node):
            node = node[int(part)]
        elif hasattr(node, "keys") and part in node:
            node = node[part]
        else:
            break
    prefix = f"{section}." if section else ""
    return [f"{prefix}{k}" for k in node.keys()] if hasattr(node, "keys") else []


def to_yaml(config: RaytronConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: RaytronConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))  # type: ignore[return-value]


def flatten(tree: dict | list, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`; lists get their index as a key."""
    flat: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
