"""The ``aot`` command line, and ``load_version``: a version as a Hugging Face dataset."""

from __future__ import annotations


def load_version(root: str, version: str, kind: str = "data", storage_options: dict | None = None):
    """Version ``version`` under ``root`` (a folder or any fsspec URL) as a ``datasets.Dataset``
    (``kind="rejects"``: its reject rows): exactly the parts its manifest lists, each checked
    against its size and sha256 before it is read (a missing, truncated or changed part is an
    error naming it, never fewer rows), images decoded to PIL by the ``datasets.Image`` feature.
    A version with no rows gives an empty dataset with its columns."""
    import datasets
    import pyarrow as pa

    from storage import ShardStore

    store = ShardStore(root, storage_options)
    m = store.manifest(version)
    refs = m.parts if kind == "data" else m.rejects
    frames = [store.read_part(m, ref) for ref in refs]  # verified
    tables = [f.to_arrow() for f in frames]
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    features = _features(store, m, refs)
    if features is not None:
        table = table.cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features) if features is not None else None)


def _features(store, m, refs):
    """The ``datasets`` features the store wrote into the parts' Parquet metadata (image columns
    declared as ``datasets.Image``), read from the first part."""
    import io
    import json

    import datasets
    import pyarrow.parquet as pq

    if not refs:
        return None
    raw = store.fs.cat_file(store.part_path(m, refs[0]))
    meta = pq.read_schema(io.BytesIO(raw)).metadata or {}
    if b"huggingface" not in meta:
        return None
    return datasets.Features.from_dict(json.loads(meta[b"huggingface"])["info"]["features"])
