"""Backends per role, and loading them from a config spec.

A spec is a backend name (``"synthetic"``) or a mapping ``{"backend": name, **options}``.
Loaded models are cached per process: a shard task reuses what the previous one loaded.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any, Callable

ROLES = ("outpainter", "inpainter", "judge", "clip", "detector", "segmenter", "defender")


def _synthetic(cls_name: str) -> Callable[..., Any]:
    def make(**kw):
        from models import synthetic

        return getattr(synthetic, cls_name)(**kw)

    return make


def _baseline(**kw):
    from models.perception_baseline import PerceptionBaselineDefender

    return PerceptionBaselineDefender(**kw)


def _defender_version(version: str, root: str, storage_options: dict | None = None):
    """A defender trained by the pipeline (a ``defender`` version under ``root``)."""
    from storage import ShardStore
    from training.stage import load_defender

    return load_defender(ShardStore(root, storage_options), version)


def _qwen_vl(**kw):
    from models.qwen_vl import load_policy

    return load_policy({"backend": "qwen-vl", **kw})


def _tiny_defender(warmup: dict | None = None, **kw):
    """The tiny Qwen2.5-VL defender; with ``warmup`` ({steps, scenes, seed, lr, batch}) after a
    short supervised warm-up on fresh synthetic scenes, trained once and cached."""
    if warmup is not None:
        from training.toy import warmed_tiny_defender

        return warmed_tiny_defender({"backend": "tiny", **kw}, warmup)
    from models.qwen_vl import load_policy

    return load_policy({"backend": "tiny", **kw})


def _tiny_filler(**kw):
    from models.diffusion_fill import DiffusersFiller

    return DiffusersFiller.tiny(**kw)


def _diffusers_filler(**kw):
    from models.diffusion_fill import DiffusersFiller

    return DiffusersFiller.from_pretrained(**kw)


def _judge(mllm_spec: dict, **kw):
    from models.mllm_judge import MLLMJudge
    from models.qwen_vl import load_policy

    return MLLMJudge(load_policy(mllm_spec), **kw)


def _tiny_judge(seed: int = 0, max_new_tokens: int = 16, **kw):
    return _judge({"backend": "tiny", "seed": seed, "min_pixels": 1024, "max_pixels": 4096},
                  max_new_tokens=max_new_tokens, **kw)


def _mllm_judge(model: str = "Qwen/Qwen2.5-VL-7B-Instruct", dtype: str = "bfloat16", device: str = "cuda",
                trust_remote_code: bool = False, **kw):
    return _judge({"backend": "qwen-vl", "model": model, "dtype": dtype, "device": device,
                   "trust_remote_code": trust_remote_code}, **kw)


def _grounding(tiny: bool):
    def make(**kw):
        from models.grounding import GroundingDinoDetector

        return GroundingDinoDetector.tiny(**kw) if tiny else GroundingDinoDetector.from_pretrained(**kw)

    return make


def _sam(tiny: bool):
    def make(**kw):
        from models.grounding import SamSegmenter

        return SamSegmenter.tiny(**kw) if tiny else SamSegmenter.from_pretrained(**kw)

    return make


def _open_clip(**kw):
    from models.clip import OpenClipScorer

    return OpenClipScorer(**kw)


def _tiny_clip(**kw):
    return _open_clip(model="tiny-clip", pretrained=None, **kw)


BACKENDS: dict[str, dict[str, Callable[..., Any]]] = {
    "outpainter": {"synthetic": _synthetic("SceneOutpainter"), "tiny": _tiny_filler, "diffusers": _diffusers_filler},
    "inpainter": {"synthetic": _synthetic("SceneInpainter"), "tiny": _tiny_filler, "diffusers": _diffusers_filler},
    "judge": {"synthetic": _synthetic("SceneJudge"), "tiny": _tiny_judge, "mllm": _mllm_judge},
    "clip": {"tiny": _tiny_clip, "open_clip": _open_clip},
    "detector": {"synthetic": _synthetic("SceneDetector"), "tiny": _grounding(True), "grounding-dino": _grounding(False)},
    "segmenter": {"synthetic": _synthetic("SceneSegmenter"), "tiny": _sam(True), "sam": _sam(False)},
    "defender": {"perception-baseline": _baseline, "version": _defender_version, "qwen-vl": _qwen_vl,
                 "tiny": _tiny_defender},
}


class ModelConfigError(ValueError):
    pass


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


_LOCK = threading.Lock()  # shard tasks run in threads: load each model once, not once per thread


def load(role: str, spec: str | dict) -> Any:
    spec = normalize_spec(role, spec)
    with _LOCK:
        return _load_cached(role, json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _load_cached(role: str, spec_json: str) -> Any:
    spec = json.loads(spec_json)
    name = spec.pop("backend")
    try:
        return BACKENDS[role][name](**spec)
    except TypeError as exc:
        raise ModelConfigError(f"bad options for {role} backend {name!r}: {exc}") from exc
