"""Which checkpoints a preset needs, whether each is on this machine, and the fix when not."""

from __future__ import annotations

import os
from dataclasses import dataclass

LOCAL_BACKENDS = {"synthetic", "tiny", "perception-baseline", "version"}
GATED = {"black-forest-labs/FLUX.1-Fill-dev"}


@dataclass
class RoleStatus:
    role: str
    backend: str
    checkpoint: str
    present: bool
    size_gib: float | None
    fix: str


def _cached_repos() -> dict[str, float]:
    try:
        from huggingface_hub import scan_cache_dir

        return {r.repo_id: r.size_on_disk / 2**30 for r in scan_cache_dir().repos}
    except Exception:  # noqa: BLE001 - no cache folder yet
        return {}


def _folder_gib(path: str) -> float:
    total = 0
    for dirpath, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return total / 2**30


def _open_clip_repo(model: str, tag: str) -> str | None:
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model, tag)
        return (cfg.get("hf_hub") or "").strip("/") or None
    except Exception:  # noqa: BLE001
        return None


def check_models(specs: dict[str, dict | str]) -> list[RoleStatus]:
    cache = _cached_repos()
    out = []
    for role, spec in specs.items():
        spec = {"backend": spec} if isinstance(spec, str) else dict(spec)
        backend = spec["backend"]
        if backend in LOCAL_BACKENDS:
            what = f"version {spec['version']}" if backend == "version" else "built locally, no weights"
            out.append(RoleStatus(role, backend, what, True, None, ""))
            continue
        model = spec.get("model", "")
        repo = model
        if backend == "open_clip" and spec.get("pretrained"):
            repo = _open_clip_repo(model, spec["pretrained"]) or f"{model}/{spec['pretrained']}"
        if model and os.path.isdir(model):
            out.append(RoleStatus(role, backend, model, True, _folder_gib(model), ""))
        elif repo in cache:
            out.append(RoleStatus(role, backend, repo, True, cache[repo], ""))
        else:
            gated = " (gated: accept its license on the Hub first, then `hf auth login`)" if repo in GATED else ""
            key = role if "." in role else f"models.{role}"
            local = (
                f"`--set {key}.pretrained=/path/to/open_clip_model.safetensors`"
                if backend == "open_clip"
                else f"`--set {key}.model=/path/to/folder`"
            )
            fix = f"on a machine with Hub access: `hf download {repo}`{gated}; or copy it here and {local}"
            out.append(RoleStatus(role, backend, repo, False, None, fix))
    return out
