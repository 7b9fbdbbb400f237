"""Evaluate a defender on benchmark items under a protocol, with a resumable answer cache.

Protocols:
- ``strict`` (ours): options shuffled with a seed per item (the permutation is recorded), the
  METHOD.md MCQ prompt, boxed-only parsing with "unparsed" counted separately (never guessed),
  greedy or sampled with n trials (accuracy averaged over trials).
- ``paper`` (the AOT authors' evaluation, for comparison): options as in the file (V*: the
  answer always first, "A"), a parser that takes the first A-D character anywhere, temperature 0
  and 3 trials that must all be right.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from evaluation.answers import ask
from evaluation.readers import Item
from models.mcq import YES_NO_PROMPT, YES_NO_WORD, extract_choice, extract_yes_no, format_prompt, letters
from models.progress import StepProgress
from storage import content_hash

_FIRST_ABCD = re.compile(r"[ABCD]")


@dataclass(frozen=True)
class Protocol:
    name: str
    shuffle: bool
    trials: int
    temperature: float
    all_trials_right: bool
    seed: int = 0


STRICT = Protocol("strict", shuffle=True, trials=1, temperature=0.0, all_trials_right=False)
PAPER = Protocol("paper", shuffle=False, trials=3, temperature=0.0, all_trials_right=True)
PROTOCOLS = {"strict": STRICT, "paper": PAPER}


def present(item: Item, protocol: Protocol) -> tuple[str, str, list[int] | None]:
    """(prompt, the correct answer as shown, the option permutation or None)."""
    if item.options is None:
        return f"{item.question}\n{YES_NO_PROMPT}", item.answer, None
    n = len(item.options)
    truth = letters(n).index(item.answer)
    perm = list(range(n))
    if protocol.shuffle:
        seed = int(content_hash({"item": item.id, "seed": protocol.seed}, 15), 16)
        perm = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    shown = [item.options[i] for i in perm]
    return format_prompt(item.question, shown), letters(n)[perm.index(truth)], perm


def parse(text: str, item: Item, protocol: Protocol) -> str | None:
    if item.options is None:
        if protocol.name == "paper":  # the authors' parser: the first yes/no word anywhere
            m = YES_NO_WORD.search(text)
            return m.group(1).lower() if m else None
        return extract_yes_no(text)
    if protocol.name == "paper":
        m = _FIRST_ABCD.search(text)
        return m.group(0) if m else None
    return extract_choice(text, len(item.options)).letter


class AnswerCache:
    """Append-only JSONL of model answers, keyed by (model, prompt, image, trial, temperature):
    an interrupted evaluation continues without asking again."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.answers: dict[str, str] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.answers[rec["key"]] = rec["text"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a line torn by a crash: that answer is simply asked again

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, text: str) -> None:
        self.answers[key] = text
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "text": text}) + "\n")


