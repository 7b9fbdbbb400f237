"""Import real data: a folder of images plus V*-style records (JSONL or Parquet) -> a source version.

Each record: ``image`` (a path relative to the images folder; in Parquet also raw bytes or a
``{bytes, path}`` struct), ``question``, ``options`` (list of >= 2 texts), ``answer`` (letter),
``target_boxes`` (list of ``[x0, y0, x1, y1]`` pixels, or ``[x, y, w, h]`` with
``box_format="xywh"`` as V* writes them), optional ``target_names``, ``question_type``, ``id``.

Validated line by line; every bad line becomes a reject with its reason — ``blank_line``,
``bad_encoding`` (not UTF-8), ``bad_record`` (not JSON / not a mapping), ``missing_field``,
``bad_id``, ``duplicate_id`` (the first line with an id keeps it), ``bad_question`` (not text,
or over ``MAX_QUESTION`` characters), ``bad_options`` (fewer than 2, over 26, empty, repeated, or
over ``MAX_OPTION`` characters), ``bad_answer`` (not a letter among the options), ``bad_names``,
``no_targets`` (Stage 2 needs a target), ``missing_image``, ``bad_image`` (undecodable or over the
decompression-bomb limit ``source.max_image_pixels``), ``bad_box`` (not 4 finite numbers,
degenerate or outside the image). Kept plus rejected rows add up to the file's lines; nothing
crashes, nothing is silently dropped.
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


def read_records(path: Path) -> list[tuple[int, dict | None, str, str]]:
    """(line number, record or None, reject reason, detail) for every line (JSONL) or row
    (Parquet) of the file: a line that is blank, not UTF-8, not JSON or not an object is a reject
    row like any other, so the counts add up to the file's lines."""
    if not path.exists():
        raise StageError(f"records file {path} does not exist")
    if path.is_dir():
        raise StageError(f"records file {path} is a folder: give the JSONL or Parquet file of records")
    if path.suffix == ".parquet":
        try:
            df = pl.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
            raise StageError(f"records file {path} is not readable Parquet: {exc}") from None
        out = [(i + 1, r, "", "") for i, r in enumerate(df.iter_rows(named=True))]
    else:
        out = []
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":  # the newline that ends the last line opens no line
            lines.pop()
        for i, data in enumerate(lines, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append((i, None, "bad_encoding", f"line {i} is not UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if not line.strip():
                out.append((i, None, "blank_line", f"line {i} is blank"))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append((i, None, "bad_record", f"line {i} is not JSON: {exc}"))
                continue
            if not isinstance(rec, dict):
                out.append((i, None, "bad_record", f"line {i} is not an object"))
                continue
            out.append((i, rec, "", ""))
    if not any(rec is not None for _, rec, _, _ in out):
        raise StageError(
            f"records file {path} holds no record ({len(out)} lines, none a JSON object): nothing to import"
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


# Limits of a record's text (characters), documented in docs/pipeline.md: a question or option
# longer than this is a broken record, not a question a defender is asked.
MAX_QUESTION = 4000
MAX_OPTION = 1000
MAX_ID = 200


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_record(rec: dict, line: int, images_dir: Path, box_format: str, max_pixels: int, stem: str) -> dict:
    for name in ("image", "question", "options", "answer"):
        if rec.get(name) in (None, "", []):
            raise RowError("missing_field", f"record has no {name!r}")
    rid = rec.get("id")
    if rid is not None and not (
        isinstance(rid, (str, int)) and not isinstance(rid, bool) and 0 < len(str(rid)) <= MAX_ID
    ):
        raise RowError("bad_id", f"id must be text or a number of 1-{MAX_ID} characters, got {rid!r}")
    if not isinstance(rec["question"], str) or not rec["question"].strip():
        raise RowError("bad_question", "field 'question' must be non-empty text")
    if len(rec["question"]) > MAX_QUESTION:
        raise RowError("bad_question", f"question of {len(rec['question'])} characters: at most {MAX_QUESTION}")
    options = rec["options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise RowError("bad_options", f"options must be a list of >= 2 non-empty texts, got {options!r}")
    if len(options) > 26:
        raise RowError("bad_options", f"{len(options)} options: at most 26 (letters A-Z)")
    if any(len(o) > MAX_OPTION for o in options):
        raise RowError("bad_options", f"an option is longer than {MAX_OPTION} characters")
    if len({o.strip().lower() for o in options}) < len(options):
        raise RowError("bad_options", f"options repeat ({options!r}): two letters would be one answer")
    if not isinstance(rec["answer"], str):
        raise RowError("bad_answer", f"answer must be a letter, got {rec['answer']!r}")
    answer = rec["answer"].strip()
    if answer not in letters(len(options)):
        raise RowError("bad_answer", f"answer {answer!r} is not one of {letters(len(options))}")
    names = rec.get("target_names")
    if names is None and isinstance(rec.get("target_object"), (str, list)):
        names = rec["target_object"] if isinstance(rec["target_object"], list) else [rec["target_object"]]
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) and n.strip() for n in names)):
        raise RowError("bad_names", f"target_names must be a list of texts, got {names!r}")
    boxes_in = rec.get("target_boxes", rec.get("bbox"))
    if boxes_in is None or boxes_in == []:
        raise RowError(
            "no_targets",
            "record has no target_boxes: Stage 2 keeps distractors off the targets, so it needs at least one",
        )
    if not isinstance(boxes_in, list):
        raise RowError("bad_box", f"target_boxes must be a list of boxes, got {boxes_in!r}")
    data, path = _image_bytes(rec["image"], images_dir)
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise RowError("bad_image", str(exc)) from None
    boxes = []
    for b in boxes_in:
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_number(v) for v in b)):
            raise RowError("bad_box", f"box {b!r} is not 4 finite numbers")
        x0, y0, a, c = (float(v) for v in b)
        x1, y1 = (x0 + a, y0 + c) if box_format == "xywh" else (a, c)
        if not (x1 > x0 and y1 > y0):
            raise RowError("bad_box", f"box {b!r} is degenerate (no area)")
        if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
            raise RowError("bad_box", f"box {b!r} lies outside the {image.width}x{image.height} image")
        boxes.append([x0, y0, x1, y1])
    return {
        "id": str(rid if rid is not None else f"{stem}-{line:06d}"),
        "source": "import",
        "image": image_cell(image, path),
        "width": image.width,
        "height": image.height,
        "question_type": str(rec.get("question_type") or rec.get("category") or "mcq"),
        "question": rec["question"],
        "options": options,
        "answer": answer,
        "target_names": list(names or []),
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
    # The dataset's name is part of the id: the same files imported as two datasets are two versions.
    version = content_hash(
        {"stage": "source", "dataset": dataset, "config": vcfg, "code": code, "parents": [], "inputs": h.hexdigest()}
    )
    existing = store.manifest_at(dataset, "source", version)
    if existing is not None:
        return existing
    size = cfg.source.shard_size
    records, seen = [], set()
    for index in range(max(1, math.ceil(len(entries) / size))):
        chunk = entries[index * size : (index + 1) * size]
        kept, rejects = [], []
        for line, rec, reason, problem in chunk:
            fallback_id = f"{records_path.stem}-{line:06d}"
            if rec is None:
                rejects.append(R.reject({"id": fallback_id, "line": line}, "import", reason, problem))
                continue
            try:
                row = validate_record(rec, line, images_dir, box_format, cfg.source.max_image_pixels, records_path.stem)
                if row["id"] in seen:
                    raise RowError("duplicate_id", f"id {row['id']!r} was already given to an earlier line")
                seen.add(row["id"])
                kept.append(row)
            except RowError as exc:
                safe = {k: v for k, v in rec.items() if not isinstance(v, (bytes, bytearray, dict))}
                rid = rec.get("id")
                rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else fallback_id
                rejects.append(R.reject({**safe, "id": rid, "line": line}, "import", exc.reason, str(exc)))
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
