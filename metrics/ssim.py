"""Localized SSIM: structural similarity of one box of two same-size images.

Uses scikit-image's ``structural_similarity`` (Wang et al. 2004, Gaussian-free 7x7 uniform
window by default). Small boxes get the largest odd window that fits; boxes under 3 px a side
have no defined SSIM, so they score 1.0 if identical and 0.0 otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def pixel_box(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels a box covers: (x0, y0, x1, y1), rounded outwards and clipped to the image."""
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    return x0, y0, min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))


def _crop(img: Image.Image | np.ndarray, box: list[float]) -> np.ndarray:
    arr = np.asarray(img)
    x0, y0, x1, y1 = pixel_box(box, arr.shape[1], arr.shape[0])
    return arr[y0:y1, x0:x1]


def region_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two equally shaped uint8 arrays (H, W) or (H, W, C)."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    side = min(a.shape[0], a.shape[1]) if a.size else 0
    if side < 3:
        return 1.0 if np.array_equal(a, b) else 0.0
    from skimage.metrics import structural_similarity  # imported on use: metrics/ loads without scikit-image

    win = min(7, side if side % 2 == 1 else side - 1)
    channel_axis = 2 if a.ndim == 3 else None
    return float(structural_similarity(a, b, win_size=win, data_range=255, channel_axis=channel_axis))


def localized_ssim(clean: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, box: list[float]) -> float:
    """SSIM of ``box`` between the clean and the edited image (same size)."""
    ca, ea = np.asarray(clean), np.asarray(edited)
    if ca.shape != ea.shape:
        raise ValueError(f"clean and edited images differ in size: {ca.shape} vs {ea.shape}")
    return region_ssim(_crop(ca, box), _crop(ea, box))
