"""Stage 2, distractor implantation.

Per image: the judge proposes K (box, description) distractors; each goes through the box check
and the prompt check, is painted by the inpainter, verified by the detector (a detection of the
description overlapping the box), segmented (mask area recorded), and must leave every target
box intact (localized SSIM >= ``target_ssim_min``). Finally the base defender answers the
question on the edited image: an edit that makes it wrong on k of k tries is *effective* and
kept. Every proposal's outcome is recorded in ``attempts``; an image with no effective edit
becomes a reject row whose reason says how far its best proposal got.
"""

from __future__ import annotations

import json

import polars as pl

from metrics import iou, localized_ssim
from models.mcq import extract_choice, format_prompt
from stages import rows as R
from stages.base import ShardContext
from stages.checks import box_check, prompt_check
from storage import content_hash, decode_image, image_cell

# How far a proposal got, in pipeline order: a reject names the furthest stage any proposal reached.
OUTCOMES = ("box_check", "prompt_check", "not_tried", "detector", "target_ssim", "not_effective", "effective")


def ask(defender, image, prompt: str, tries: int, num_options: int) -> list[str | None]:
    """The defender's extracted letters over ``tries`` queries (greedy: tries are identical)."""
    answers = []
    for t in range(tries):
        text = defender.generate([image], [prompt], temperature=0.0 if tries == 1 else 1.0, seed=t)[0]
        answers.append(extract_choice(text, num_options).letter)
    return answers


def verified_edits(row: dict, cfg, models: dict, attempts: list[dict]):
    """Stage 2 without the defender: yield every proposal that passes the box, prompt, detector
    and target-SSIM checks, painted, in proposal order, as ``(edited, context, proposal,
    detection, mask, target_ssim_min, attempt)``. Every proposal's outcome is recorded in
    ``attempts`` (the caller's list). Also the ``implanter`` attack of evaluation/attacks.py."""
    judge, inpainter, detector, segmenter = (models[k] for k in ("judge", "inpainter", "detector", "segmenter"))
    clean = decode_image(row["image"])
    context = json.loads(row["scene"]) if row["scene"] else None
    seed = int(content_hash({"id": row["id"], "seed": cfg.seed}, 15), 16)
    proposals = judge.propose_distractors(
        clean, row["question"], row["target_names"], row["target_boxes"], cfg.num_proposals, seed, context
    )
    # Cheap checks first, for every proposal; then the survivors are painted in batches of
    # fill_batch (one diffusion call each) and verified in order, as long as the caller asks.
    candidates = []
    for prop in proposals:
        attempt = {"box": [float(v) for v in prop.box], "description": prop.description}
        attempts.append(attempt)
        ok, why = box_check(
            prop.box, clean.width, clean.height, row["target_boxes"], cfg.box_margin, cfg.box_min_frac, cfg.box_max_frac
        )
        if ok:
            ok, why = prompt_check(prop.description, row["target_names"])
            outcome = "prompt_check"
        else:
            outcome = "box_check"
        if not ok:
            attempt.update(outcome=outcome, detail=why)
            continue
        attempt.update(outcome="not_tried", detail="an earlier proposal was kept")
        candidates.append((prop, attempt))
    for start in range(0, len(candidates), cfg.fill_batch):
        chunk = candidates[start : start + cfg.fill_batch]
        painted_all = inpainter.fill_many(clean, [p.box for p, _ in chunk], [p.description for p, _ in chunk], context)
        for (prop, attempt), painted in zip(chunk, painted_all):
            edited = painted.image.convert("RGB")
            dets = detector.detect(edited, prop.description, painted.context)
            best = max(dets, key=lambda d: iou(d.box, prop.box), default=None)
            det_iou = iou(best.box, prop.box) if best else 0.0
            if best is None or det_iou < cfg.detector_iou_min:
                attempt.update(outcome="detector", detail=f"best detection IoU {det_iou:.2f} < {cfg.detector_iou_min}")
                continue
            mask = segmenter.segment(edited, best.box, painted.context)
            ssims = [localized_ssim(clean, edited, t) for t in row["target_boxes"]]
            ssim_min = min(ssims) if ssims else 1.0
            if ssim_min < cfg.target_ssim_min:
                attempt.update(outcome="target_ssim", detail=f"target SSIM {ssim_min:.3f} < {cfg.target_ssim_min}")
                continue
            attempt.update(detector_iou=det_iou, target_ssim_min=ssim_min, mask_area=int(mask.sum()))
            yield edited, painted.context, prop, best, mask, ssim_min, attempt


def implant_row(row: dict, ctx: ShardContext, models: dict) -> tuple[dict | None, tuple[str, str] | None]:
    cfg = ctx.config.implant
    defender = models["defender"]
    clean = decode_image(row["image"])
    prompt = format_prompt(row["question"], row["options"])
    n_opt = len(row["options"])
    clean_answers = ask(defender, clean, prompt, cfg.effectiveness_tries, n_opt)
    clean_correct = all(a == row["answer"] for a in clean_answers)
    if cfg.require_clean_correct and not clean_correct:
        return None, ("defender_wrong_on_clean", f"base defender answered {clean_answers}, truth {row['answer']}")
    attempts, kept = [], None
    for edited, context, prop, best, mask, ssim_min, attempt in verified_edits(row, cfg, models, attempts):
        answers = ask(defender, edited, prompt, cfg.effectiveness_tries, n_opt)
        attempt.update(answers=answers)
        if any(a == row["answer"] for a in answers):
            attempt.update(outcome="not_effective", detail=f"defender still right ({answers})")
            continue
        attempt.update(outcome="effective", detail="")
        kept = (edited, context, prop, best, mask, ssim_min, answers)
        break  # the first effective edit is kept
    if kept is None:
        reached = max((OUTCOMES.index(a["outcome"]) for a in attempts), default=0)
        counts = {
            o: sum(a["outcome"] == o for a in attempts) for o in OUTCOMES if any(a["outcome"] == o for a in attempts)
        }
        reason = "not_effective" if OUTCOMES[reached] == "not_effective" else "no_valid_edit"
        return None, (reason, f"{len(attempts)} proposals: {counts}; attempts {json.dumps(attempts)}")
    edited, adv_context, prop, best, mask, ssim_min, answers = kept
    out = dict(row)
    out.update(
        adversarial_image=image_cell(edited),
        adversarial_scene=json.dumps(adv_context) if adv_context is not None else None,
        distractor_boxes=[[float(v) for v in prop.box]],
        distractor_descriptions=[prop.description],
        distractor_mask_areas=[int(mask.sum())],
        detector_scores=[float(best.score)],
        target_ssim_min=ssim_min,
        clean_correct=clean_correct,
        defender_answers=[a or "" for a in answers],
        attempts=json.dumps(attempts),
    )
    return out, None


def implant_distractors(rows: pl.DataFrame, ctx: ShardContext) -> tuple[pl.DataFrame, pl.DataFrame]:
    models = {k: ctx.model(k) for k in ("judge", "inpainter", "detector", "segmenter", "defender")}
    kept, rejects = [], []
    for row in rows.iter_rows(named=True):
        out, why = implant_row(row, ctx, models)
        if out is not None:
            kept.append(out)
        else:
            rejects.append(R.reject(row, ctx.stage, why[0], why[1]))
    return R.frame(kept, R.IMPLANT), R.frame(rejects, R.REJECTS)
