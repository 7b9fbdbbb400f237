"""Verify a store and repair what is damaged: the ``aot verify`` / ``aot repair`` commands and
the ``verify`` / ``repair`` flows (a nightly run can verify before it builds on yesterday's data).

Verification reads every committed version's manifest (its own checksum) and every part, reject
part and file it references (size and sha256), and optionally decodes every image. Repair
recomputes the damaged shards of a bootstrap stage's version from its recorded input, with the
code and kernels that made it (its version id proves them the same), and checks the rebuilt parts
against the manifest's sha256: the bytes come back identical, or the repair says why it cannot.
"""

from __future__ import annotations

import dataclasses
import posixpath

from config import config_from_dict
from stages.base import STAGES, StageError
from storage import DamagedVersion, Manifest, ShardStore, StorageError
from storage.store import MANIFEST, MANIFEST_COPY, SHARDS_DIR, ShardRecord, parse_manifest


def verify_store(store: ShardStore, versions: list[str] | None = None, images: bool = False) -> dict[str, list[str]]:
    """{version folder URL: problems} for the named versions (all committed ones by default);
    a version that verifies maps to []."""
    if versions:
        folders = []
        for v in versions:
            found = [f for f in store.version_folders() if posixpath.basename(f) == v]
            if not found:
                raise StorageError(f"no version {v!r} under {store.root_url} (aot ls lists them)")
            folders += found
    else:
        folders = [f for f in store.version_folders() if store.fs.exists(posixpath.join(f, MANIFEST))]
    return {store.url(f): store.verify_folder(f, images) for f in sorted(folders)}


def _folder(store: ShardStore, version: str) -> str:
    found = [f for f in store.version_folders() if posixpath.basename(f) == version]
    if not found:
        raise StorageError(f"no version {version!r} under {store.root_url} (aot ls lists them)")
    return found[0]


def _restore_manifest(store: ShardStore, vpath: str) -> Manifest:
    """The version's manifest; a damaged one is restored from its copy under ``_shards/``."""
    try:
        return parse_manifest(store.fs.cat_file(posixpath.join(vpath, MANIFEST)), store.url(vpath))
    except (DamagedVersion, FileNotFoundError) as exc:
        reason = exc.reason if isinstance(exc, DamagedVersion) else "manifest.json is missing"
        try:
            raw = store.fs.cat_file(posixpath.join(vpath, MANIFEST_COPY))
            m = parse_manifest(raw, store.url(vpath))
        except (DamagedVersion, FileNotFoundError):
            raise StorageError(
                f"{store.url(vpath)}: {reason}, and its copy ({MANIFEST_COPY}) does not verify "
                "either: delete the folder and rerun the command that made it"
            ) from None
        store._write_bytes(posixpath.join(vpath, MANIFEST), raw)
        return m


def pipeline_config_of(store: ShardStore, m: Manifest):
    """The config a bootstrap version was made with: its stage's recorded share, the dataset, and
    the source settings of its lineage (a warmed defender learns the run's world)."""
    data = {k: v for k, v in m.config.items() if k != "kernels"}
    anc = m
    while anc.stage != "source" and anc.parents:
        anc = store.manifest(anc.parents[0])
    if anc.stage == "source" and "source" in anc.config:
        data.setdefault("source", anc.config["source"])
    cfg = config_from_dict(data)
    return dataclasses.replace(cfg, dataset=m.dataset)


def repair_version(store: ShardStore, version: str) -> dict:
    """Recompute the damaged shards of a bootstrap stage's version (see the module docstring).
    Returns {"version", "restored_manifest", "shards": [indices rebuilt]}."""
    from stages.runner import plan, run_shard

    vpath = _folder(store, version)
    for f in store.fs.find(vpath):  # a torn temporary file was never part of the version
        if ".tmp-" in posixpath.basename(f):
            store.fs.rm(f)
    problems = store.verify_folder(vpath)
    manifest_damaged = any("manifest.json" in p for p in problems)
    m = _restore_manifest(store, vpath)
    if m.stage not in STAGES or m.stage == "source" and "records" in (m.extra or {}):
        damaged = store.verify_folder(vpath)
        if damaged:
            raise StageError(
                f"{version} is a {m.stage} version written in one piece (a trainer's checkpoint, an "
                f"evaluation or an import): it cannot be rebuilt shard by shard ({damaged[0]}); delete "
                f"its folder and rerun the command that made it"
            )
        return {"version": version, "restored_manifest": manifest_damaged, "shards": []}
    cfg = pipeline_config_of(store, m)
    input_version = m.parents[0] if m.parents else None
    if input_version:
        bad_input = store.verify_folder(_folder(store, input_version))
        if bad_input:
            raise StorageError(
                f"{version}'s input {input_version} is itself damaged ({bad_input[0]}): repair it "
                f"first (aot repair {input_version})"
            )
    p = plan(store, m.stage, cfg, input_version)
    if p.version != version:
        raise StageError(
            f"{version} was made by other code or on other kernels ({m.code_version}, "
            f"{m.config.get('kernels', 'exact stage')}) than this checkout runs: repair it there, or "
            "delete its folder and rerun the command that made it"
        )
    rebuilt = []
    for shard, data_ref, rej_ref in zip(p.shards, m.parts, m.rejects):
        record = ShardRecord(shard.index, shard.input_key, 0, data_ref, rej_ref)
        if store.record_intact(m.dataset, m.stage, version, record):
            continue
        store.fs.rm(posixpath.join(vpath, SHARDS_DIR, f"shard-{shard.index:05d}.json"))
        new, _ = run_shard(store, p, shard, cfg)
        if (new.data.sha256, new.rejects.sha256) != (data_ref.sha256, rej_ref.sha256):
            raise StorageError(
                f"{version} shard {shard.index} rebuilt to other bytes than it had: the input or the "
                "kernels differ from the run that made it; delete the folder and rerun the command"
            )
        rebuilt.append(shard.index)
    left = store.verify_folder(vpath)
    if left:
        raise StorageError(f"{version} still does not verify after the repair: {left[0]}")
    return {"version": version, "restored_manifest": manifest_damaged, "shards": rebuilt}
