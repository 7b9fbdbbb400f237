"""What a version id is made of, and the one way a single-part version is found or made.

A version id hashes (stage, the stage's config, its code, its parents). Its *code* is exactly the
code that computes that stage's output: the transitive closure, inside the project, of the
imports of the stage's module and of the model backends it is configured with, function-level
imports included (a lazy import is code that runs). So editing an experiment, a benchmark reader
or the attacker renames no Stage 1 output; editing ``stages/implant.py`` renames implant and
everything downstream. Left out: ``config/`` (a stage's config *values* are hashed directly, so
help strings and presets rename nothing) and the orchestration above the stages.

Outputs of learned models (tiny CLIP, the warmed defender, every trainer) also depend on the
floating-point kernels they ran on: those versions hash the kernel family too (torch version,
CPU instruction set or GPU), so two machines writing one root never pass different bytes off as
one version (docs/reproducibility.md).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from models.cache import kernel_family  # noqa: F401  (re-exported: the stages hash it into ids)
from storage import Manifest, ShardStore, content_hash

TOP = Path(__file__).resolve().parent.parent
RELEASE = "0.2.0"
NOT_HASHED = ("config",)  # values, not code: hashed as the stage's config
EMPTY_REJECTS = {"id": pl.String, "reason": pl.String}
# Data a module loads as its weights, hashed with its code (and only with it): the shipped fits
# (models/cache.SHIPPED_FITS) are what an attacker edits with, and the embedded default's Stage 2
# defender answers with, when a fit key matches one.
MODULE_DATA = {
    "models.editor": ("models/fitted", "tiny-*/*.safetensors"),
    # the weights alone: the folder's config and tokenizer follow from the spec in its name, and
    # its aot_fit_key.json records the code version, which this hash is part of
    "stages.warm_defender": ("models/fitted", "warm-defender/*/model.safetensors"),
}


def _module_file(name: str) -> Path | None:
    base = TOP.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _imports(name: str) -> tuple[str, ...]:
    """The project modules ``name`` imports (anywhere in the file), and its parent packages."""
    path = _module_file(name)
    if path is None:
        return ()
    found: set[str] = set()
    parts = name.split(".")
    found.update(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b runs a/__init__ first
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return tuple(sorted(m for m in found if _module_file(m) is not None and m.split(".")[0] not in NOT_HASHED))


def closure(modules: Iterable[str]) -> list[str]:
    """Every project module the given ones import, transitively (themselves included)."""
    seen: set[str] = set()
    todo = [m for m in modules if _module_file(m) is not None]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_imports(m))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def _code_version(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    found = closure(modules)
    files = {_module_file(m) for m in found}
    for folder, pattern in (MODULE_DATA[m] for m in found if m in MODULE_DATA):
        files.update(p for p in TOP.joinpath(folder).glob(pattern) if p.is_file())
    # data files beside the code of a package in the closure (e.g. models/configs/*.json), not
    # the shipped fits' (hashed above, with the module that loads them)
    data = {TOP.joinpath(folder) for folder, _ in MODULE_DATA.values()}
    for package in {f.parent for f in files if f.name == "__init__.py"}:
        files.update(
            p
            for p in package.rglob("*.json")
            if "__pycache__" not in p.parts and not any(p.is_relative_to(d) for d in data)
        )
    for path in sorted(files):
        h.update(str(path.relative_to(TOP)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{RELEASE}+{h.hexdigest()[:12]}"


def code_version(modules: Iterable[str]) -> str:
    """The hash of the code that ``modules`` run (see the module docstring)."""
    return _code_version(tuple(sorted(set(modules))))


def version_id(stage: str, config: dict, parents: list[str], code: str, kernels: dict | None = None) -> str:
    ident = {"stage": stage, "config": config, "code": code, "parents": parents}
    if kernels:
        ident["kernels"] = kernels
    return content_hash(ident)


class VersionPart:
    """What computing a single-part version yields: its rows, rejects, files and summary."""

    def __init__(
        self,
        rows: pl.DataFrame,
        rows_in: int,
        rejects: pl.DataFrame | None = None,
        files: list | None = None,
        extra: dict | None = None,
    ):
        self.rows, self.rows_in, self.files, self.extra = rows, rows_in, files or [], extra or {}
        self.rejects = rejects if rejects is not None else pl.DataFrame(schema=EMPTY_REJECTS)


def single_part_version(
    store: ShardStore,
    dataset: str,
    stage: str,
    config: dict,
    parents: list[str],
    modules: Iterable[str],
    compute: Callable[[str], VersionPart | None],
    kernels: dict | None = None,
) -> tuple[Manifest | None, bool]:
    """The version of (stage, config, code of ``modules``, parents) under ``dataset``: found in
    the store, or computed by ``compute(version_id)`` and committed as one part. Returns
    (manifest, computed now). ``compute`` may return None when another process commits it (a
    data-parallel rank other than 0); the manifest is then read back, or None if not yet there."""
    code = code_version(modules)
    version = version_id(stage, config, parents, code, kernels)
    done = store.manifest_at(dataset, stage, version)
    if done is not None:
        return done, False
    part = compute(version)
    if part is None:
        return store.manifest_at(dataset, stage, version), True
    rec = store.write_shard(dataset, stage, version, 0, content_hash(parents), part.rows_in, part.rows, part.rejects)
    extra = {**part.extra, **({"kernels": kernels} if kernels else {})}
    return store.commit(
        dataset, stage, version, [rec], config=config, parents=parents, code_version=code, files=part.files, extra=extra
    ), True
