"""The bootstrap stages as pure functions over one shard (no Prefect here).

source -> extend (Stage 1 outpainting) -> filter (Stage 1 checks) -> implant (Stage 2) -> export.
"""

from stages.base import ShardContext, Stage, StageError
from stages.export import dataset_card, export_sft
from stages.extend import extend_scenes
from stages.implant import implant_distractors
from stages.quality import filter_scenes
from stages.source import generate_scenes

STAGES: dict[str, Stage] = {
    "source": Stage("source", "source", (), None, generate_scenes, "Synthetic source scenes"),
    "extend": Stage("extend", "stage1", ("outpainter",), "source", extend_scenes, "Stage 1: scene extension"),
    "filter": Stage("filter", "filter", ("clip", "judge"), "extend", filter_scenes, "Stage 1: quality filtering"),
    "implant": Stage("implant", "stage2", ("judge", "inpainter", "detector", "segmenter", "defender"), "filter",
                     implant_distractors, "Stage 2: distractor implantation"),
    "export": Stage("export", "export", (), "implant", export_sft, "AOT-SFT export", dataset_card),
}

__all__ = ["STAGES", "ShardContext", "Stage", "StageError"]
