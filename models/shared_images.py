"""One vision-tower pass per distinct image of a batch, however many rows repeat it.

DAPO samples G responses per prompt, so a rollout or update batch holds every image G times
(8 by default): the processor would resize and patchify it G times and the vision tower would
run G identical forwards (and backwards). Here the processor sees each distinct (image, prompt)
row once, the rows are expanded by index, and the vision tower runs on the distinct images; its
per-image features are repeated for the rows that share them. Exact, not an approximation: the
features of a repeated image are the same tensor, and their gradients add up through the index
(tests/test_shared_images.py: log-probs and gradients equal to the unshared batch's).

The model's own forward stays untouched: only its ``get_image_features`` is wrapped, and the
wrapper acts only inside ``repeated_images(model, rows)``. Outside, or when no row repeats,
calls pass straight through.
"""

from __future__ import annotations

import contextlib
import types

import torch


def distinct_rows(keys: list) -> tuple[list[int], list[int]]:
    """(first, inverse): the row index of each distinct key's first occurrence, in order, and
    for every row the position of its key among the distinct ones. ``keys[first[inverse[i]]]``
    equals ``keys[i]``."""
    pos: dict = {}
    first, inverse = [], []
    for i, k in enumerate(keys):
        if k not in pos:
            pos[k] = len(first)
            first.append(i)
        inverse.append(pos[k])
    return first, inverse


def _inner(model):
    """The module whose forward calls ``self.get_image_features``: the one holding the vision tower
    as a submodule (Qwen2_5_VLModel), however deep — under a peft wrapper the generation model is
    two levels down, and its own ``get_image_features`` only delegates."""
    for m in model.modules():
        if "visual" in m._modules and hasattr(m, "get_image_features"):
            return m
    raise TypeError(
        f"{type(model).__name__} has no vision tower with get_image_features; shared images need a Qwen2.5-VL model"
    )


def _features_once(self, pixel_values, image_grid_thw=None, *args, **kwargs):
    """``get_image_features`` on the distinct images only, the per-image features then repeated
    for every row. ``pixel_values`` holds the distinct images' patches; ``image_grid_thw`` one
    row per *image placeholder* (the expanded batch's), as position ids need."""
    first, inverse = self._aot_repeats
    out = self._aot_stock_features(pixel_values, image_grid_thw[first], *args, **kwargs)
    per_image = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(per_image, torch.Tensor):  # one concatenated tensor: split per distinct image
        merge = self.visual.spatial_merge_size**2
        per_image = torch.split(per_image, (image_grid_thw[first].prod(-1) // merge).tolist())
    repeated = tuple(per_image[j] for j in inverse)
    if hasattr(out, "pooler_output"):
        out.pooler_output = repeated
        return out
    return repeated


@contextlib.contextmanager
def repeated_images(model, inverse: list[int] | None):
    """Within the block, the model's image features are computed once per distinct image:
    ``inverse[i]`` is the distinct image of placeholder ``i`` (one image per row). ``None`` or
    an identity map: a plain call."""
    if inverse is None or inverse == list(range(len(inverse))):
        yield
        return
    inner = _inner(model)
    first, _ = distinct_rows(inverse)
    inner._aot_stock_features = inner.get_image_features
    inner._aot_repeats = (torch.tensor(first), inverse)
    inner.get_image_features = types.MethodType(_features_once, inner)
    try:
        yield
    finally:  # the class's own method again (the instance attributes go)
        for name in ("get_image_features", "_aot_stock_features", "_aot_repeats"):
            inner.__dict__.pop(name, None)


def expand_rows(batch: dict, inverse: list[int]) -> dict:
    """Row tensors of a processor batch (ids, masks, per-image grids) indexed out to every row;
    ``pixel_values`` (the distinct images' patches, not per row) kept as they are."""
    idx = torch.tensor(inverse)
    return {k: (v if k == "pixel_values" else v[idx]) for k, v in batch.items()}
