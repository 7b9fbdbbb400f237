"""The versioned shard store.

A *version* is one stage's output: Parquet parts, reject parts, per-shard records and a
``manifest.json``. The manifest is written last; a version without one does not exist for any
reader, so a crashed writer leaves only unreferenced files that the next run overwrites (same
version id, same part names) or ``gc`` removes.

Each shard is written as ``part-NNNNN.parquet`` + ``rejects-NNNNN.parquet`` and then
``_shards/shard-NNNNN.json`` (its record: input key, row counts, size and sha256 of both parts).
The record is the shard's commit point: a rerun skips shards whose record matches the input key
and whose parts still hash to the recorded sha256, and recomputes the rest.

Nothing damaged is trusted: every part is checked against its size and sha256 when read; a
version is committed only once every part verifies; a manifest carries a checksum of its own
content (and a copy under ``_shards/``), so a changed or torn manifest is that version's damage,
reported with its path, while the rest of the root works. Files are written beside the root
(``ROOT/_tmp/``) and renamed into place: a failed write leaves no torn file in a version.
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import os
import posixpath
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.hashing import canonical_json, sha256_bytes

MANIFEST = "manifest.json"
README = "README.md"
SHARDS_DIR = "_shards"
MANIFEST_COPY = f"{SHARDS_DIR}/manifest.json"  # the manifest again: what `aot repair` restores a damaged one from
TMP_DIR = "_tmp"  # under ROOT: files are written here, then renamed into place
RESERVED_PREFIX = "_"  # top-level names under ROOT starting with "_" are not datasets (_prefect, _tmp)


class StorageError(RuntimeError):
    """A problem with the store itself (layout, integrity), not with one row of data."""


class VersionNotFound(StorageError):
    pass


class DamagedVersion(StorageError):
    """A committed version whose manifest or files no longer verify. Says which and how to fix it."""

    def __init__(self, where: str, reason: str, version: str | None = None):
        fix = f"aot repair {version}" if version else "aot verify --all, then aot repair VERSION"
        super().__init__(f"{where}: {reason} ({fix})")
        self.where, self.reason, self.version = where, reason, version


@dataclass(frozen=True)
class PartRef:
    path: str  # relative to the version folder
    rows: int
    sha256: str
    size: int | None = None  # bytes (None in manifests of earlier releases)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PartRef":
        size = d.get("size")
        return cls(path=d["path"], rows=int(d["rows"]), sha256=d["sha256"], size=None if size is None else int(size))

    def check(self, data: bytes) -> str | None:
        """Why ``data`` is not this part (a size or a content change), or None when it is."""
        if self.size is not None and len(data) != self.size:
            return f"{self.path} is {len(data)} bytes, not {self.size} (truncated or replaced)"
        if sha256_bytes(data) != self.sha256:
            return f"{self.path} does not match its sha256 (the file changed)"
        return None


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
        d["checksum"] = manifest_checksum(d)
        return d

    @classmethod
    def from_dict(cls, d: dict, uri: str = "") -> "Manifest":
        """A manifest from its JSON; raises ``DamagedVersion`` when its checksum (written by this
        release and later) does not match its content."""
        if "checksum" in d and d["checksum"] != manifest_checksum(d):
            raise DamagedVersion(
                uri or d.get("version", "a manifest"),
                "manifest.json does not match its checksum (the file changed)",
                d.get("version") if isinstance(d.get("version"), str) else None,
            )
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


def manifest_checksum(d: dict) -> str:
    """sha256 of a manifest's canonical JSON, the checksum itself left out."""
    return sha256_bytes(canonical_json({k: v for k, v in d.items() if k != "checksum"}).encode())


def parse_manifest(raw: bytes, uri: str) -> Manifest:
    """A manifest file's content, or ``DamagedVersion`` naming the file and what is wrong with it."""
    version = posixpath.basename(uri.rstrip("/")) or None
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return Manifest.from_dict(d, uri=uri)
    except DamagedVersion as exc:
        raise DamagedVersion(f"{uri}/{MANIFEST}", exc.reason, version) from None
    except (ValueError, KeyError, TypeError) as exc:  # torn or edited: not JSON, or fields missing
        raise DamagedVersion(
            f"{uri}/{MANIFEST}", f"manifest.json is unreadable ({type(exc).__name__}: {exc})", version
        ) from None


