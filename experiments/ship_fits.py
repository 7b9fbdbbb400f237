"""Fit a preset's tiny editor afresh and ship its fits with the code (models/fitted).

    python experiments/ship_fits.py                      # the embedded default (synthetic preset)
    python experiments/ship_fits.py --set attacker.model.editor_fit.steps=400

The synthetic preset's attacker is the tiny FLUX.1-Kontext editor with a VAE fitted to world
images and a transformer fitted to world edits: minutes on a 2-core CPU, once per machine, and
bytes that differ with the machine's kernels and thread count. Shipped, they cost nothing and are
the same file everywhere. This script runs both fits in an empty model cache with shipped fits
ignored (``AOT_NO_SHIPPED_FITS``), then copies each into models/fitted/<kind>/ under the hash of
its key without its machine fields (`models.cache.shipped_fit_path`, what the editor looks up).
The file's metadata keeps the whole key, kernels included: which machine made it. Run it again after changing a
fit's settings or code (``VAE_FIT_REVISION``); otherwise a changed key just fits locally, as before.
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
    args = ap.parse_args(argv)
    from safetensors import safe_open

    from models.cache import SHIPPED_FITS, shipped_fit_path
    from models.editor import load_editor
    from stages.registry import resolve_config

    cfg = resolve_config(args.preset, args.overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aot-ship-fits-") as cache:
        before = {k: os.environ.get(k) for k in ("AOT_CACHE", "AOT_NO_SHIPPED_FITS")}
        os.environ.update(AOT_CACHE=cache, AOT_NO_SHIPPED_FITS="1")
        try:
            t0 = time.perf_counter()
            load_editor(cfg.attacker.model)
            seconds = time.perf_counter() - t0
        finally:
            for k, v in before.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for kind in ("tiny-vae", "tiny-editor"):
            for fitted in sorted((Path(cache) / kind).glob("*.safetensors")):
                with safe_open(str(fitted), "pt") as f:
                    key = json.loads(f.metadata()["aot_fit_key"])
                dest = shipped_fit_path(kind, key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fitted, dest)
                sha = hashlib.sha256(dest.read_bytes()).hexdigest()[:16]
                rows.append({"kind": kind, "file": str(dest.relative_to(SHIPPED_FITS.parents[1])), "sha256": sha})
    if not rows:
        raise SystemExit("the preset's attacker fits nothing (no vae_fit/editor_fit): nothing to ship")
    print(f"fitted in {seconds:.1f} s")
    print(f"{'kind':<12} {'sha256[:16]':<17} file")
    for r in rows:
        print(f"{r['kind']:<12} {r['sha256']:<17} {r['file']}")
    return rows


if __name__ == "__main__":
    main()
