"""Image and box metrics shared by model backends and stages (pure numpy / scikit-image)."""

from metrics.boxes import box_area, clip_box, expand_box, intersection, iou, transform_box
from metrics.ssim import localized_ssim, region_ssim

__all__ = [
    "box_area",
    "clip_box",
    "expand_box",
    "intersection",
    "iou",
    "localized_ssim",
    "region_ssim",
    "transform_box",
]