# OS errors that no retry can fix: the disk is full, the root is read-only or not ours.
PERMANENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
}


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno == errno.EROFS:
        return "the filesystem is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"{type(exc).__name__}: {exc}"


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
    if table.num_rows:
        pq.write_table(table, buf, compression="zstd")
    else:
        # An empty shard's part: the schema and no row group. pyarrow would write one row group of
        # 0 rows, and datasets' Parquet reader then fails the whole load ("BatchSize must be
        # greater than 0"): a version with one empty shard could not be loaded by a glob.
        pq.ParquetWriter(buf, table.schema, compression="zstd").close()
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
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.root_url, **self.storage_options)
        except (ValueError, ImportError) as exc:  # an unknown scheme, or one whose package is missing
            raise StorageError(
                f"root {root!r}: {exc} (give a folder, s3://bucket/prefix or another fsspec URL)"
            ) from None
        self.root = self.root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def check_root(self) -> None:
        """Fail now, in one line, where writing under the root cannot work: a folder that cannot be
        made or written (read-only, no permission, a file in the way), a bucket that does not exist.
        A probe file is written and removed; nothing else is created (no bucket)."""
        probe = self.path(TMP_DIR, f"probe-{os.getpid()}-{time.time_ns()}")
        try:
            if not self.is_local:
                bucket = self.root.split("/")[0]
                if not self.fs.exists(bucket):
                    raise StorageError(
                        f"root {self.root_url}: bucket {bucket!r} does not exist (create it first; "
                        "aot never creates buckets)"
                    )
            else:
                self.fs.makedirs(self.path(TMP_DIR), exist_ok=True)
            self.fs.pipe_file(probe, b"\0" * 4096)  # some bytes: a full disk still creates empty files
            self.fs.rm(probe)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"root {self.root_url} is not writable: {_os_reason(exc)}") from None

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
            # Local files: written under ROOT/_tmp (the same filesystem), then renamed into place:
            # a crash or a full disk never leaves a torn file inside a version, and a failed write
            # removes its temporary file.
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self.fs.makedirs(self.path(TMP_DIR), exist_ok=True)
            tmp = self.path(TMP_DIR, f"{posixpath.basename(path)}.{os.getpid()}-{time.time_ns()}")
            try:
                with self.fs.open(tmp, "wb") as f:
                    f.write(data)
                self.fs.mv(tmp, path)
            except BaseException:
                try:
                    self.fs.rm(tmp)
                except OSError:
                    pass
                raise
        else:
            # Object stores: a single PUT is atomic; the object appears whole or not at all.
            self.fs.pipe_file(path, data)

    def write_part(self, dataset: str, stage: str, version: str, name: str, df: pl.DataFrame) -> PartRef:
        data = parquet_bytes(df)
        self._write_bytes(posixpath.join(self.version_path(dataset, stage, version), name), data)
        return PartRef(path=name, rows=df.height, sha256=sha256_bytes(data), size=len(data))

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
        return record if self.record_intact(dataset, stage, version, record) else None

    def record_intact(self, dataset: str, stage: str, version: str, record: ShardRecord) -> bool:
        """Both parts of a finished shard are there and match their size and sha256 (a record
        served from a cache is trusted only after this)."""
        vpath = self.version_path(dataset, stage, version)
        for ref in (record.data, record.rejects):
            try:
                if ref.check(self.fs.cat_file(posixpath.join(vpath, ref.path))) is not None:
                    return False
            except FileNotFoundError:
                return False
        return True

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
        for r in records:  # nothing damaged is ever committed: every part verifies first
            for ref in (r.data, r.rejects):
                try:
                    problem = ref.check(self.fs.cat_file(posixpath.join(vpath, ref.path)))
                except FileNotFoundError:
                    problem = f"{ref.path} is missing"
                if problem:
                    raise StorageError(
                        f"cannot commit {version}: shard {r.index}: {problem}; rerun the command to recompute it"
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
        text = json.dumps(manifest.to_dict(), indent=1).encode()
        self._write_bytes(posixpath.join(vpath, MANIFEST_COPY), text)
        self._write_bytes(posixpath.join(vpath, MANIFEST), text)  # last: the version exists from here on
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
                refs.append(PartRef(rel, 0, sha256_bytes(data), len(data)))
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

    def _file_bytes(self, manifest: Manifest, ref: PartRef) -> bytes:
        try:
            raw = self.fs.cat_file(self.part_path(manifest, ref))
        except FileNotFoundError:
            raise DamagedVersion(manifest.uri, f"file {ref.path} is missing", manifest.version) from None
        problem = ref.check(raw)
        if problem:
            raise DamagedVersion(manifest.uri, problem, manifest.version)
        return raw

    def read_file(self, manifest: Manifest, path: str) -> bytes | None:
        """One of a committed version's files (verified against its sha256), or None if it has no
        file at ``path``: a plot or a table without downloading the checkpoint beside it."""
        ref = next((f for f in manifest.files if f.path == path), None)
        return None if ref is None else self._file_bytes(manifest, ref)

    def fetch_files(self, manifest: Manifest, local: str) -> str:
        """Download a committed version's files (verified against their sha256) into a local folder."""
        import os

        for ref in manifest.files:
            raw = self._file_bytes(manifest, ref)
            dest = os.path.join(local, *ref.path.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(raw)
        return local

    # --------------------------------------------------------------- reading
    def _read_manifest(self, mpath: str) -> Manifest:
        return parse_manifest(self.fs.cat_file(mpath), self.url(posixpath.dirname(mpath)))

    def manifest_at(self, dataset: str, stage: str, version: str) -> Manifest | None:
        """The committed version, None if it does not exist, ``DamagedVersion`` if its manifest
        does not verify."""
        vpath = self.version_path(dataset, stage, version)
        try:
            raw = self.fs.cat_file(posixpath.join(vpath, MANIFEST))
        except FileNotFoundError:
            return None
        return parse_manifest(raw, self.url(vpath))

    def versions(
        self, dataset: str | None = None, stage: str | None = None, damaged: list | None = None
    ) -> list[Manifest]:
        """Every committed version (optionally of one dataset/stage), oldest first. A version
        whose manifest does not verify is left out, and added to ``damaged`` (if given) as a
        ``DamagedVersion``: one broken manifest never breaks the listing of the rest."""
        pattern = self.path(dataset or "*", stage or "*", "*", MANIFEST)
        out = []
        for mpath in self.fs.glob(pattern):
            rel = posixpath.relpath(mpath, self.root).split("/")
            if rel[0].startswith(RESERVED_PREFIX):
                continue
            try:
                out.append(self._read_manifest(mpath))
            except DamagedVersion as exc:
                if damaged is not None:
                    damaged.append(exc)
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
        vpath = self.version_path(dataset, stage, version)
        try:
            raw = self.fs.cat_file(posixpath.join(vpath, ref.path))
        except FileNotFoundError:
            raise DamagedVersion(self.url(vpath), f"part {ref.path} is missing", version) from None
        problem = ref.check(raw) if verify else None
        if problem:
            raise DamagedVersion(self.url(vpath), f"part {problem}", version)
        return pl.read_parquet(io.BytesIO(raw))

    def read(self, version: str | Manifest, kind: str = "data") -> pl.DataFrame:
        """All rows of a version (``kind="data"``) or its rejects (``kind="rejects"``)."""
        manifest = version if isinstance(version, Manifest) else self.manifest(version)
        refs = manifest.parts if kind == "data" else manifest.rejects
        frames = [self.read_part(manifest, ref) for ref in refs]
        frames = [f for f in frames if f.height] or frames[:1]
        return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()

    # ---------------------------------------------------------------- verify
    def version_folders(self) -> list[str]:
        """Every version folder under the root, committed or not."""
        return [
            v
            for v in self.fs.glob(self.path("*", "*", "*"))
            if not posixpath.relpath(v, self.root).startswith(RESERVED_PREFIX) and self.fs.isdir(v)
        ]

    def verify_folder(self, vpath: str, images: bool = False) -> list[str]:
        """What is wrong with one committed version folder: its manifest (unreadable, checksum),
        every part, reject part and file (missing, size, sha256), and with ``images`` every image
        cell that does not decode; stray temporary files inside it. Empty when it verifies."""
        from storage.images import ImageDecodeError, decode_image

        try:
            m = parse_manifest(self.fs.cat_file(posixpath.join(vpath, MANIFEST)), self.url(vpath))
        except FileNotFoundError:
            return []  # not committed: nothing is promised yet
        except DamagedVersion as exc:
            return [exc.reason]
        problems = []
        for kind, refs in (("part", m.parts), ("rejects part", m.rejects), ("file", m.files)):
            for ref in refs:
                try:
                    raw = self.fs.cat_file(posixpath.join(vpath, ref.path))
                except FileNotFoundError:
                    problems.append(f"{kind} {ref.path} is missing")
                    continue
                problem = ref.check(raw)
                if problem:
                    problems.append(f"{kind} {problem}")
                elif images and ref.path.endswith(".parquet"):
                    df = pl.read_parquet(io.BytesIO(raw))
                    for col, dtype in df.schema.items():
                        if dtype == pl.Struct({"bytes": pl.Binary, "path": pl.String}):
                            for i, cell in enumerate(df[col].to_list()):
                                try:
                                    if cell is not None:
                                        decode_image(cell)
                                except ImageDecodeError as exc:
                                    problems.append(f"{ref.path} row {i} {col}: {exc}")
        problems += [
            f"stray temporary file {posixpath.relpath(f, vpath)}"
            for f in self.fs.find(vpath)
            if ".tmp-" in posixpath.basename(f)
        ]
        return problems

    def data_files(self, version: str | Manifest) -> list[str]:
        """Full URLs of the data parts, for ``datasets.load_dataset("parquet", data_files=...)``."""
        manifest = version if isinstance(version, Manifest) else self.manifest(version)
        return [self.url(self.part_path(manifest, ref)) for ref in manifest.parts]

    # -------------------------------------------------------------------- gc
    def gc_plan(self, min_age_seconds: float = 3600.0, drop_unfinished: bool = False) -> tuple[list[str], list[str]]:
        """(what ``gc`` removes, what it leaves and why), as store paths.

        Removed: temporary files under ``_tmp``; in a committed version, files its manifest does
        not reference; in an uncommitted version, files no finished shard's record refers to (a
        torn part, a temporary file), or with ``drop_unfinished`` the whole folder. Finished shards
        of an uncommitted version are kept by default: a resumed run reuses them. Anything written
        within ``min_age_seconds`` is left alone (a writer may be at work) and listed as skipped."""
        now = time.time()
        remove: list[str] = []
        skipped: list[str] = []

        def young(info: dict) -> bool:
            return now - _mtime(info) < min_age_seconds

        tmp = self.path(TMP_DIR)
        if self.fs.exists(tmp):
            for f, info in self.fs.find(tmp, detail=True).items():
                (skipped.append(f"{f} (written {now - _mtime(info):.0f} s ago)") if young(info) else remove.append(f))
        for vpath in self.version_folders():
            files = self.fs.find(vpath, detail=True)
            newest = max((_mtime(i) for i in files.values()), default=0.0)
            if now - newest < min_age_seconds:
                skipped.append(f"{vpath} (written {now - newest:.0f} s ago: a writer may be at work)")
                continue
            mpath = posixpath.join(vpath, MANIFEST)
            if mpath in files:
                try:
                    m = parse_manifest(self.fs.cat_file(mpath), self.url(vpath))
                except DamagedVersion as exc:
                    skipped.append(f"{vpath} (damaged: {exc.reason}; aot repair first)")
                    continue
                keep = {MANIFEST, README} | {p.path for p in m.parts + m.rejects + m.files}
                keep |= {r for r in (posixpath.relpath(f, vpath) for f in files) if r.startswith(SHARDS_DIR + "/")}
            elif drop_unfinished:
                remove.append(vpath)
                continue
            else:
                keep = set()
                for f in files:
                    rel = posixpath.relpath(f, vpath)
                    if rel.startswith(SHARDS_DIR + "/") and rel.endswith(".json"):
                        try:
                            rec = ShardRecord.from_dict(json.loads(self.fs.cat_file(f)))
                        except (ValueError, KeyError, TypeError):
                            continue
                        keep |= {rel, rec.data.path, rec.rejects.path}
                keep |= {r for r in (posixpath.relpath(f, vpath) for f in files) if r.startswith("_work/")}
                if keep:
                    skipped.append(
                        f"{vpath} (uncommitted: {len([k for k in keep if k.endswith('.json')])} finished "
                        "shard(s) a rerun reuses; --drop-unfinished removes them)"
                    )
            for f in files:
                rel = posixpath.relpath(f, vpath)
                if rel not in keep or ".tmp-" in rel:
                    remove.append(f)
        return remove, skipped

    def gc(self, min_age_seconds: float = 3600.0, dry_run: bool = False, drop_unfinished: bool = False) -> list[str]:
        """Remove what ``gc_plan`` names; returns the removed paths as URLs."""
        remove, _ = self.gc_plan(min_age_seconds, drop_unfinished)
        if not dry_run:
            for path in remove:
                self.fs.rm(path, recursive=True)
        return [self.url(p) for p in remove]
