"""Versioned shard store over fsspec (file://, s3://, any fsspec URL).

Layout: ``ROOT/<dataset>/<stage>/<version>/part-00000.parquet ...`` plus ``manifest.json``,
written last. This package imports nothing of ours (DESIGN.md, "Imports run one way").
"""

from storage.hashing import content_hash, sha256_bytes
from storage.images import IMAGE_DTYPE, decode_image, encode_image, image_cell, image_cells
from storage.store import (
    DamagedVersion,
    Manifest,
    PartRef,
    ShardRecord,
    ShardStore,
    StorageError,
    VersionNotFound,
)

__all__ = [
    "DamagedVersion",
    "IMAGE_DTYPE",
    "Manifest",
    "PartRef",
    "ShardRecord",
    "ShardStore",
    "StorageError",
    "VersionNotFound",
    "content_hash",
    "decode_image",
    "encode_image",
    "image_cell",
    "image_cells",
    "sha256_bytes",
]
