"""Import real data: a folder of images plus V*-style records (JSONL or Parquet) -> a source version.

Each record: ``image`` (a path relative to the images folder; in Parquet also raw bytes or a
``{bytes, path}`` struct), ``question``, ``options`` (list of >= 2 texts), ``answer`` (letter),
``target_boxes`` (list of ``[x0, y0, x1, y1]`` pixels, or ``[x, y, w, h]`` with
``box_format="xywh"`` as V* writes them), optional ``target_names``, ``question_type``, ``id``.

Validated row by row; every bad row becomes a reject with its reason — ``bad_record`` (not
JSON / not a mapping), ``missing_field``, ``missing_image``, ``bad_image`` (undecodable or over
the decompression-bomb limit), ``bad_box`` (degenerate or outside the image), ``bad_answer``
(letter not among the options), ``bad_options``. Nothing crashes, nothing is silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import polars as pl

from config import PipelineConfig
from models.mcq import letters
from stages import rows as R
from stages.base import StageError
from stages.version import code_version
from storage import Manifest, ShardStore, content_hash, decode_image, image_cell
from storage.images import ImageDecodeError


class RowError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_records(path: Path) -> list[tuple[int, dict | None, str]]:
    """(line number, record or None, raw text) for every record in the file."""
    if not path.exists():
        raise StageError(f"records file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            df = pl.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
            raise StageError(f"records file {path} is not readable Parquet: {exc}") from None
        return [(i + 1, r, "") for i, r in enumerate(df.iter_rows(named=True))]
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append((i, None, f"line {i} is not JSON: {exc}"))
            continue
        out.append(
            (i, rec if isinstance(rec, dict) else None, "" if isinstance(rec, dict) else f"line {i} is not an object")
        )
    return out


def _image_bytes(value, images_dir: Path) -> tuple[bytes, str | None]:
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"], value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise RowError("missing_field", "field 'image' must be a path, bytes or {bytes, path}")
    path = (images_dir / value).resolve()
    if images_dir.resolve() not in path.parents:
        raise RowError("missing_image", f"image path {value!r} points outside the images folder")
    if not path.is_file():
        raise RowError("missing_image", f"image file {value!r} not found in {images_dir}")
    return path.read_bytes(), value


def validate_record(rec: dict, line: int, images_dir: Path, box_format: str, max_pixels: int, stem: str) -> dict:
    for name in ("image", "question", "options", "answer"):
        if rec.get(name) in (None, "", []):
            raise RowError("missing_field", f"record has no {name!r}")
    if not isinstance(rec["question"], str):
        raise RowError("missing_field", "field 'question' must be text")
    options = rec["options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise RowError("bad_options", f"options must be a list of >= 2 non-empty texts, got {options!r}")
    if len(options) > 26:
        raise RowError("bad_options", f"{len(options)} options: at most 26 (letters A-Z)")
    answer = str(rec["answer"]).strip()
    if answer not in letters(len(options)):
        raise RowError("bad_answer", f"answer {answer!r} is not one of {letters(len(options))}")
    data, path = _image_bytes(rec["image"], images_dir)
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise RowError("bad_image", str(exc)) from None
    boxes_in = rec.get("target_boxes", rec.get("bbox", [])) or []
    if not isinstance(boxes_in, list):
        raise RowError("bad_box", f"target_boxes must be a list of boxes, got {boxes_in!r}")
    boxes = []
    for b in boxes_in:
        if not (
            isinstance(b, (list, tuple))
            and len(b) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
        ):
            raise RowError("bad_box", f"box {b!r} is not 4 finite numbers")
        x0, y0, a, c = (float(v) for v in b)
        x1, y1 = (x0 + a, y0 + c) if box_format == "xywh" else (a, c)
        if not (x1 > x0 and y1 > y0):
            raise RowError("bad_box", f"box {b!r} is degenerate (no area)")
        if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
            raise RowError("bad_box", f"box {b!r} lies outside the {image.width}x{image.height} image")
        boxes.append([x0, y0, x1, y1])
    names = rec.get("target_names") or ([rec["target_object"]] if isinstance(rec.get("target_object"), str) else [])
    if isinstance(rec.get("target_object"), list):
        names = [str(n) for n in rec["target_object"]]
    return {
        "id": str(rec.get("id") or f"{stem}-{line:06d}"),
        "source": "import",
        "image": image_cell(image, path),
        "width": image.width,
        "height": image.height,
        "question_type": str(rec.get("question_type") or rec.get("category") or "mcq"),
        "question": rec["question"],
        "options": options,
        "answer": answer,
        "target_names": [str(n) for n in names],
        "target_boxes": boxes,
        "scene": None,
    }


def import_records(
    store: ShardStore,
    records_path: str | Path,
    images_dir: str | Path,
    cfg: PipelineConfig,
    dataset: str = "imported",
    box_format: str = "xyxy",
) -> Manifest:
    records_path, images_dir = Path(records_path), Path(images_dir)
    if box_format not in ("xyxy", "xywh"):
        raise StageError(f"box format {box_format!r}: use xyxy or xywh")
    if not images_dir.is_dir():
        raise StageError(f"images folder {images_dir} does not exist")
    entries = read_records(records_path)
    # The version hashes the records file and every file in the images folder: new bytes, new version.
    h = hashlib.sha256(records_path.read_bytes())
    for f in sorted(p for p in images_dir.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(images_dir)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    vcfg = {
        "import": {
            "box_format": box_format,
            "max_image_pixels": cfg.source.max_image_pixels,
            "shard_size": cfg.source.shard_size,
        }
    }
    code = code_version([__name__])
    version = content_hash({"stage": "source", "config": vcfg, "code": code, "parents": [], "inputs": h.hexdigest()})
    existing = store.manifest_at(dataset, "source", version)
    if existing is not None:
        return existing
    size = cfg.source.shard_size
    records = []
    for index in range(max(1, math.ceil(len(entries) / size))):
        chunk = entries[index * size : (index + 1) * size]
        kept, rejects = [], []
        for line, rec, problem in chunk:
            if rec is None:
                rejects.append(
                    R.reject({"id": f"{records_path.stem}-{line:06d}", "raw": problem}, "import", "bad_record", problem)
                )
                continue
            try:
                kept.append(
                    validate_record(rec, line, images_dir, box_format, cfg.source.max_image_pixels, records_path.stem)
                )
            except RowError as exc:
                safe = {k: v for k, v in rec.items() if not isinstance(v, (bytes, bytearray, dict))}
                rejects.append(
                    R.reject(
                        {"id": str(rec.get("id") or f"{records_path.stem}-{line:06d}"), "line": line, **safe},
                        "import",
                        exc.reason,
                        str(exc),
                    )
                )
        key = content_hash({"lines": [c[0] for c in chunk], "inputs": h.hexdigest()})
        records.append(
            store.write_shard(
                dataset, "source", version, index, key, len(chunk), R.frame(kept, R.SOURCE), R.frame(rejects, R.REJECTS)
            )
        )
    return store.commit(
        dataset,
        "source",
        version,
        records,
        config=vcfg,
        parents=[],
        code_version=code,
        extra={"records": str(records_path), "images": str(images_dir)},
    )
