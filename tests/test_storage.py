"""The versioned shard store on file:// and s3:// (a real S3-protocol server on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
from PIL import Image

from storage import IMAGE_DTYPE, ShardStore, VersionNotFound, content_hash, decode_image, image_cell, sha256_bytes
from storage.images import ImageDecodeError

SCHEMA = {"id": pl.String, "n": pl.Int64, "boxes": pl.List(pl.List(pl.Float64)), "image": IMAGE_DTYPE}


def _frame(start: int, n: int) -> pl.DataFrame:
    rows = []
    for i in range(start, start + n):
        arr = np.full((8, 10, 3), i % 256, dtype=np.uint8)
        arr[0, 0] = (255, 0, i % 256)
        rows.append(
            {"id": f"r{i}", "n": i, "boxes": [[0.0, 1.0, 2.0, float(i)]], "image": image_cell(Image.fromarray(arr))}
        )
    return pl.DataFrame(rows, schema=SCHEMA)


def _empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema={"id": pl.String, "reason": pl.String})


def _write_version(store: ShardStore, version: str = "v1", shards: int = 2, per: int = 3):
    recs = []
    for i in range(shards):
        rej = pl.DataFrame({"id": [f"bad{i}"], "reason": ["too_small"]})
        recs.append(store.write_shard("ds", "stage", version, i, f"key{i}", per + 1, _frame(i * per, per), rej))
    return store.commit("ds", "stage", version, recs, config={"a": 1}, parents=["p0"], code_version="c1")


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return ShardStore(str(tmp_path / "root"))
    root, opts = request.getfixturevalue("s3_root")
    return ShardStore(root, opts)


def test_round_trip(store):
    m = _write_version(store)
    assert (m.rows_in, m.rows, m.reject_rows) == (8, 6, 2)
    assert m.reasons == {"too_small": 2}
    assert [p.path for p in m.parts] == ["part-00000.parquet", "part-00001.parquet"]
    back = store.read("v1")
    expected = pl.concat([_frame(0, 3), _frame(3, 3)])
    assert back.select("id", "n", "boxes").equals(expected.select("id", "n", "boxes"))
    assert back["image"].to_list() == expected["image"].to_list()  # PNG bytes identical
    assert store.read("v1", "rejects")["id"].to_list() == ["bad0", "bad1"]
    # Every part's recorded sha256 is the sha256 of the bytes in the store.
    for ref in m.parts:
        assert sha256_bytes(store.fs.cat_file(store.part_path(m, ref))) == ref.sha256
    assert [v.version for v in store.versions()] == ["v1"]
    assert store.latest("ds", "stage").version == "v1"
    assert store.manifest("v1").parents == ["p0"]
    assert store.data_files("v1")[0].startswith(store.root_url.split("://")[0] if "://" in store.root_url else "file")


def test_datasets_loads_a_version_with_decoded_images(tmp_path):
    import datasets

    store = ShardStore(str(tmp_path / "root"))
    _write_version(store)
    ds = datasets.load_dataset(
        "parquet", data_files=store.data_files("v1"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(ds) == 6
    img = ds[4]["image"]
    assert isinstance(img, Image.Image) and img.size == (10, 8)
    assert np.asarray(img)[0, 0].tolist() == [255, 0, 4]
    assert ds[4]["boxes"] == [[0.0, 1.0, 2.0, 4.0]]


def test_uncommitted_version_is_invisible_and_killed_writer_leaves_no_version(tmp_path):
    root = tmp_path / "root"
    # A writer process that finishes two shards and dies (SIGKILL-like exit) before the manifest.
    code = textwrap.dedent(f"""
        import os, polars as pl
        from storage import ShardStore
        s = ShardStore({str(root)!r})
        for i in range(2):
            rejects = pl.DataFrame(schema={{"id": pl.String, "reason": pl.String}})
            s.write_shard("ds", "stage", "v9", i, f"key{{i}}", 1, pl.DataFrame({{"x": [i]}}), rejects)
        os._exit(137)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True)
    assert proc.returncode == 137
    store = ShardStore(str(root))
    assert store.versions() == []
    with pytest.raises(VersionNotFound):
        store.manifest("v9")
    # Its finished shards are reusable by the next run of the same version...
    assert store.finished_shard("ds", "stage", "v9", 1, "key1") is not None
    # ...but not for another input.
    assert store.finished_shard("ds", "stage", "v9", 1, "other-input") is None
    # gc keeps its finished shards (a resumed run reuses them), and removes the folder only when asked.
    assert store.gc(min_age_seconds=3600) == [] and store.gc(min_age_seconds=0) == []
    removed = store.gc(min_age_seconds=0, drop_unfinished=True)
    assert len(removed) == 1 and removed[0].endswith("/ds/stage/v9")
    assert not store.fs.exists(store.path("ds", "stage", "v9"))


def test_finished_shard_detects_a_changed_part(store):
    _write_version(store, "v2", shards=1)
    assert store.finished_shard("ds", "stage", "v2", 0, "key0") is not None
    store.fs.pipe_file(store.path("ds", "stage", "v2", "part-00000.parquet"), b"garbage")
    assert store.finished_shard("ds", "stage", "v2", 0, "key0") is None


def test_gc_keeps_committed_parts_and_removes_strays(store):
    m = _write_version(store, "v3")
    stray = store.path("ds", "stage", "v3", "part-00007.parquet")
    store.fs.pipe_file(stray, b"left by a crashed writer")
    removed = store.gc(min_age_seconds=0)
    assert removed == [store.url(stray)]
    assert store.read(m).height == 6


def test_version_names_are_validated(tmp_path):
    store = ShardStore(str(tmp_path))
    with pytest.raises(Exception, match="invalid dataset"):
        store.version_path("_prefect", "s", "v")


def test_content_hash_is_order_independent_and_sensitive():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1.0}) != content_hash({"a": 1.0000001})
    assert len(content_hash({})) == 16


def test_decode_image_guards(tmp_path):
    with pytest.raises(ImageDecodeError, match="does not decode"):
        decode_image(b"not an image")
    big = image_cell(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image(big, max_pixels=9_999)
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(decode_image(image_cell(rgba))).tolist() == [[[255, 255, 255]] * 2] * 2


def test_an_empty_shards_part_loads_beside_the_others_with_datasets(tmp_path):
    """A shard that kept no row writes a part with the schema and no row group: pyarrow's default
    (one row group of 0 rows) makes datasets fail a whole glob load ("BatchSize must be greater
    than 0"). Read back, it is an empty frame with the same columns."""
    import io

    import datasets
    import pyarrow.parquet as pq

    from storage.store import parquet_bytes

    full = pl.DataFrame({"id": ["a", "b", "c"], "n": [1, 2, 3]})
    empty = full.head(0)
    assert pq.ParquetFile(io.BytesIO(parquet_bytes(empty))).num_row_groups == 0
    (tmp_path / "part-00000.parquet").write_bytes(parquet_bytes(full))
    (tmp_path / "part-00001.parquet").write_bytes(parquet_bytes(empty))
    back = pl.read_parquet(io.BytesIO(parquet_bytes(empty)))
    assert back.height == 0 and back.columns == ["id", "n"]
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "part-*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds["id"] == ["a", "b", "c"]
