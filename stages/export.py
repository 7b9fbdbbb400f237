"""AOT-SFT export: paired clean/adversarial images with the MCQ, answer, target and distractor
boxes and every check score, as a Hugging Face ``datasets`` Parquet dataset with a card."""

from __future__ import annotations

import polars as pl

from models.mcq import format_prompt, letters
from stages import rows as R
from stages.base import ShardContext


def export_sft(rows: pl.DataFrame, ctx: ShardContext) -> tuple[pl.DataFrame, pl.DataFrame]:
    kept, rejects = [], []
    for row in rows.iter_rows(named=True):
        if row["answer"] not in letters(len(row["options"])):
            rejects.append(R.reject(row, ctx.stage, "bad_answer", f"answer {row['answer']!r} not among the options"))
            continue
        kept.append(
            {
                **{k: row[k] for k in R.EXPORT if k in row},
                "clean_image": row["image"],
                "prompt": format_prompt(row["question"], row["options"]),
                "clean_scene": row["scene"],
            }
        )
    return R.frame(kept, R.EXPORT), R.frame(rejects, R.REJECTS)


def dataset_card(summary: dict) -> str:
    cfg = summary.get("config", {})
    name = cfg.get("export", {}).get("name", "aot-sft")
    return f"""---
pretty_name: {name}
task_categories: [visual-question-answering]
configs:
- config_name: default
  data_files: "part-*.parquet"
---
# {name} (version {summary["version"]})

Paired clean / adversarial images for Adversarial Opponent Training (AOT-SFT), made by this
project's bootstrap pipeline: scene extension (outpainting), quality filtering (CLIP +
composition, duplication, realism checks) and distractor implantation (box and prompt checks,
inpainting, detector verification, segmentation, localized SSIM on target boxes, effectiveness
against the base defender).

- Dataset: `{summary["dataset"]}`; rows: {summary["rows"]}; parent version(s): {", ".join(summary["parents"])}
- Code version: `{summary["code_version"]}`

## Columns
- `clean_image`, `adversarial_image`: the extended scene before and after implantation (PNG).
- `prompt`: the MCQ prompt (METHOD.md template); `question`, `options` (letters A, B, ... by position),
  `answer` (letter).
- `target_names`, `target_boxes`: what the question is about; boxes are `[x0, y0, x1, y1]` pixels.
- `distractor_boxes`, `distractor_descriptions`, `distractor_mask_areas`, `detector_scores`: the implanted distractor.
- `clip_score`, `composition_score`, `target_ssim_min`: check scores; `canvas_scale`: outpainting factor.
- `clean_scene`, `adversarial_scene`: the synthetic world's exact scene (JSON), null for real photos.

## Load
```python
import aot
ds = aot.load_version("<root>", "<this version>")  # the parts this manifest lists, each verified
```
(The parts are plain Parquet with `datasets` features: `datasets.load_dataset("parquet", ...)` reads
them too, without the checks.)
Rejected rows of every stage live in `rejects-*.parquet` beside each stage's parts, with reasons.
"""
