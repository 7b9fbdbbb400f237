"""One interface per model role (DESIGN.md, "Models: roles, presets, backends").

Every backend of a role — synthetic oracle, tiny random-weight model, pretrained checkpoint —
implements the same methods, so stage code never knows which one it drives. ``context`` is the
optional side information a row carries (the synthetic world's scene); real models ignore it,
oracle backends require it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

Box = list[float]  # [x0, y0, x1, y1] in image pixels, x1/y1 exclusive
Context = dict | None


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model object -> its call lock
_LOCKS_GUARD = threading.Lock()


def lock_of(obj) -> threading.RLock:
    """The one lock of ``obj`` (any weak-referenceable object): it lives beside the object, not in
    it, so models still copy and pickle."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(obj, threading.RLock())


_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # object -> its idle private copies


@contextlib.contextmanager
def private_copy(obj, guard=None):
    """A deep copy of ``obj`` that no other thread uses while the block runs: for an object whose
    calls cannot overlap (a fast tokenizer refuses a call while another thread holds it, "Already
    borrowed") where one lock would serialize the callers. Copies are kept beside ``obj`` for the
    next block, so each is made once per concurrent caller, not once per call (so a setting
    changed on ``obj`` later does not reach the copies made before). ``guard``: the lock the
    callers of ``obj`` hold (default ``lock_of(obj)``), held while the copy is made."""
    with _LOCKS_GUARD:
        idle = _COPIES.setdefault(obj, [])
        mine = idle.pop() if idle else None
    if mine is None:
        with guard or lock_of(obj):  # copying reads obj's state: not while another thread calls it
            mine = copy.deepcopy(obj)
    try:
        yield mine
    finally:
        with _LOCKS_GUARD:
            _COPIES.setdefault(obj, []).append(mine)


def serialized(method):
    """One call at a time per model object: for a method that touches state shared by every
    caller (a diffusers scheduler's step index, a patched forward, the global torch RNG a seeded
    sampler relies on). Stage shards run in threads and share each loaded model (the registry
    loads it once per process), so without this two shards can corrupt each other's call."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with lock_of(self):
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class CheckResult:
    passed: bool
    score: float
    reason: str = ""  # why it failed (empty when passed)


@dataclass
class Proposal:
    box: Box
    description: str


@dataclass
class Detection:
    box: Box
    score: float
    label: str


@dataclass
class Painted:
    """An edited image and the context updated to match it."""

    image: Image.Image
    context: Context = None
    info: dict = field(default_factory=dict)


@dataclass
class SceneChecks:
    """Inputs of the three Stage 1 checks for one extended image."""

    original: Image.Image
    extended: Image.Image
    offset: tuple[int, int]
    target_names: list[str]
    original_box: Box
    context: Context = None


class Painter:
    """Batch defaults for outpainters and inpainters: one call per item. Backends that can batch
    (a diffusion pipeline: one call per same-size group) override the ``*_many`` methods."""

    def outpaint_many(
        self,
        images: list[Image.Image],
        canvas_sizes: list[tuple[int, int]],
        offsets: list[tuple[int, int]],
        contexts: list[Context],
    ) -> list[Painted]:
        return [self.outpaint(i, c, o, x) for i, c, o, x in zip(images, canvas_sizes, offsets, contexts)]

    def fill_many(
        self, image: Image.Image, boxes: list[Box], descriptions: list[str], context: Context
    ) -> list[Painted]:
        """Several independent fills of one image (one per box)."""
        return [self.fill(image, b, d, context) for b, d in zip(boxes, descriptions)]


class JudgeBase:
    """Batch default for judges: the three checks per item. An MLLM judge overrides it to send
    every prompt of a shard through batched generation."""

    def check_scenes(self, items: list[SceneChecks]) -> list[tuple[CheckResult, CheckResult, CheckResult]]:
        return [
            (
                self.check_composition(it.original, it.extended, it.offset, it.context),
                self.check_duplication(it.extended, it.target_names, it.original_box, it.context),
                self.check_realism(it.extended, it.context),
            )
            for it in items
        ]


@runtime_checkable
class Outpainter(Protocol):
    def outpaint(
        self, image: Image.Image, canvas_size: tuple[int, int], offset: tuple[int, int], context: Context
    ) -> Painted:
        """Place ``image`` at ``offset`` on a canvas of ``canvas_size`` and fill only the border.

        Pixels of the pasted region must come back bit-identical.
        """


@runtime_checkable
class Inpainter(Protocol):
    def fill(self, image: Image.Image, box: Box, description: str, context: Context) -> Painted:
        """Paint ``description`` into ``box``; pixels outside the box must not change."""


@runtime_checkable
class Judge(Protocol):
    def check_composition(
        self, original: Image.Image, extended: Image.Image, offset: tuple[int, int], context: Context
    ) -> CheckResult: ...

    def check_duplication(
        self, image: Image.Image, target_names: list[str], original_box: Box, context: Context
    ) -> CheckResult:
        """Fail if the new region (outside ``original_box``) holds anything a target's name refers to."""

    def check_realism(self, image: Image.Image, context: Context) -> CheckResult: ...

    def propose_distractors(
        self,
        image: Image.Image,
        question: str,
        target_names: list[str],
        target_boxes: list[Box],
        k: int,
        seed: int,
        context: Context,
    ) -> list[Proposal]: ...


@runtime_checkable
class ClipScorer(Protocol):
    def score(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        """Cosine similarity of each image with its text."""


@runtime_checkable
class Detector(Protocol):
    def detect(self, image: Image.Image, phrase: str, context: Context) -> list[Detection]: ...


@runtime_checkable
class Segmenter(Protocol):
    def segment(self, image: Image.Image, box: Box, context: Context) -> np.ndarray:
        """Boolean mask (H, W) of the object inside ``box``."""


@runtime_checkable
class MLLM(Protocol):
    """Multimodal LLM: the defender, and the judge's generation engine."""

    def generate(
        self, images: list[Image.Image], prompts: list[str], *, temperature: float = 0.0, seed: int = 0
    ) -> list[str]: ...


def seeds_each_row(model) -> bool:
    """Whether ``model.generate`` takes ``seeds=`` (one per prompt, each row sampled as it would be
    alone under its seed: QwenVLPolicy, an endpoint). Any other MLLM seeds a whole call."""
    import inspect

    return "seeds" in inspect.signature(model.generate).parameters
