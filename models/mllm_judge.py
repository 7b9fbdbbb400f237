"""The judge role through a multimodal LLM (default full: Qwen2.5-VL-7B-Instruct).

Yes/no checks are asked with a ``\\boxed{Yes}`` / ``\\boxed{No}`` answer format; distractor
proposals as a JSON list of ``{"box": [x0, y0, x1, y1], "description": "..."}``. Model output is
never trusted: an answer that cannot be parsed is a check result with a reason (rejecting by
default, passing when ``unparsed="pass"``, for noise models), and proposals keep only the valid
entries of whatever JSON can be found. Nothing the model writes can raise.
"""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from metrics import region_ssim
from models.mcq import YES_NO_PROMPT, extract_yes_no
from models.roles import Box, CheckResult, Context, JudgeBase, Proposal, SceneChecks

FALLBACK_OBJECTS = ("red ball", "blue cup", "green book", "yellow lamp", "purple box", "orange sign")


def parse_yes_no(text: str) -> bool | None:
    """True/False for a clear answer (boxed first, then plain words); None if absent or contradictory."""
    ans = extract_yes_no(text, words=True)
    return None if ans is None else ans == "yes"


def parse_proposals(text: str, width: int, height: int) -> tuple[list[Proposal], int]:
    """Valid proposals found in the text, and how many entries were dropped as malformed."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return [], 0
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        # Partial output: take the complete {...} objects one by one.
        data = []
        for chunk in re.findall(r"\{[^{}]*\}", text[start:]):
            try:
                data.append(json.loads(chunk))
            except json.JSONDecodeError:
                continue
    if not isinstance(data, list):
        return [], 1
    out, bad = [], 0
    for item in data:
        box = item.get("box") if isinstance(item, dict) else None
        desc = item.get("description") if isinstance(item, dict) else None
        if (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) for v in box)
            and isinstance(desc, str)
            and desc.strip()
        ):
            out.append(Proposal([float(v) for v in box], desc.strip()))
        else:
            bad += 1
    return out, bad


class MLLMJudge(JudgeBase):
    def __init__(
        self,
        mllm,
        composition_ssim_min: float = 0.98,
        unparsed: str = "reject",
        fallback_random: bool = False,
        max_new_tokens: int = 256,
        seed: int = 0,
        batch_size: int = 8,
    ):
        if unparsed not in ("reject", "pass"):
            raise ValueError("judge option unparsed must be 'reject' or 'pass'")
        self.mllm = mllm
        self.composition_ssim_min = composition_ssim_min
        self.unparsed = unparsed
        self.fallback_random = fallback_random
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.batch_size = batch_size

    @classmethod
    def tiny(cls, seed: int = 0, max_new_tokens: int = 16, **kw) -> "MLLMJudge":
        """A judge on the tiny random Qwen2.5-VL (``--preset tiny``: every code path, noise verdicts)."""
        from models.qwen_vl import load_policy

        return cls(
            load_policy({"backend": "tiny", "seed": seed, "min_pixels": 1024, "max_pixels": 4096}),
            max_new_tokens=max_new_tokens,
            **kw,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        dtype: str = "bfloat16",
        device: str = "cuda",
        trust_remote_code: bool = False,
        **kw,
    ) -> "MLLMJudge":
        from models.qwen_vl import load_policy

        return cls(
            load_policy(
                {
                    "backend": "qwen-vl",
                    "model": model,
                    "dtype": dtype,
                    "device": device,
                    "trust_remote_code": trust_remote_code,
                }
            ),
            **kw,
        )

    def _ask(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        try:
            return self.mllm.generate(images, prompts, temperature=0.0, max_new_tokens=self.max_new_tokens)
        except TypeError:  # an MLLM without the max_new_tokens option
            return self.mllm.generate(images, prompts, temperature=0.0)

    def describe_edits(self, pairs: list[tuple[Image.Image, Image.Image]]) -> list[str]:
        """One short sentence per (clean, edited) pair: what changed. The two are shown side by
        side in one image (left before, right after), so any single-image MLLM can answer."""
        images = []
        for clean, edited in pairs:
            both = Image.new("RGB", (clean.width * 2, clean.height), "white")
            both.paste(clean.convert("RGB"), (0, 0))
            both.paste(edited.convert("RGB").resize(clean.size), (clean.width, 0))
            images.append(both)
        prompt = (
            "The left half is an image before an edit, the right half after it. In one short sentence, say "
            "what was added, removed or replaced, or whether only subtle noise changed."
        )
        return [t.strip() for t in self._ask(images, [prompt] * len(images))]

    def _verdict(self, text: str, fail_if: bool, what: str) -> CheckResult:
        ans = parse_yes_no(text)
        if ans is None:
            ok = self.unparsed == "pass"
            return CheckResult(
                ok, float("nan"), "" if ok else f"judge answer to the {what} check unparseable: {text[:80]!r}"
            )
        if ans == fail_if:
            return CheckResult(False, float(ans), f"judge: {what} check failed ({text[:80]!r})")
        return CheckResult(True, float(ans))

    # Prompts, one place for the single checks and the batched ones.
    @staticmethod
    def _composition_prompt(offset: tuple[int, int], size: tuple[int, int]) -> str:
        x, y = int(offset[0]), int(offset[1])
        return (
            f"The region [{x}, {y}, {x + size[0]}, {y + size[1]}] of this image is an original photo; everything "
            f"around it was added. Does the added part continue the original coherently? {YES_NO_PROMPT}"
        )

    @staticmethod
    def _duplication_prompt(name: str, original_box: Box) -> str:
        return (
            f"Outside the region {[round(v) for v in original_box]} of this image, is there a {name}? {YES_NO_PROMPT}"
        )

    @staticmethod
    def _realism_prompt() -> str:
        return f"Does this image show visible seams, artefacts or distorted objects? {YES_NO_PROMPT}"

    def _pixels_intact(self, original: Image.Image, extended: Image.Image, offset: tuple[int, int]) -> CheckResult:
        x, y = int(offset[0]), int(offset[1])
        w, h = original.size
        region = np.asarray(extended)[y : y + h, x : x + w]
        if region.shape != np.asarray(original).shape:
            return CheckResult(False, 0.0, f"original does not fit the canvas at offset {offset}")
        score = region_ssim(np.asarray(original), region)
        if score < self.composition_ssim_min:
            return CheckResult(
                False, score, f"original content changed (SSIM {score:.3f} < {self.composition_ssim_min})"
            )
        return CheckResult(True, score)

    def check_composition(
        self, original: Image.Image, extended: Image.Image, offset: tuple[int, int], context: Context
    ) -> CheckResult:
        # The original region must be intact (pixels), and the extension coherent (the model's eye).
        pixels = self._pixels_intact(original, extended, offset)
        if not pixels.passed:
            return pixels
        res = self._verdict(
            self._ask([extended], [self._composition_prompt(offset, original.size)])[0],
            fail_if=False,
            what="composition",
        )
        return CheckResult(res.passed, pixels.score, res.reason)

    def check_duplication(
        self, image: Image.Image, target_names: list[str], original_box: Box, context: Context
    ) -> CheckResult:
        if not target_names:
            return CheckResult(True, 0.0)
        prompts = [self._duplication_prompt(n, original_box) for n in target_names]
        return self._duplication_verdict(target_names, self._ask([image] * len(prompts), prompts))

    def _duplication_verdict(self, names: list[str], texts: list[str]) -> CheckResult:
        for name, text in zip(names, texts):
            res = self._verdict(text, fail_if=True, what=f"duplication ({name})")
            if not res.passed:
                return res
        return CheckResult(True, 0.0)

    def check_realism(self, image: Image.Image, context: Context) -> CheckResult:
        return self._verdict(self._ask([image], [self._realism_prompt()])[0], fail_if=True, what="realism")

    def check_scenes(self, items: list[SceneChecks]) -> list[tuple[CheckResult, CheckResult, CheckResult]]:
        """All three checks for many images, every prompt through batched generation."""
        pixels = [self._pixels_intact(it.original, it.extended, it.offset) for it in items]
        jobs: list[tuple[int, str, str]] = []  # (item, check, prompt)
        for i, it in enumerate(items):
            if pixels[i].passed:  # no need to ask about coherence once the original is damaged
                jobs.append((i, "composition", self._composition_prompt(it.offset, it.original.size)))
            jobs += [(i, "duplication", self._duplication_prompt(n, it.original_box)) for n in it.target_names]
            jobs.append((i, "realism", self._realism_prompt()))
        texts: list[str] = []
        for k in range(0, len(jobs), self.batch_size):
            chunk = jobs[k : k + self.batch_size]
            texts += self._ask([items[i].extended for i, _, _ in chunk], [p for _, _, p in chunk])
        answers: dict[tuple[int, str], list[str]] = {}
        for (i, check, _), text in zip(jobs, texts):
            answers.setdefault((i, check), []).append(text)
        out = []
        for i, it in enumerate(items):
            comp = pixels[i]
            if comp.passed:  # same verdict as check_composition
                res = self._verdict(answers[(i, "composition")][0], fail_if=False, what="composition")
                comp = CheckResult(res.passed, comp.score, res.reason)
            dup = self._duplication_verdict(it.target_names, answers.get((i, "duplication"), []))
            real = self._verdict(answers[(i, "realism")][0], fail_if=True, what="realism")
            out.append((comp, dup, real))
        return out

    def propose_distractors(
        self,
        image: Image.Image,
        question: str,
        target_names: list[str],
        target_boxes: list[Box],
        k: int,
        seed: int,
        context: Context,
    ) -> list[Proposal]:
        w, h = image.size
        prompt = (
            f'This image is {w}x{h} pixels. A viewer must answer: "{question}". Propose {k} small objects to '
            f"add that would distract the viewer without changing the answer: none of them may be or look like "
            f"{', '.join(target_names) or 'the objects asked about'}, and none may touch these boxes: "
            f"{[[round(v) for v in b] for b in target_boxes]}. Reply with only a JSON list like "
            '[{"box": [x0, y0, x1, y1], "description": "a blue cup"}].'
        )
        found, _ = parse_proposals(self._ask([image], [prompt])[0], w, h)
        if not found and self.fallback_random:
            # Noise models (the tiny preset) write no JSON: random proposals keep the later code paths running.
            rng = np.random.default_rng(seed)
            for _ in range(k):
                side = float(rng.uniform(0.08, 0.2) * min(w, h))
                x0, y0 = float(rng.uniform(0, w - side)), float(rng.uniform(0, h - side))
                found.append(Proposal([x0, y0, x0 + side, y0 + side], str(rng.choice(FALLBACK_OBJECTS))))
        return found[:k]
