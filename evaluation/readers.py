"""Readers for the public benchmark files, from local paths (shared/notes/benchmark-formats.md).

Each returns ``(items, rejects)``: every row either becomes an ``Item`` or a reject with its
reason. A file in the wrong format fails at once with a message naming the expected columns.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from storage import content_hash
from storage.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# The columns each TSV benchmark must have (shared/notes/benchmark-formats.md): its reader's
# requirement, and the check ``aot eval`` makes before anything loads.
HRBENCH_COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D"]
POPE_COLUMNS = ["index", "image", "question", "answer", "category"]
HALLUSIONBENCH_COLUMNS = ["index", "question", "answer", "category", "l2-category", "image_path"]
TSV_COLUMNS = {
    "hrbench4k": HRBENCH_COLUMNS,
    "hrbench8k": HRBENCH_COLUMNS,
    "pope": POPE_COLUMNS,
    "hallusionbench": HALLUSIONBENCH_COLUMNS,
}
NAMES = {"hrbench4k": "HRBench-4K", "hrbench8k": "HRBench-8K", "pope": "POPE", "hallusionbench": "HallusionBench"}


class FormatError(ValueError):
    """The file is not in the benchmark's published layout."""


@dataclass
class Item:
    id: str
    benchmark: str
    image: Image.Image
    question: str
    answer: str  # an option letter for MCQs, "yes"/"no" for yes/no questions
    options: list[str] | None = None  # MCQ options in file order (None: yes/no question)
    categories: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Reject:
    id: str
    reason: str
    detail: str


def _b64_image(text: str) -> Image.Image:
    try:
        raw = base64.b64decode(text, validate=False)
    except (ValueError, TypeError) as exc:
        raise ImageDecodeError(f"image column is not base64: {exc}") from None
    return decode_image(raw, max_pixels=DEFAULT_MAX_PIXELS)