def image_digest(image) -> str:
    """sha256 of an image's every pixel (with its size and mode): two images that differ anywhere,
    in one pixel of a small edited region say, never share a cached answer."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def item_key(item: Item) -> str:
    """An item's identity across benchmarks: ids repeat between benchmarks (HRBench and POPE both
    number from 0), so every grouping and cache key carries the benchmark."""
    return f"{item.benchmark}/{item.id}"


def trial_seed(item: Item, trial: int, protocol: Protocol) -> int:
    """Each (item, trial) its own sampling seed: sampled trials are independent draws."""
    return int(content_hash({"item": item_key(item), "trial": trial, "seed": protocol.seed}, 8), 16)


def evaluate(
    model,
    model_id: str,
    items: list[Item],
    protocol: Protocol,
    cache: AnswerCache | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    label: str | None = None,
    prefetch: int = 1,
) -> list[dict]:
    """Per-item results. ``model`` implements ``generate(images, prompts, temperature=, seed=)``
    (and ``seeds=``, one per prompt, where it can seed each request: an endpoint). The cache key
    is (model, benchmark, item, prompt, the full image, protocol, trial, sampling settings).
    ``label``: say a progress line about every tenth of the answers still to get (stderr and the
    Prefect run log, models/progress.py), ``LABEL: answer N/T, E s, ~R s left``: a benchmark of
    8K images times 3 trials runs for a long while. ``prefetch``: see evaluation.answers.ask."""
    cache = cache or AnswerCache(None)
    sampling = {"temperature": protocol.temperature, "protocol": protocol_dict(protocol)}
    jobs = []
    for item in items:
        prompt, truth, perm = present(item, protocol)
        digest = image_digest(item.image)
        for t in range(protocol.trials):
            key = content_hash(
                {"model": model_id, "item": item_key(item), "prompt": prompt, "image": digest, "trial": t, **sampling},
                32,
            )
            jobs.append((item, prompt, t, key))
    todo = [j for j in jobs if cache.get(j[3]) is None]
    if label and todo:
        progress, done, inner = StepProgress(label, len(todo), unit="answer"), [0], on_batch

        def on_batch(n: int) -> None:
            done[0] += n
            progress(done[0])
            if inner:
                inner(n)

    # One trial per generate call, so a model that takes one seed per call still gives every
    # trial its own; an endpoint gets each request's own seed.
    for t in sorted({j[2] for j in todo}):
        trial = [j for j in todo if j[2] == t]
        texts = ask(
            model,
            [j[0].image for j in trial],
            [j[1] for j in trial],
            temperature=protocol.temperature,
            seeds=[trial_seed(j[0], t, protocol) for j in trial],
            batch_size=batch_size,
            on_batch=on_batch,
            on_answer=lambda i, text, trial=trial: cache.put(trial[i][3], text),
            prefetch=prefetch,
        )
    rows = []
    by_item: dict[str, list] = {}
    for item, prompt, t, key in jobs:
        by_item.setdefault(item_key(item), []).append(cache.get(key))
    for item in items:
        prompt, truth, perm = present(item, protocol)
        texts = by_item[item_key(item)]
        parsed = [parse(x, item, protocol) for x in texts]
        hits = [p == truth for p in parsed]
        score = float(all(hits)) if protocol.all_trials_right else sum(hits) / len(hits)
        rows.append(
            {
                "id": item.id,
                "benchmark": item.benchmark,
                "categories": item.categories,
                "truth": truth,
                "permutation": perm,
                "responses": texts,
                "parsed": parsed,
                "score": score,
                "unparsed": sum(p is None for p in parsed) / len(parsed),
                "meta": item.meta,
            }
        )
    return rows


def _prf(rows: list[dict]) -> dict:
    """POPE's precision, recall and F1 with "yes" as positive, over every trial's answer. An
    unparsed answer is a prediction of "not yes" (a missed positive), as VLMEvalKit's POPE rating
    counts it; accuracy is the rows' score, where an unparsed answer is simply wrong."""
    tp = fp = fn = 0
    for r in rows:
        for pred in r["parsed"]:
            if pred == "yes":
                tp, fp = tp + (r["truth"] == "yes"), fp + (r["truth"] != "yes")
            elif r["truth"] == "yes":
                fn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": sum(r["score"] for r in rows) / max(1, len(rows)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n": len(rows),
        "unparsed": sum(r["unparsed"] for r in rows) / max(1, len(rows)),
    }


def metrics(rows: list[dict]) -> dict:
    """Per benchmark: accuracy (and per category), unparsed rate; POPE's P/R/F1; HallusionBench's
    aAcc, fAcc, qAcc."""
    out: dict = {}
    for bench in sorted({r["benchmark"] for r in rows}):
        rs = [r for r in rows if r["benchmark"] == bench]
        m = {
            "n": len(rs),
            "accuracy": sum(r["score"] for r in rs) / len(rs),
            "unparsed": sum(r["unparsed"] for r in rs) / len(rs),
        }
        cats: dict[str, list] = {}
        for r in rs:
            for c in r["categories"]:
                cats.setdefault(c, []).append(r)
        m["categories"] = {c: sum(r["score"] for r in v) / len(v) for c, v in sorted(cats.items())}
        if bench == "pope":
            m.update(_prf(rs))
            m["categories"] = {c: _prf(v) for c, v in sorted(cats.items())}
        if bench == "hallusionbench":
            m["aAcc"] = m["accuracy"]
            figs: dict[str, list] = {}
            qs: dict[str, list] = {}
            for r in rs:
                figs.setdefault(r["meta"]["figure"], []).append(r["score"] == 1.0)
                qs.setdefault(r["meta"]["question"], []).append(r["score"] == 1.0)
            m["fAcc"] = sum(all(v) for v in figs.values()) / len(figs)
            m["qAcc"] = sum(all(v) for v in qs.values()) / len(qs)
        out[bench] = m
    return out


def protocol_dict(p: Protocol) -> dict:
    return asdict(p)
