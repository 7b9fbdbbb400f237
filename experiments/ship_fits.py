"""Fit a preset's tiny editor and warm its Stage 2 defender afresh, and ship them with the code (models/fitted).

    python experiments/ship_fits.py                      # the embedded default (synthetic preset)
    python experiments/ship_fits.py --parts defender     # only the warmed Stage 2 defender
    python experiments/ship_fits.py --set attacker.model.editor_fit.steps=400

The synthetic preset's attacker is the tiny FLUX.1-Kontext editor with a VAE fitted to world
images and a transformer fitted to world edits, and its Stage 2 defender is the tiny Qwen2.5-VL
after a supervised warm-up on world scenes: minutes on a 2-core CPU, once per machine, and bytes
that differ with the machine's kernels and thread count. Shipped, they cost nothing and are the
same files everywhere. This script runs the fits in an empty model cache with shipped fits ignored
(``AOT_NO_SHIPPED_FITS``), then copies each into models/fitted/<kind>/ under the hash of its key
without its machine and code fields (`models.cache.shipped_fit_path`, what the loaders look up).
Each keeps its whole key (safetensors metadata, or ``aot_fit_key.json`` in a defender's folder):
which code and machine made it. Run it again after changing a fit's settings or code (the
warm-up's trainer included); otherwise a changed setting just fits locally, and changed code keeps
using the shipped bytes, whose hash is part of the version ids of the stages that use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> list[dict]:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="synthetic", help="pipeline preset whose attacker's fits to ship")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--parts", default="editor,defender", help="what to fit and ship: editor (its VAE and transformer), defender"
    )
    args = ap.parse_args(argv)
    from safetensors import safe_open

    from models.cache import SHIPPED_FITS, shipped_fit_path
    from models.editor import load_editor
    from stages.registry import load, resolve_config
    from stages.warm_defender import KEY_FILE, SHIPPED_KIND

    cfg = resolve_config(args.preset, args.overrides)
    parts = set(args.parts.split(","))
    if not parts or parts - {"editor", "defender"}:
        raise SystemExit(f"--parts {args.parts!r}: name editor, defender or both")
    rows, seconds = [], {}

    def ship(kind: str, source: Path, key: dict, folder: bool) -> None:
        dest = shipped_fit_path(kind, key, "" if folder else ".safetensors")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if folder:  # a saved model: replaced whole
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(source, dest)
        else:
            shutil.copyfile(source, dest)
        weights = dest / "model.safetensors" if folder else dest
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        rows.append({"kind": kind, "file": str(dest.relative_to(SHIPPED_FITS.parents[1])), "sha256": sha})

    with tempfile.TemporaryDirectory(prefix="aot-ship-fits-") as cache:
        before = {k: os.environ.get(k) for k in ("AOT_CACHE", "AOT_NO_SHIPPED_FITS")}
        os.environ.update(AOT_CACHE=cache, AOT_NO_SHIPPED_FITS="1")
        try:
            if "editor" in parts:
                t0 = time.perf_counter()
                load_editor(cfg.attacker.model)
                seconds["editor"] = time.perf_counter() - t0
            if "defender" in parts:
                t0 = time.perf_counter()
                load("defender", cfg.model_spec("defender"))
                seconds["defender"] = time.perf_counter() - t0
        finally:
            for k, v in before.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for kind in ("tiny-vae", "tiny-editor"):
            for fitted in sorted((Path(cache) / kind).glob("*.safetensors")):
                with safe_open(str(fitted), "pt") as f:
                    ship(kind, fitted, json.loads(f.metadata()["aot_fit_key"]), folder=False)
        for warmed in sorted((Path(cache) / "warm-defenders").glob(f"*/{KEY_FILE}")):
            ship(SHIPPED_KIND, warmed.parent, json.loads(warmed.read_text()), folder=True)
    if not rows:
        raise SystemExit(
            "the preset fits nothing (no attacker vae_fit/editor_fit, no tiny Stage 2 defender with a warmup): "
            "nothing to ship"
        )
    print(", ".join(f"{part} fitted in {s:.1f} s" for part, s in seconds.items()))
    print(f"{'kind':<14} {'sha256[:16]':<17} file")
    for r in rows:
        print(f"{r['kind']:<14} {r['sha256']:<17} {r['file']}")
    return rows


if __name__ == "__main__":
    main()
