"""Benchmark of the default bootstrap run: wall time per stage, Prefect overhead per shard, peak memory.

Measures, in one run on this machine:
1. `aot run` as on a fresh machine, in a subprocess with a fresh root, a fresh Prefect home (the
   ephemeral server's first start and SQLite creation included) and an empty model cache
   (``$AOT_CACHE``: Stage 2's base defender is warmed up here): wall time and the peak RSS of the
   whole process tree (CLI + Prefect server), sampled every 50 ms.
2. `aot run` cold again on another fresh root and Prefect home, the warmed defender now cached.
3. `aot run` again on that root: wall time, and that no shard was recomputed.
4. In one warm process: the pure serial runner (the baseline, no Prefect) and the Prefect
   flow, each on a fresh root, per stage; Prefect's overhead per shard task is
   (Prefect stage time - pure stage time) / shards.

Targets (issue 2): whole default run <= 180 s (on a fresh machine) and <= 4 GiB peak RSS.
Prints a table and writes experiments/results/bootstrap.json.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "results" / "bootstrap.json"


def run_tree(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run a command; sample the summed RSS of it and all its descendants."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in procs if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak[0] / 2**30, "output": out}


def stage_seconds(output: str) -> dict:
    out = {}
    for line in output.splitlines():
        m = re.match(
            r"^(source|extend|filter|implant|export)\s+([0-9a-f]{16})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)",
            line,
        )
        if m:
            out[m.group(1)] = {
                "version": m.group(2),
                "shards": int(m.group(6)),
                "recomputed": int(m.group(7)),
                "seconds": float(m.group(8)),
            }
    return out


def in_process(tmp: Path) -> dict:
    os.environ["PREFECT_HOME"] = str(tmp / "home-inproc")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sys.path.insert(0, str(REPO))
    from config import load_config
    from flows.bootstrap import bootstrap
    from stages.runner import run_bootstrap
    from storage import ShardStore

    cfg = load_config("synthetic")
    run_bootstrap(
        ShardStore(str(tmp / "warm-pure")), load_config("synthetic", {"source": {"num_scenes": 4, "shard_size": 4}})
    )
    bootstrap(
        root=str(tmp / "warm-prefect"), overrides={"source.num_scenes": 4, "source.shard_size": 4}, progress=False
    )
    t0 = time.perf_counter()
    pure = {s.stage: s.to_dict() for s in run_bootstrap(ShardStore(str(tmp / "pure")), cfg)}
    pure_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    pref = {s["stage"]: s for s in bootstrap(root=str(tmp / "prefect"), progress=False)["stages"]}
    pref_total = time.perf_counter() - t0
    rows = []
    for name in pure:
        p, q = pure[name], pref[name]
        assert p["version"] == q["version"], "Prefect and the pure runner disagree on a version id"
        rows.append(
            {
                "stage": name,
                "shards": q["shards"],
                "pure_s": p["seconds"],
                "prefect_s": q["seconds"],
                "overhead_per_shard_s": (q["seconds"] - p["seconds"]) / q["shards"],
            }
        )
    return {
        "stages": rows,
        "pure_total_s": pure_total,
        "prefect_total_s": pref_total,
        "overhead_per_shard_s": (pref_total - pure_total) / sum(r["shards"] for r in rows),
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="aot-bench-"))
    os.environ["AOT_CACHE"] = str(tmp / "model-cache")  # empty: as on a fresh machine; the in-process part reuses it
    env = dict(os.environ, PREFECT_HOME=str(tmp / "home-fresh"), PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)
    aot = str(Path(sys.executable).parent / "aot")
    fresh = run_tree([aot, "run", "--root", str(tmp / "data-fresh"), "--no-progress"], env, tmp)
    env["PREFECT_HOME"] = str(tmp / "home-cli")
    cold = run_tree([aot, "run", "--root", str(tmp / "data"), "--no-progress"], env, tmp)
    warm = run_tree([aot, "run", "--root", str(tmp / "data"), "--no-progress"], env, tmp)
    cold_stages, warm_stages = stage_seconds(cold["output"]), stage_seconds(warm["output"])
    assert stage_seconds(fresh["output"])["export"]["version"] == cold_stages["export"]["version"]
    assert sum(s["recomputed"] for s in warm_stages.values()) == 0
    inproc = in_process(tmp)
    from importlib.metadata import version

    import polars
    import torch

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "card": "none (CPU)",
        },
        "versions": {"prefect": version("prefect"), "torch": torch.__version__, "polars": polars.__version__},
        "fresh_machine_cli": {
            "seconds": fresh["seconds"],
            "peak_rss_gib": fresh["peak_rss_gib"],
            "stages": stage_seconds(fresh["output"]),
            # issue 23: the one-time warm-up must say where it is (step, loss, time left) in the CLI
            "warmup_progress": [ln for ln in fresh["output"].splitlines() if "warm-up: step" in ln],
        },
        "cold_cli": {"seconds": cold["seconds"], "peak_rss_gib": cold["peak_rss_gib"], "stages": cold_stages},
        "warm_cli": {"seconds": warm["seconds"], "peak_rss_gib": warm["peak_rss_gib"], "stages": warm_stages},
        "in_process": inproc,
        "targets": {"cold_seconds_max": 180, "peak_rss_gib_max": 4.0},
    }
    result["targets"]["met"] = fresh["seconds"] <= 180 and max(fresh["peak_rss_gib"], cold["peak_rss_gib"]) <= 4.0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))

    print(
        f"\n`aot run` on the embedded default ({os.cpu_count()} CPUs, prefect {version('prefect')}, "
        f"torch {torch.__version__})"
    )
    print(f"{'run':<22}{'wall s':>9}{'peak RSS GiB':>14}")
    print(f"{'fresh machine':<22}{fresh['seconds']:>9.1f}{fresh['peak_rss_gib']:>14.2f}")
    lines = result["fresh_machine_cli"]["warmup_progress"]
    print(f"  warm-up progress lines on a fresh machine: {len(lines)}" + (f", last: {lines[-1]}" if lines else ""))
    print(f"{'cold (fresh server)':<22}{cold['seconds']:>9.1f}{cold['peak_rss_gib']:>14.2f}")
    print(f"{'warm (all cached)':<22}{warm['seconds']:>9.1f}{warm['peak_rss_gib']:>14.2f}")
    print(f"\n{'stage':<10}{'shards':>7}{'pure s':>9}{'prefect s':>11}{'overhead/shard s':>18}")
    for r in inproc["stages"]:
        print(
            f"{r['stage']:<10}{r['shards']:>7}{r['pure_s']:>9.2f}{r['prefect_s']:>11.2f}{r['overhead_per_shard_s']:>18.3f}"
        )
    print(
        f"{'total':<10}{'':>7}{inproc['pure_total_s']:>9.2f}{inproc['prefect_total_s']:>11.2f}"
        f"{inproc['overhead_per_shard_s']:>18.3f}"
    )
    print(f"\ntargets: fresh-machine run <= 180 s and <= 4 GiB: {'met' if result['targets']['met'] else 'NOT met'}")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
