"""Typed configs: defaults and validation in pydantic models, loadable from YAML, overridable from the CLI.

Precedence (last wins): model defaults → ``--config FILE.yaml`` → ``--set a.b=value`` → explicit CLI options.
Every command that writes outputs saves the resolved config beside them (:func:`save_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import MWMError
from .io import atomic_write_text  # noqa: F401  (re-exported: callers import it from here)

M = TypeVar("M", bound=BaseModel)


class ConfigError(MWMError):
    """A config file or override that does not validate."""


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": 2}`` → ``{"a.b": 1, "c": 2}``: nested config dicts as dotted keys (how configs are
    compared when resuming a run or reusing a bench part). Empty sub-dicts contribute no key."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_shard(spec: str) -> tuple[int, int]:
    """``"1/4"`` → (1, 4): shard i of n (0-based) of a job split over n processes; ``ValueError`` otherwise."""
    try:
        i, n = (int(p) for p in spec.split("/"))
    except ValueError:
        raise ValueError(f"a shard looks like i/n (e.g. 0/4 … 3/4 for four processes), got '{spec}'") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {spec}: need 0 <= i < n")
    return i, n


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
    d[parts[-1]] = value


def parse_sets(sets: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` → nested dict with YAML-typed values (``1`` → int, ``[1,2]`` → list)."""
    out: dict = {}
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set expects key=value, got '{s}'")
        k, v = s.split("=", 1)
        _set_dotted(out, k.strip(), yaml.safe_load(v) if v.strip() else None)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of option: value")
    return data


def resolve(model: type[M], config_file: str | Path | None = None, sets: list[str] | None = None,
            options: dict | None = None) -> M:
    """Build a validated config. ``options``: explicit CLI options; ``None`` values mean "not given"."""
    data: dict = load_yaml(config_file) if config_file else {}
    data = _merge(data, parse_sets(sets))
    for k, v in (options or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        src = f" (from {config_file})" if config_file else ""
        raise ConfigError(f"invalid {model.__name__}{src}:\n" + "\n".join(lines)) from e


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Save the resolved config as YAML at ``path`` (a file name, or a folder → ``folder/config.yaml``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    atomic_write_text(path, dump_config(cfg))
    return path