def read_tsv(path: str | Path, required: list[str], name: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{name}: no file at {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise FormatError(
                f"{name}: {path} lacks column(s) {missing}; expected a TSV with a header row and columns "
                f"{required} (found {cols})"
            )
        return [{k: (v if v is not None else "") for k, v in row.items()} for row in reader]  # empty strings kept


def read_vstar(folder: str | Path) -> tuple[list[Item], list[Reject]]:
    """V* Bench: one sub-folder per category; ``<id>.json`` (question, options with the correct
    one first, optional bbox [[x, y, w, h]]) beside an image of the same stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"V*: {folder} is not a folder (expected one sub-folder per category of <id>.json + image)")
    items, rejects = [], []
    for js in sorted(folder.glob("*/*.json")):
        iid = f"{js.parent.name}/{js.stem}"
        img_path = next((js.with_suffix(s) for s in IMAGE_SUFFIXES if js.with_suffix(s).exists()), None)
        if img_path is None:
            rejects.append(Reject(iid, "missing_image", f"no image beside {js.name}"))
            continue
        try:
            rec = json.loads(js.read_text())
            question, options = rec["question"], rec["options"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            rejects.append(Reject(iid, "bad_record", f"{js.name}: {type(exc).__name__}: {exc}"))
            continue
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            rejects.append(Reject(iid, "bad_options", f"options must be a list of >= 2 texts, got {options!r}"))
            continue
        try:
            image = decode_image(img_path.read_bytes())
        except ImageDecodeError as exc:
            rejects.append(Reject(iid, "bad_image", str(exc)))
            continue
        items.append(
            Item(
                iid,
                "vstar",
                image,
                question,
                "A",
                options,
                [js.parent.name],
                {"bbox": rec.get("bbox"), "target_object": rec.get("target_object")},
            )
        )
    if not items and not rejects:
        raise FormatError(f"V*: no <category>/<id>.json files under {folder}")
    return items, rejects


def read_hrbench(
    path: str | Path, name: str = "hrbench", images_dir: str | Path | None = None
) -> tuple[list[Item], list[Reject]]:
    """HRBench-4K/-8K TSV: index, image (base64) or image_path, question, answer (A-D), category,
    A, B, C, D, cycle_category."""
    rows = read_tsv(path, HRBENCH_COLUMNS, name)
    items, rejects = [], []
    for r in rows:
        iid = r["index"]
        options = [r[k] for k in "ABCD"]
        if r["answer"].strip().upper() not in ("A", "B", "C", "D"):  # one letter: "AB" is not an answer
            rejects.append(Reject(iid, "bad_answer", f"answer {r['answer']!r} is not one of A, B, C, D"))
            continue
        try:
            if r.get("image"):
                image = _b64_image(r["image"])
            elif r.get("image_path"):
                image = decode_image((Path(images_dir or Path(path).parent) / r["image_path"]).read_bytes())
            else:
                raise ImageDecodeError("neither an image nor an image_path")
        except (ImageDecodeError, OSError) as exc:
            rejects.append(Reject(iid, "bad_image", str(exc)))
            continue
        items.append(
            Item(
                iid,
                name,
                image,
                r["question"],
                r["answer"].strip().upper(),
                options,
                [r["category"]],
                {"cycle_category": r.get("cycle_category", "")},
            )
        )
    return items, rejects


def _yes_no(value: str) -> str | None:
    v = value.strip().lower()
    return v if v in ("yes", "no") else None


def read_pope(path: str | Path) -> tuple[list[Item], list[Reject]]:
    """POPE TSV: index, image (base64), question, answer (yes/no, any case), category (may be a
    comma-separated list: a row counts in each)."""
    rows = read_tsv(path, POPE_COLUMNS, "POPE")
    items, rejects = [], []
    for r in rows:
        ans = _yes_no(r["answer"])
        if ans is None:
            rejects.append(Reject(r["index"], "bad_answer", f"answer {r['answer']!r} is not yes/no"))
            continue
        try:
            image = _b64_image(r["image"])
        except ImageDecodeError as exc:
            rejects.append(Reject(r["index"], "bad_image", str(exc)))
            continue
        cats = [c.strip() for c in r["category"].split(",") if c.strip()]
        items.append(Item(r["index"], "pope", image, r["question"], ans, None, cats))
    return items, rejects


def read_hallusionbench(path: str | Path, images_dir: str | Path | None = None) -> tuple[list[Item], list[Reject]]:
    """HallusionBench TSV: index (underscore-separated; parts 3, 4, 5 are set, figure and question
    ids), question, answer (Yes/No), category, l2-category, image_path (relative to images_dir),
    optionally image (base64, used when it is a real image)."""
    rows = read_tsv(path, HALLUSIONBENCH_COLUMNS, "HallusionBench")
    base = Path(images_dir) if images_dir else Path(path).parent
    items, rejects = [], []
    for r in rows:
        parts = r["index"].split("_")
        ans = _yes_no(r["answer"])
        if ans is None:
            rejects.append(Reject(r["index"], "bad_answer", f"answer {r['answer']!r} is not Yes/No"))
            continue
        if len(parts) < 6:
            rejects.append(Reject(r["index"], "bad_index", "index needs >= 6 underscore-separated parts"))
            continue
        image = None
        if r.get("image"):
            try:
                image = _b64_image(r["image"])
            except ImageDecodeError:
                image = None  # not a real image: fall back to image_path
        if image is None:
            try:
                image = decode_image((base / r["image_path"]).read_bytes())
            except (ImageDecodeError, OSError) as exc:
                rejects.append(Reject(r["index"], "bad_image", f"{r['image_path']}: {exc}"))
                continue
        items.append(
            Item(
                r["index"],
                "hallusionbench",
                image,
                r["question"],
                ans,
                None,
                [r["category"], r["l2-category"]],
                # fAcc / qAcc group as VLMEvalKit's HallusionBench rating does: by l2-category,
                # set and figure (resp. question) id
                {
                    "set": parts[3],
                    "figure": f"{r['l2-category']}_{parts[3]}_{parts[4]}",
                    "question": f"{r['l2-category']}_{parts[3]}_{parts[5]}",
                },
            )
        )
    return items, rejects


def image_b64(image: Image.Image, fmt: str = "JPEG") -> str:
    """For building fixtures and caches: an image as base64 text."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


READERS = {  # benchmark name -> reader of its published layout: (file or folder, images folder or None)
    "vstar": lambda p, images: read_vstar(p),
    "hrbench4k": lambda p, images: read_hrbench(p, "hrbench4k", images),
    "hrbench8k": lambda p, images: read_hrbench(p, "hrbench8k", images),
    "pope": lambda p, images: read_pope(p),
    "hallusionbench": lambda p, images: read_hallusionbench(p, images),
}
# The paper's column order for the summary (METHOD.md, "Published results").
PAPER_COLUMNS = ["vstar", "hrbench4k", "hrbench8k", "hallusionbench", "pope"]


def check_layout(name: str, path: str | Path) -> None:
    """The benchmark's file or folder is in its published layout (a TSV's header, V*'s folder),
    checked in a moment before a model loads; rows are checked when read."""
    path = Path(path)
    if name == "vstar":
        if not path.is_dir():
            raise FormatError(f"V*: {path} is not a folder (expected one sub-folder per category of <id>.json + image)")
        return
    if not path.is_file():
        raise FormatError(f"{NAMES[name]}: no file at {path}")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    missing = [c for c in TSV_COLUMNS[name] if c not in header]
    if missing:
        raise FormatError(
            f"{NAMES[name]}: {path} lacks column(s) {missing}; expected a TSV with a header row and "
            f"columns {TSV_COLUMNS[name]} (found {header})"
        )


def files_fingerprint(path: str | Path) -> str:
    """Identity of a benchmark's files: every file's relative path, size and modification time
    (an edited file, even with as many rows, is a new input; no need to hash gigabytes)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return content_hash([[str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def load_benchmarks(specs: dict[str, str], images: dict[str, str] | None = None):
    """(items, reject rows) of every named benchmark file or folder (``images``: a benchmark's
    images folder, where its file names images by path). A benchmark whose every row is rejected
    is an error naming why, not a silently missing column."""
    images = images or {}
    unknown = sorted(set(specs) - set(READERS)) + sorted(set(images) - set(READERS))
    if unknown:
        raise FormatError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(READERS)}")
    items, rejects = [], []
    for name, path in specs.items():
        it, rej = READERS[name](path, images.get(name))
        if not it:
            reasons: dict[str, int] = {}
            for r in rej:
                reasons[r.reason] = reasons.get(r.reason, 0) + 1
            first = f" (first: {rej[0].id}: {rej[0].detail})" if rej else ""
            hint = (
                f"; its images resolve against {images[name] if name in images else Path(path).parent}: "
                f"name the images folder with --benchmark-images {name}=DIR"
                if "bad_image" in reasons
                else ""
            )
            raise FormatError(
                f"{name}: no usable row in {path}: {len(rej)} rejected "
                f"({', '.join(f'{k} {v}' for k, v in reasons.items()) or 'no rows'}){first}{hint}"
            )
        items += it
        rejects += [{"id": r.id, "stage": f"read-{name}", "reason": r.reason, "detail": r.detail} for r in rej]
    return items, rejects
