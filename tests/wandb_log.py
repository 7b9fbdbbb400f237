"""Read an offline W&B run back (its ``run-*.wandb`` file) for the tests: W&B 0.31 ships no
Python reader for it any more (the reader moved into its Go core), but the format is small — a
7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (a
7-byte record header: checksum, little-endian length, type FULL/FIRST/MIDDLE/LAST), each record
one ``wandb_internal_pb2.Record`` — so the tests parse it with W&B's own protobuf classes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path} is not a W&B run log"
    out, pos, chunks = [], 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a record header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0 and length == 0:  # zero padding at a block's end
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            out.append(rec)
            chunks = []
    return out


def read_run(folder: str | Path) -> dict:
    """One offline run folder (``offline-run-*``): name, tags, config, history rows (each with
    ``_step``), the images logged (key -> steps) and the exit code."""
    (log,) = Path(folder).glob("run-*.wandb")
    run: dict = {"history": [], "config": {}, "images": {}, "exit_code": None}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["tags"] = rec.run.display_name, list(rec.run.tags)
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            step = rec.history.step.num
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            # an image arrives flattened: KEY/_type = "image-file", KEY/path, KEY/sha256, ...
            images = [k[: -len("/_type")] for k, v in items.items() if k.endswith("/_type") and v == "image-file"]
            for key in images:
                run["images"].setdefault(key, []).append(step)
            row = {
                k: v
                for k, v in items.items()
                if not k.startswith("_") and not any(k.startswith(i + "/") for i in images)
            }
            run["history"].append({"_step": step, **row})
        elif kind == "exit":
            run["exit_code"] = rec.exit.exit_code
    return run


def runs(wandb_dir: str | Path) -> list[dict]:
    """Every offline run under a WANDB_DIR, oldest first."""
    return [read_run(f) for f in sorted(Path(wandb_dir).glob("wandb/offline-run-*"))]
