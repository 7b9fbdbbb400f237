"""Resolving a run's configuration: dataclass defaults <- a YAML preset <- ``--set`` overrides.

The layers are merged as plain mappings, then pydantic checks the result once against the typed
sections (config/pipeline.py): a wrong type or an unknown key fails before anything runs, with
a message that names the key. Two rules a generic deep merge would get wrong:

- a preset names a model spec whole (its mapping replaces the default spec), while a command-line
  override merges into the spec, so ``--set defender.model.device=cpu`` keeps the preset's model;
- an override naming another ``backend`` replaces the spec whole: options differ per backend.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from config.pipeline import ConfigError, PipelineConfig

PRESET_DIR = Path(__file__).parent / "presets"
# Keys of earlier releases: a preset or script that still uses one is told the new name.
RENAMED = {"stage1": "extend", "stage2": "implant"}
# Mappings whose values are model specs: a preset replaces a spec whole (see the module docstring).
SPEC_KEYS = {("models",), ("defender", "model"), ("attacker", "model")}

_ADAPTER = TypeAdapter(PipelineConfig)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_path(preset: str) -> Path:
    return Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"


def read_preset(preset: str, _seen: tuple = ()) -> dict:
    """A preset's mapping, over the preset it names as ``base`` (if any): presets share blocks
    (e.g. ``_tiny-training``, the tiny models' trainer settings) instead of copying them."""
    path = preset_path(preset)
    if not path.exists():
        raise ConfigError(
            f"no preset {preset!r}; available: {', '.join(available_presets())} (or a path to a .yaml file)"
        )
    if path in _seen:
        raise ConfigError(f"preset {path} names itself as a base (through {', '.join(map(str, _seen))})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base = str(path.parent / base)  # a file beside this preset
    return merge(read_preset(base, (*_seen, path)), data, into_specs=False)


def merge(base: dict, update: dict, into_specs: bool, _path: tuple = ()) -> dict:
    """``update`` over ``base`` (see the module docstring for the model-spec rules)."""
    out = dict(base)
    for key, value in update.items():
        path = (*_path, key)
        current = out.get(key)
        if path[:-1] in SPEC_KEYS or path in SPEC_KEYS - {("models",)}:
            spec_update = isinstance(value, dict) and isinstance(current, dict)
            if into_specs and spec_update and value.get("backend", current.get("backend")) == current.get("backend"):
                out[key] = merge(current, value, into_specs, path)
            else:
                out[key] = value
        elif isinstance(value, dict) and isinstance(current, dict):
            out[key] = merge(current, value, into_specs, path)
        else:
            out[key] = value
    return out


def nest_dotted(dotted: dict) -> dict:
    """``{"extend.canvas_scale": 1.75}`` -> ``{"extend": {"canvas_scale": 1.75}}`` (nested keys pass through)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def dotted_pairs(pairs: list[str], what: str = "override") -> dict:
    """``["extend.canvas_scale=1.75"]`` -> ``{"extend.canvas_scale": 1.75}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{what} {pair!r} is not KEY=VALUE (e.g. --set extend.canvas_scale=1.75)")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {pair!r}: value is not valid YAML ({exc})") from None
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """``["extend.canvas_scale=1.75", "models.clip=tiny"]`` -> nested dict (values parsed as YAML)."""
    return nest_dotted(dotted_pairs(pairs))


def _check_renamed(data: dict, where: str) -> None:
    for old, new in RENAMED.items():
        if old in data:
            raise ConfigError(
                f"config key {old!r} ({where}) is now {new!r}: write {new}.* instead of {old}.* "
                f"(e.g. --set {new}.{next(iter(data[old]), 'KEY') if isinstance(data[old], dict) else 'KEY'}=...)"
            )


def _key_of(loc: tuple) -> str:
    """The dotted config key of a pydantic error location (union members and indices left out)."""
    parts = []
    for p in loc:
        if not isinstance(p, str) or not p.isidentifier():
            break
        parts.append(p)
    return ".".join(parts)


def _valid_keys(key: str) -> list[str]:
    node: Any = PipelineConfig
    for part in key.split(".")[:-1]:
        hints = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return []
        default = hints[part].default_factory() if hints[part].default_factory is not dataclasses.MISSING else None
        node = type(default) if dataclasses.is_dataclass(default) else None
    return sorted(f.name for f in dataclasses.fields(node)) if node is not None else []


# pydantic error types (by prefix) in the words of a config file
_EXPECTED = {
    "int": "expected an integer",
    "float": "expected a number",
    "bool": "expected true/false",
    "string": "expected text",
    "list": "expected a list",
    "dict": "expected a mapping",
    "dataclass": "expected a mapping of the section's keys",
}


def from_mapping(data: dict) -> PipelineConfig:
    """A complete, checked config from a (possibly partial) mapping over the defaults."""
    try:
        cfg = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _key_of(err["loc"])
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            valid = _valid_keys(key)
            raise ConfigError(
                f"unknown config key {key!r}" + (f"; valid keys here: {', '.join(valid)}" if valid else "")
            ) from None
        msg = _EXPECTED.get(err["type"].split("_")[0], err["msg"].removeprefix("Value error, "))
        raise ConfigError(
            f"config {key}: {msg}, got {err.get('input')!r} (fix it in the preset or with --set {key}=...)"
        ) from None
    return cfg.validate()


def load_config(preset: str = "synthetic", overrides: list[str] | dict | None = None) -> PipelineConfig:
    data = read_preset(preset)
    _check_renamed(data, f"preset {preset}")
    merged = merge(dataclasses.asdict(PipelineConfig()), data, into_specs=False)
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        _check_renamed(over, "override")
        merged = merge(merged, over, into_specs=True)
    return from_mapping(merged)


def config_from_dict(data: dict) -> PipelineConfig:
    """A config as written by ``PipelineConfig.to_dict`` (task parameters, manifests)."""
    _check_renamed(data, "mapping")
    return from_mapping(merge(dataclasses.asdict(PipelineConfig()), data, into_specs=False))
