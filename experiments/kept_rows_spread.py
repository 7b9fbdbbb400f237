"""How many AOT-SFT rows the embedded default keeps, per source seed, on this machine's kernels.

    python experiments/kept_rows_spread.py [--seeds 0 1 2 3 4 5] [--root DIR] [--out experiments/results]

Runs the default bootstrap (``--preset synthetic``, in-process) once per source seed and prints
one row per seed: filtered, right on clean, kept, the reject reasons, the AOT-SFT version and a
hash of its parts, with the kernel family the learned stages ran on (stages/version.py). Run it
on several machines, or here under ``ATEN_CPU_CAPABILITY=avx2`` (torch's AVX2 kernels on an
AVX-512 CPU), and compare: the source and extend stages must agree to the byte, the rows Stage 2
keeps may not (docs/reproducibility.md). Writes ``OUT/kept_rows_spread_<cpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--root", default=None, help="store root (default: a temporary folder)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    from experiments.common import environment
    from stages.registry import resolve_config
    from stages.runner import run_bootstrap
    from stages.version import kernel_family
    from storage import ShardStore, content_hash

    store = ShardStore(args.root or tempfile.mkdtemp(prefix="aot-spread-"))
    kernels = kernel_family()
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        cfg = resolve_config("synthetic", [f"source.seed={seed}", *args.overrides])
        s = {x.stage: x for x in run_bootstrap(store, cfg)}
        m = {stage: store.manifest(x.version) for stage, x in s.items()}
        rows.append(
            {
                "seed": seed,
                "filtered": s["filter"].rows,
                "right_on_clean": s["filter"].rows - s["implant"].reasons.get("defender_wrong_on_clean", 0),
                "kept": s["export"].rows,
                "implant_reasons": s["implant"].reasons,
                "export": s["export"].version,
                "parts": {st: content_hash([p.sha256 for p in mm.parts]) for st, mm in m.items()},
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        r = rows[-1]
        print(
            f"seed {seed}: filtered {r['filtered']}, right on clean {r['right_on_clean']}, kept {r['kept']} "
            f"({', '.join(f'{k} {v}' for k, v in r['implant_reasons'].items())}); export {r['export']}, "
            f"parts {r['parts']['export']}, {r['seconds']} s",
            flush=True,
        )
    kept = [r["kept"] for r in rows]
    summary = {
        "kept_mean": statistics.fmean(kept),
        "kept_sd": statistics.stdev(kept) if len(kept) > 1 else 0.0,
        "kept_min": min(kept),
        "kept_max": max(kept),
    }
    print(
        f"\nkernels {kernels}: kept {summary['kept_mean']:.1f} ± {summary['kept_sd']:.1f} "
        f"(min {summary['kept_min']}, max {summary['kept_max']}) over seeds {args.seeds}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = kernels["cpu"].replace(" ", "-").lower()
    path = out / f"kept_rows_spread_{tag}.json"
    path.write_text(json.dumps({"info": environment(kernels=kernels), "summary": summary, "results": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
