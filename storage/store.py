"""The versioned shard store.

A *version* is one stage's output: Parquet parts, reject parts, per-shard records and a
``manifest.json``. The manifest is written last; a version without one does not exist for any
reader, so a crashed writer leaves only unreferenced files that the next run overwrites (same
version id, same part names) or ``gc`` removes.

Each shard is written as ``part-NNNNN.parquet`` + ``rejects-NNNNN.parquet`` and then
``_shards/shard-NNNNN.json`` (its record: input key, row counts, sha256 of both parts). The
record is the shard's commit point: a rerun skips shards whose record matches the input key
and whose parts still hash to the recorded sha256, and recomputes the rest.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import posixpath
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.hashing import sha256_bytes

MANIFEST = "manifest.json"
README = "README.md"
SHARDS_DIR = "_shards"
RESERVED_PREFIX = "_"  # top-level names under ROOT starting with "_" are not datasets (_prefect)


class StorageError(RuntimeError):
    """A problem with the store itself (layout, integrity), not with one row of data."""


class VersionNotFound(StorageError):
    pass


@dataclass(frozen=True)
class PartRef:
    path: str  # relative to the version folder
    rows: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PartRef":
        return cls(path=d["path"], rows=int(d["rows"]), sha256=d["sha256"])


@dataclass(frozen=True)
class ShardRecord:
    """What one finished shard wrote. Small and JSON-serializable (it is also the task result)."""

    index: int
    input_key: str
    rows_in: int
    data: PartRef
    rejects: PartRef
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "input_key": self.input_key,
            "rows_in": self.rows_in,
            "data": self.data.to_dict(),
            "rejects": self.rejects.to_dict(),
            "reasons": dict(self.reasons),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        return cls(
            index=int(d["index"]),
            input_key=d["input_key"],
            rows_in=int(d["rows_in"]),
            data=PartRef.from_dict(d["data"]),
            rejects=PartRef.from_dict(d["rejects"]),
            reasons={k: int(v) for k, v in d.get("reasons", {}).items()},
        )


@dataclass
class Manifest:
    version: str
    dataset: str
    stage: str
    created: str
    code_version: str
    config: dict
    parents: list[str]
    parts: list[PartRef]
    rejects: list[PartRef]
    rows_in: int
    rows: int
    reject_rows: int
    reasons: dict[str, int]
    schema: dict[str, str]
    extra: dict = field(default_factory=dict)
    files: list[PartRef] = field(default_factory=list)  # other files of the version (checkpoints)
    uri: str = ""  # full URL of the version folder (filled in when read)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = [p.to_dict() for p in self.parts]
        d["rejects"] = [p.to_dict() for p in self.rejects]
        d["files"] = [p.to_dict() for p in self.files]
        d.pop("uri")
        return d

    @classmethod
    def from_dict(cls, d: dict, uri: str = "") -> "Manifest":
        return cls(
            version=d["version"],
            dataset=d["dataset"],
            stage=d["stage"],
            created=d["created"],
            code_version=d["code_version"],
            config=d["config"],
            parents=list(d["parents"]),
            parts=[PartRef.from_dict(p) for p in d["parts"]],
            rejects=[PartRef.from_dict(p) for p in d["rejects"]],
            rows_in=int(d["rows_in"]),
            rows=int(d["rows"]),
            reject_rows=int(d["reject_rows"]),
            reasons={k: int(v) for k, v in d["reasons"].items()},
            schema=dict(d["schema"]),
            extra=dict(d.get("extra", {})),
            files=[PartRef.from_dict(p) for p in d.get("files", [])],
            uri=uri,
        )


def _is_image_struct(dtype: pa.DataType) -> bool:
    if not pa.types.is_struct(dtype) or dtype.num_fields != 2:
        return False
    names = {dtype.field(i).name for i in range(dtype.num_fields)}
    return names == {"bytes", "path"}


_HF_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def parquet_bytes(df: pl.DataFrame) -> bytes:
    """Serialize a frame to Parquet with Hugging Face ``datasets`` feature metadata.

    Image columns (``struct<bytes, path>``) are declared as ``datasets.Image()`` so
    ``load_dataset("parquet", ...)`` decodes them to PIL images.
    """
    from polars import CompatLevel  # large_* arrow types rather than *_view: datasets reads them

    table = df.to_arrow(compat_level=CompatLevel.oldest())
    image_cols = [f.name for f in table.schema if _is_image_struct(f.type)]
    for name in image_cols:
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, name, table.column(name).cast(_HF_IMAGE_TYPE))
    metadata = dict(table.schema.metadata or {})
    try:
        metadata[b"huggingface"] = json.dumps(_hf_features(table.schema, image_cols)).encode()
    except ImportError:  # datasets absent (a bare GPU box): still valid Parquet, only without the features hint
        warnings.warn(
            "datasets is not installed: Parquet parts are written without Hugging Face features metadata", stacklevel=2
        )
    table = table.replace_schema_metadata(metadata)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _hf_features(schema: pa.Schema, image_cols: list[str]) -> dict:
    from datasets import Features, Image  # imported lazily: ~1 s, needed only when writing

    features = Features.from_arrow_schema(schema.remove_metadata())
    for name in image_cols:
        features[name] = Image()
    return {"info": {"features": features.to_dict()}}


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
        return float(value)
    return 0.0


class ShardStore:
    """Versioned Parquet shards under one root URL (``file://``, ``s3://``, any fsspec URL)."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root_url = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # ----------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, path: str) -> str:
        """Full URL of a store path (what a reader outside this process needs)."""
        return self.fs.unstrip_protocol(path)

    def version_path(self, dataset: str, stage: str, version: str) -> str:
        for name, value in (("dataset", dataset), ("stage", stage), ("version", version)):
            if not value or "/" in value or value.startswith(RESERVED_PREFIX) or value in (".", ".."):
                raise StorageError(f"invalid {name} name {value!r}: no '/', not empty, not starting with '_'")
        return self.path(dataset, stage, version)

    # --------------------------------------------------------------- writing
    def _write_bytes(self, path: str, data: bytes) -> None:
        if self.is_local:
            # Local files: write beside and rename, so a crash never leaves a torn file in place.
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{time.time_ns()}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:
            # Object stores: a single PUT is atomic; the object appears whole or not at all.
            self.fs.pipe_file(path, data)

    def write_part(self, dataset: str, stage: str, version: str, name: str, df: pl.DataFrame) -> PartRef:
        data = parquet_bytes(df)
        self._write_bytes(posixpath.join(self.version_path(dataset, stage, version), name), data)
        return PartRef(path=name, rows=df.height, sha256=sha256_bytes(data))

    def write_shard(
        self,
        dataset: str,
        stage: str,
        version: str,
        index: int,
        input_key: str,
        rows_in: int,
        data: pl.DataFrame,
        rejects: pl.DataFrame,
    ) -> ShardRecord:
        """Write one shard's parts, then its record (the shard's commit point)."""
        data_ref = self.write_part(dataset, stage, version, f"part-{index:05d}.parquet", data)
        rej_ref = self.write_part(dataset, stage, version, f"rejects-{index:05d}.parquet", rejects)
        reasons: dict[str, int] = {}
        if rejects.height and "reason" in rejects.columns:
            for reason, n in rejects.group_by("reason").len().iter_rows():
                reasons[str(reason)] = int(n)
        record = ShardRecord(index, input_key, rows_in, data_ref, rej_ref, dict(sorted(reasons.items())))
        rec_path = posixpath.join(self.version_path(dataset, stage, version), SHARDS_DIR, f"shard-{index:05d}.json")
        self._write_bytes(rec_path, json.dumps(record.to_dict(), indent=1).encode())
        return record

    def finished_shard(self, dataset: str, stage: str, version: str, index: int, input_key: str) -> ShardRecord | None:
        """The shard's record if it finished for this input and its parts are intact, else None."""
        vpath = self.version_path(dataset, stage, version)
        rec_path = posixpath.join(vpath, SHARDS_DIR, f"shard-{index:05d}.json")
        try:
            record = ShardRecord.from_dict(json.loads(self.fs.cat_file(rec_path)))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError):
            return None  # a torn or foreign record: recompute the shard
        if record.input_key != input_key:
            return None
        for ref in (record.data, record.rejects):
            try:
                if sha256_bytes(self.fs.cat_file(posixpath.join(vpath, ref.path))) != ref.sha256:
                    return None
            except FileNotFoundError:
                return None
        return record

    def commit(
        self,
        dataset: str,
        stage: str,
        version: str,
        records: Iterable[ShardRecord],
        *,
        config: dict,
        parents: list[str],
        code_version: str,
        extra: dict | None = None,
        readme: str | None = None,
        files: list[PartRef] | None = None,
    ) -> Manifest:
        """Make a version visible by writing its manifest (last)."""
        records = sorted(records, key=lambda r: r.index)
        vpath = self.version_path(dataset, stage, version)
        indices = [r.index for r in records]
        if indices != list(range(len(records))):
            raise StorageError(f"cannot commit {version}: shard indices {indices} are not 0..{len(records) - 1}")
        for r in records:
            for ref in (r.data, r.rejects):
                if not self.fs.exists(posixpath.join(vpath, ref.path)):
                    raise StorageError(
                        f"cannot commit {version}: shard {r.index} refers to missing part {ref.path} "
                        "(a cached task result outlived its files; rerun with --refresh-cache)"
                    )
        schema: dict[str, str] = {}
        if records:
            with self.fs.open(posixpath.join(vpath, records[0].data.path), "rb") as f:
                schema = {fld.name: str(fld.type) for fld in pq.read_schema(f).remove_metadata()}
        reasons: dict[str, int] = {}
        for r in records:
            for k, v in r.reasons.items():
                reasons[k] = reasons.get(k, 0) + v
        manifest = Manifest(
            version=version,
            dataset=dataset,
            stage=stage,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            code_version=code_version,
            config=config,
            parents=list(parents),
            parts=[r.data for r in records],
            rejects=[r.rejects for r in records],
            rows_in=sum(r.rows_in for r in records),
            rows=sum(r.data.rows for r in records),
            reject_rows=sum(r.rejects.rows for r in records),
            reasons=dict(sorted(reasons.items())),
            schema=schema,
            extra=dict(extra or {}),
            files=list(files or []),
            uri=self.url(vpath),
        )
        if readme is not None:
            self._write_bytes(posixpath.join(vpath, README), readme.encode())
        self._write_bytes(posixpath.join(vpath, MANIFEST), json.dumps(manifest.to_dict(), indent=1).encode())
        return manifest

    def put_folder(self, dataset: str, stage: str, version: str, local: str, prefix: str = "") -> list[PartRef]:
        """Upload every file of a local folder into the version folder (under ``prefix``)."""
        import os

        refs = []
        vpath = self.version_path(dataset, stage, version)
        for dirpath, _, names in sorted(os.walk(local)):
            for name in sorted(names):
                full = os.path.join(dirpath, name)
                rel = (
                    posixpath.join(prefix, os.path.relpath(full, local).replace(os.sep, "/"))
                    if prefix
                    else os.path.relpath(full, local).replace(os.sep, "/")
                )
                with open(full, "rb") as f:
                    data = f.read()
                self._write_bytes(posixpath.join(vpath, rel), data)
                refs.append(PartRef(rel, 0, sha256_bytes(data)))
        return refs

    def get_folder(self, dataset: str, stage: str, version: str, prefix: str, local: str) -> bool:
        """Download ``prefix`` of a version folder (committed or not) into a local folder."""
        import os

        src = posixpath.join(self.version_path(dataset, stage, version), prefix)
        if not self.fs.exists(src):
            return False
        for path in self.fs.find(src):
            rel = posixpath.relpath(path, src)
            dest = os.path.join(local, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(self.fs.cat_file(path))
        return True

    def fetch_files(self, manifest: Manifest, local: str) -> str:
        """Download a committed version's files (verified against their sha256) into a local folder."""
        import os

        for ref in manifest.files:
            raw = self.fs.cat_file(self.part_path(manifest, ref))
            if sha256_bytes(raw) != ref.sha256:
                raise StorageError(f"file {ref.path} of {manifest.version} does not match its sha256")
            dest = os.path.join(local, *ref.path.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(raw)
        return local

    # --------------------------------------------------------------- reading
    def _read_manifest(self, mpath: str) -> Manifest:
        return Manifest.from_dict(json.loads(self.fs.cat_file(mpath)), uri=self.url(posixpath.dirname(mpath)))

    def manifest_at(self, dataset: str, stage: str, version: str) -> Manifest | None:
        vpath = self.version_path(dataset, stage, version)
        try:
            raw = self.fs.cat_file(posixpath.join(vpath, MANIFEST))
        except FileNotFoundError:
            return None
        return Manifest.from_dict(json.loads(raw), uri=self.url(vpath))

    def versions(self, dataset: str | None = None, stage: str | None = None) -> list[Manifest]:
        """Every committed version (optionally of one dataset/stage), oldest first."""
        pattern = self.path(dataset or "*", stage or "*", "*", MANIFEST)
        out = []
        for mpath in self.fs.glob(pattern):
            rel = posixpath.relpath(mpath, self.root).split("/")
            if rel[0].startswith(RESERVED_PREFIX):
                continue
            out.append(self._read_manifest(mpath))
        return sorted(out, key=lambda m: (m.created, m.version))

    def manifest(self, version: str) -> Manifest:
        """Find a committed version by id (ids are content hashes, unique across the root)."""
        found = []
        if version and not any(c in version for c in "*?[]/"):  # a glob on this id only, not every manifest
            for mpath in self.fs.glob(self.path("*", "*", version, MANIFEST)):
                if not posixpath.relpath(mpath, self.root).startswith(RESERVED_PREFIX):
                    found.append(self._read_manifest(mpath))
        if not found:
            raise VersionNotFound(
                f"no committed version {version!r} under {self.root_url} "
                f"(list them with `aot ls --root {self.root_url}`)"
            )
        return found[0]

    def latest(self, dataset: str, stage: str) -> Manifest | None:
        found = self.versions(dataset, stage)
        return found[-1] if found else None

    def part_path(self, manifest: Manifest, ref: PartRef) -> str:
        return posixpath.join(self.version_path(manifest.dataset, manifest.stage, manifest.version), ref.path)

    def read_part(self, manifest: Manifest, ref: PartRef, verify: bool = True) -> pl.DataFrame:
        return self.read_version_part(manifest.dataset, manifest.stage, manifest.version, ref, verify)

    def read_version_part(
        self, dataset: str, stage: str, version: str, ref: PartRef, verify: bool = True
    ) -> pl.DataFrame:
        """One part of a version, committed or not yet (a finished shard of a running stage)."""
        raw = self.fs.cat_file(posixpath.join(self.version_path(dataset, stage, version), ref.path))
        if verify and sha256_bytes(raw) != ref.sha256:
            raise StorageError(f"part {ref.path} of {version} does not match its sha256: the file changed")
        return pl.read_parquet(io.BytesIO(raw))

    def read(self, version: str | Manifest, kind: str = "data") -> pl.DataFrame:
        """All rows of a version (``kind="data"``) or its rejects (``kind="rejects"``)."""
        manifest = version if isinstance(version, Manifest) else self.manifest(version)
        refs = manifest.parts if kind == "data" else manifest.rejects
        frames = [self.read_part(manifest, ref) for ref in refs]
        frames = [f for f in frames if f.height] or frames[:1]
        return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()

    def data_files(self, version: str | Manifest) -> list[str]:
        """Full URLs of the data parts, for ``datasets.load_dataset("parquet", data_files=...)``."""
        manifest = version if isinstance(version, Manifest) else self.manifest(version)
        return [self.url(self.part_path(manifest, ref)) for ref in manifest.parts]

    # -------------------------------------------------------------------- gc
    def gc(self, min_age_seconds: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove what no manifest references: uncommitted version folders and stray files.

        Folders younger than ``min_age_seconds`` are left alone: a writer may still be at work.
        Returns the removed paths (as URLs).
        """
        now = time.time()
        removed: list[str] = []
        for vpath in self.fs.glob(self.path("*", "*", "*")):
            rel = posixpath.relpath(vpath, self.root).split("/")
            if rel[0].startswith(RESERVED_PREFIX) or not self.fs.isdir(vpath):
                continue
            files = self.fs.find(vpath, detail=True)
            newest = max((_mtime(i) for i in files.values()), default=0.0)
            if now - newest < min_age_seconds:
                continue
            mpath = posixpath.join(vpath, MANIFEST)
            if mpath not in files and not self.fs.exists(mpath):
                removed.append(self.url(vpath))
                if not dry_run:
                    self.fs.rm(vpath, recursive=True)
                continue
            manifest = Manifest.from_dict(json.loads(self.fs.cat_file(mpath)))
            keep = (
                {MANIFEST, README}
                | {p.path for p in manifest.parts}
                | {p.path for p in manifest.rejects}
                | {p.path for p in manifest.files}
            )
            for fpath in files:
                relf = posixpath.relpath(fpath, vpath)
                if relf in keep or relf.startswith(SHARDS_DIR + "/") and ".tmp-" not in relf:
                    continue
                removed.append(self.url(fpath))
                if not dry_run:
                    self.fs.rm(fpath)
        return removed
