"""Asking a model MCQs and scoring its answers: the one loop every evaluation uses, and the
greedy accuracy a trainer checks on held-back examples. No benchmark reader here, so a trainer
that imports it does not hash the readers into its versions."""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from models.mcq import extract_choice
from models.roles import seeds_each_row


def ask(
    model,
    images: list,
    prompts: list[str],
    *,
    temperature: float = 0.0,
    seed: int = 0,
    seeds: list[int] | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    on_answer: Callable[[int, str], None] | None = None,
    prefetch: int = 1,
) -> list[str]:
    """The model's answer to every (image, prompt), ``batch_size`` per ``generate`` call: the
    one loop through which every evaluation here asks a model. ``seeds`` (one per prompt) go to a
    model that seeds each request (``generate(..., seeds=)``, an endpoint); any other model gets
    the batch's first seed. ``on_answer(i, text)`` hears each answer as its batch finishes (an
    answer cache: an interrupted evaluation keeps what it got). ``prefetch`` (0 or False: off): a
    model with ``prepare(images, prompts)`` and ``generate(..., encoded=)`` gets its next
    ``prefetch`` batches prepared in as many worker threads while it answers this one (the answers
    are the same: only when the inputs are made changes). More than one pays where preparing a
    batch takes longer than answering it (large images on a fast card): the image processor's
    resizing and array work release the GIL, so the workers run on separate cores."""
    params = inspect.signature(model.generate).parameters
    per_request = seeds is not None and seeds_each_row(model)
    prepare = getattr(model, "prepare", None) if prefetch and "encoded" in params else None
    starts = list(range(0, len(prompts), batch_size))
    depth = max(1, int(prefetch))  # batches in preparation at once
    out: list[str] = []
    with ThreadPoolExecutor(depth, thread_name_prefix="prepare") as pool:

        def ahead(j: int):  # the j-th batch's inputs, made in a worker
            if prepare is None or j >= len(starts):
                return None
            k = starts[j]
            return pool.submit(prepare, images[k : k + batch_size], prompts[k : k + batch_size])

        # batches 0..prefetch-1 start at once; each answered batch starts the next one
        queued = [f for f in (ahead(j) for j in range(depth)) if f is not None]
        for j, k in enumerate(starts):
            kw = {"temperature": temperature}
            if seeds is not None:
                batch_seeds = seeds[k : k + batch_size]
                kw.update({"seeds": batch_seeds, "seed": batch_seeds[0]} if per_request else {"seed": batch_seeds[0]})
            else:
                kw["seed"] = seed
            if queued:
                kw["encoded"] = queued.pop(0).result()  # a failed prepare raises here, as generate would
                nxt = ahead(j + depth)
                if nxt is not None:
                    queued.append(nxt)
            texts = model.generate(images[k : k + batch_size], prompts[k : k + batch_size], **kw)
            for i, text in enumerate(texts, start=k):
                if on_answer:
                    on_answer(i, text)
            out += texts
            if on_batch:
                on_batch(len(texts))
    return out


def answer_items(model, examples: list, batch: int = 64) -> list[dict]:
    """Greedy answers to MCQ examples (``id``, ``image``, ``prompt`` as the model sees it,
    ``answer``, ``num_options``): response, parsed letter (boxed only), right or not."""
    texts = ask(model, [e.image for e in examples], [e.prompt for e in examples], batch_size=batch)
    rows = []
    for e, t in zip(examples, texts):
        ext = extract_choice(t, e.num_options)
        rows.append(
            {
                "id": e.id,
                "answer": e.answer,
                "response": t,
                "prediction": ext.letter,
                "correct": ext.letter == e.answer,
                "strict_format": ext.strict,
            }
        )
    return rows


def mcq_accuracy(model, examples: list, batch: int = 64) -> dict:
    """Greedy accuracy, strict-format rate and unparsed rate of a model on MCQ examples."""
    rows = answer_items(model, examples, batch)
    n = max(1, len(rows))
    return {
        "accuracy": sum(r["correct"] for r in rows) / n,
        "strict_format": sum(r["strict_format"] for r in rows) / n,
        "unparsed": sum(r["prediction"] is None for r in rows) / n,
        "n": len(rows),
    }


def chance(examples: list) -> float:
    """Expected accuracy of guessing uniformly among each example's options."""
    return sum(1.0 / e.num_options for e in examples) / max(1, len(examples))
