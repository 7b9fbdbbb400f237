"""Backends per model role, and loading them from a config spec.

A spec is a backend name (``"synthetic"``) or a mapping ``{"backend": name, **options}``. Each
backend names the project modules that compute it: a stage's version id hashes the code of the
backends it is configured with (stages/version.py), so editing the attacker does not rename a
Stage 1 output. ``exact`` backends (the synthetic world's oracles) give the same bytes on every
machine; the others run floating-point kernels, so versions that use them also record the
kernel family (torch, CPU/GPU) they ran on.

Loaded models are cached per process: a shard task reuses what the previous one loaded. The
registry lives with the stages because some backends are products of stages (a trained
defender version, a warmed tiny defender).
"""

from __future__ import annotations

import functools
import importlib
import json
import threading
from dataclasses import dataclass
from typing import Any

from config import ConfigError, PipelineConfig, load_config

ROLES = ("outpainter", "inpainter", "judge", "clip", "detector", "segmenter", "defender")


class ModelConfigError(ValueError):
    """A model spec names no known backend or gives it options it does not take."""


@dataclass(frozen=True)
class Backend:
    target: str  # "module:attribute" of the factory, imported on first load
    modules: tuple[str, ...] = ()  # project modules whose code computes its outputs (besides the target's)
    exact: bool = False  # an oracle: bit-identical outputs on every machine, no float kernels
    options: dict | None = None  # fixed keyword arguments given before the spec's own

    def make(self, **kw) -> Any:
        module, path = self.target.split(":")
        factory = importlib.import_module(module)
        for attr in path.split("."):  # "Class.classmethod" or "function"
            factory = getattr(factory, attr)
        return factory(**{**(self.options or {}), **kw})

    @property
    def code(self) -> tuple[str, ...]:
        return (self.target.split(":")[0], *self.modules)


def _oracle(cls: str) -> Backend:
    return Backend(f"models.synthetic:{cls}", exact=True)


BACKENDS: dict[str, dict[str, Backend]] = {
    "outpainter": {
        "synthetic": _oracle("SceneOutpainter"),
        "tiny": Backend("models.diffusion_fill:DiffusersFiller.tiny"),
        "diffusers": Backend("models.diffusion_fill:DiffusersFiller.from_pretrained"),
    },
    "inpainter": {
        "synthetic": _oracle("SceneInpainter"),
        "tiny": Backend("models.diffusion_fill:DiffusersFiller.tiny"),
        "diffusers": Backend("models.diffusion_fill:DiffusersFiller.from_pretrained"),
    },
    "judge": {
        "synthetic": _oracle("SceneJudge"),
        "tiny": Backend("models.mllm_judge:MLLMJudge.tiny"),
        "mllm": Backend("models.mllm_judge:MLLMJudge.from_pretrained"),
    },
    "clip": {
        "tiny": Backend("models.clip:OpenClipScorer", options={"model": "tiny-clip", "pretrained": None}),
        "open_clip": Backend("models.clip:OpenClipScorer"),
    },
    "detector": {
        "synthetic": _oracle("SceneDetector"),
        "tiny": Backend("models.grounding:GroundingDinoDetector.tiny"),
        "grounding-dino": Backend("models.grounding:GroundingDinoDetector.from_pretrained"),
    },
    "segmenter": {
        "synthetic": _oracle("SceneSegmenter"),
        "tiny": Backend("models.grounding:SamSegmenter.tiny"),
        "sam": Backend("models.grounding:SamSegmenter.from_pretrained"),
    },
    "defender": {
        "perception-baseline": Backend("models.perception_baseline:PerceptionBaselineDefender"),
        "version": Backend("stages.defender:defender_from_version"),
        "qwen-vl": Backend("models.qwen_vl:pretrained_policy"),
        "tiny": Backend("stages.warm_defender:tiny_defender"),
    },
}
# The attacker's editors (``attacker.model``): loaded by the attacker stage, checked here.
EDITORS = ("tiny", "tiny-kontext", "qwen-image-edit", "flux-kontext")


def backend(role: str, spec: str | dict) -> Backend:
    return BACKENDS[role][normalize_spec(role, spec)["backend"]]


def normalize_spec(role: str, spec: str | dict) -> dict:
    if role not in BACKENDS:
        raise ModelConfigError(f"unknown model role {role!r}; roles are {', '.join(ROLES)}")
    spec = {"backend": spec} if isinstance(spec, str) else dict(spec)
    name = spec.get("backend")
    if name not in BACKENDS[role]:
        raise ModelConfigError(
            f"no backend {name!r} for role {role!r}; available: {', '.join(sorted(BACKENDS[role]))} "
            f"(set it with --set models.{role}=NAME)"
        )
    return spec


def check_specs(cfg: PipelineConfig) -> PipelineConfig:
    """Every role's spec names a known backend, and the attacker a known editor."""
    for role, spec in cfg.models.items():
        try:
            normalize_spec(role, spec)
        except ModelConfigError as exc:
            raise ConfigError(str(exc)) from None
    try:
        # {backend: base} is Stage 2's base defender: checked where the loop starts
        # (stages.defender.initial_model_spec), since a data-only run may use any models.defender
        if cfg.defender.model.get("backend") != "base":
            normalize_spec("defender", cfg.defender.model)
    except ModelConfigError as exc:
        raise ConfigError(f"defender.model: {exc}") from None
    editor = cfg.attacker.model.get("backend", "tiny")
    if editor not in EDITORS:
        raise ConfigError(
            f"config attacker.model.backend: {editor!r} is none of {', '.join(EDITORS)} "
            "(fix it with --set attacker.model.backend=NAME)"
        )
    return cfg


def resolve_config(preset: str = "synthetic", overrides: list[str] | dict | None = None) -> PipelineConfig:
    """The run's config (config.load_config), with every model spec checked against the registry:
    the one entry point for commands and flows, so a bad spec fails before anything runs."""
    return check_specs(load_config(preset, overrides))


_LOCK = threading.Lock()  # shard tasks run in threads: load each model once, not once per thread


def load(role: str, spec: str | dict) -> Any:
    spec = normalize_spec(role, spec)
    with _LOCK:
        return _load_cached(role, json.dumps(spec, sort_keys=True))


def _contract(role: str) -> type | None:
    from models import roles

    return {
        "outpainter": roles.Outpainter,
        "inpainter": roles.Inpainter,
        "judge": roles.Judge,
        "clip": roles.ClipScorer,
        "detector": roles.Detector,
        "segmenter": roles.Segmenter,
        "defender": roles.MLLM,
    }[role]


@functools.lru_cache(maxsize=32)
def _load_cached(role: str, spec_json: str) -> Any:
    spec = json.loads(spec_json)
    name = spec.pop("backend")
    try:
        model = BACKENDS[role][name].make(**spec)
    except TypeError as exc:
        raise ModelConfigError(f"bad options for {role} backend {name!r}: {exc}") from exc
    contract = _contract(role)
    if not isinstance(model, contract):  # a backend that misses a method of its role fails here, not mid-stage
        raise ModelConfigError(f"{role} backend {name!r} does not implement {contract.__name__} (models/roles.py)")
    return model
