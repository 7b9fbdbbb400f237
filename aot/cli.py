"""``aot``: run the pipeline, run one stage, list/show/gc versions, import real data.

Errors in the user's hands (config, missing versions, bad files) print one line naming the fix
and exit 2; no stack trace is the first explanation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_ROOT = os.environ.get("AOT_ROOT", "./aot-data")


def _dotted(pairs: list[str], what: str) -> dict:
    from config import dotted_pairs

    return dotted_pairs(pairs, what)


def _nested(dotted: dict) -> dict:
    from config import nest_dotted

    return nest_dotted(dotted)


def storage_options(args) -> dict:
    opts = json.loads(os.environ.get("AOT_STORAGE_OPTIONS", "{}") or "{}")
    opts.update(_nested(_dotted(args.storage_option, "--storage-option")))
    return opts


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    p.add_argument(
        "--root",
        default=DEFAULT_ROOT,
        help="storage root: a folder or any fsspec URL (s3://bucket/prefix); default ./aot-data or $AOT_ROOT",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for the root, e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000 "
        "(also $AOT_STORAGE_OPTIONS as JSON; put credentials in the usual env vars, not here)",
    )
    if config:
        p.add_argument("--preset", default="synthetic", help="config preset name or a .yaml path (default: synthetic)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set extend.canvas_scale=1.75 (repeatable)",
        )
        p.add_argument("--refresh-cache", action="store_true", help="ignore Prefect's cached shard results")
        p.add_argument("--no-prefect", action="store_true", help="run stages serially in this process, without Prefect")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--verbose", action="store_true", help="show Prefect's INFO logs")
        p.add_argument(
            "--report-to",
            metavar="LIST",
            help="where trainers' per-step rows go besides the versions, comma-separated: tensorboard "
            "(default: event files in each version's folder; `tensorboard --logdir ROOT`), mlflow "
            "(the server MLFLOW_TRACKING_URI names), wandb (offline runs under WANDB_DIR, default ./wandb) "
            "or none (shortcut for --set tracking.report_to=[...])",
        )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aot", description="Adversarial Opponent Training pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the bootstrap DAG (source -> extend -> filter -> implant -> export)")
    _common(p)
    p.add_argument("--source", help="start from this source version (e.g. one made by `aot import`)")
    p.add_argument(
        "--scenes", type=int, help="number of synthetic source scenes (shortcut for --set source.num_scenes=N)"
    )
    p.add_argument(
        "--until",
        choices=["export", "coevolution"],
        default="export",
        help="export: the AOT-SFT bootstrap (default); coevolution: then the whole AOT loop "
        "(coevolution.iterations rounds of attacker, curriculum, defender, evaluation) and its report",
    )
    p.add_argument("--report", help="with --until coevolution: write the report here (.md or .html)")
    p.add_argument(
        "--task-runner",
        help="where the shards run: threads (default), dask (a local cluster), dask://HOST:PORT, ray, ray://HOST:PORT",
    )
    p = sub.add_parser("serve", help="start the Prefect UI with every deployment registered and a worker (one command)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--no-worker", action="store_true", help="register the deployments but start no worker")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)  # tests: written with the API URL once ready
    p = sub.add_parser("report", help="write the report of a coevolution run (markdown or HTML, self-contained)")
    _common(p, config=False)
    p.add_argument("run", help="coevolution version id (aot ls --stage coevolution)")
    p.add_argument("--out", help="file to write (.md or .html); default: print markdown")
    p = sub.add_parser("stage", help="run one stage on an input version")
    p.add_argument("name", help="source, extend, filter, implant or export")
    p.add_argument("--input", help="input version id (not for source)")
    _common(p)
    p = sub.add_parser("ls", help="list committed versions")
    _common(p, config=False)
    p.add_argument("--dataset")
    p.add_argument("--stage")
    p = sub.add_parser("show", help="show one version: counts, reasons, parts, config")
    _common(p, config=False)
    p.add_argument("version")
    p.add_argument("--rejects", type=int, default=5, help="how many reject rows to print")
    p = sub.add_parser("gc", help="remove temporary files, unreferenced parts and torn shards")
    _common(p, config=False)
    p.add_argument("--min-age", type=float, default=3600.0, help="leave what was written within this many seconds")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, and what is kept and why")
    p.add_argument(
        "--drop-unfinished",
        action="store_true",
        help="also remove uncommitted versions' finished shards (by default kept: a rerun reuses them)",
    )
    p = sub.add_parser("verify", help="check committed versions against their manifests (sizes, sha256, checksums)")
    _common(p, config=False)
    p.add_argument("versions", nargs="*", help="version ids (default with --all: every committed version)")
    p.add_argument("--all", action="store_true", help="every committed version under the root")
    p.add_argument("--images", action="store_true", help="also decode every image cell")
    p = sub.add_parser("repair", help="recompute a damaged version's broken shards from its recorded inputs")
    _common(p, config=False)
    p.add_argument("version")
    p = sub.add_parser("import", help="import images + V*-style records as a source version")
    _common(p, config=False)
    p.add_argument("--records", required=True, help="JSONL or Parquet file of records")
    p.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--dataset", default="imported")
    p.add_argument("--box-format", choices=["xyxy", "xywh"], default="xyxy")
    p.add_argument(
        "--preset", default="synthetic", help="config preset (import reads source.shard_size, source.max_image_pixels)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("train-defender", help="train the defender (SFT warm-up or DAPO) on a dataset version")
    _common(p)
    p.add_argument("--data", required=True, help="dataset version (source, filter or AOT-SFT export)")
    p.add_argument("--init", help="defender version to start from (default: defender.model, e.g. tiny random init)")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="VERSION",
        help="a further dataset version trained on beside --data (repeatable; the loop's earlier "
        "curricula under coevolution.curriculum_replay)",
    )
    p.add_argument(
        "--mode",
        choices=["sft", "dapo", "warmup"],
        default="sft",
        help="sft: defender.warmup's settings, supervised; dapo: defender.rl's; warmup: defender.warmup "
        "in its own mode (defender 0 of the co-evolution)",
    )
    p = sub.add_parser("eval-defender", help="accuracy of a defender version on a dataset version")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="defender version")
    p.add_argument("--data", required=True, help="dataset version")
    p = sub.add_parser(
        "train-attacker", help="train the attacker: cold start (sft) or Flow-GRPO (grpo) against a defender"
    )
    _common(p)
    p.add_argument(
        "--data",
        required=True,
        help="dataset version: AOT-SFT export for sft; any version with questions "
        "and target boxes (source, filter, export) for grpo",
    )
    p.add_argument("--defender", help="frozen defender version whose failures are the reward (grpo)")
    p.add_argument("--init", help="attacker version to start from (e.g. the cold start); default: attacker.model")
    p.add_argument("--mode", choices=["sft", "grpo"], default="sft")
    p = sub.add_parser("curriculum", help="the frozen attacker edits a dataset version into a defender curriculum")
    _common(p)
    p.add_argument("--attacker", required=True, help="attacker version")
    p.add_argument("--data", required=True, help="dataset version to attack (source, filter or export)")
    p.add_argument("--defender", required=True, help="frozen defender version that scores each edit's efficacy")
    p = sub.add_parser("eval", help="evaluate a defender on benchmark files (V*, HRBench, POPE, HallusionBench)")
    _common(p, config=False)
    p.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="vstar=FOLDER, hrbench4k=TSV, hrbench8k=TSV, pope=TSV, hallusionbench=TSV (repeatable)",
    )
    p.add_argument(
        "--benchmark-images",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="the images folder of a benchmark whose file names images by path (HallusionBench's published "
        "layout); default: the file's own folder",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="also run the synthetic robustness suite on N held-out scenes (clean vs attacked)",
    )
    p.add_argument(
        "--endpoint",
        help="evaluate a model behind an OpenAI-compatible chat endpoint (e.g. a vLLM "
        "server at http://HOST:8000/v1); key from $OPENAI_API_KEY",
    )
    p.add_argument("--endpoint-model", help="the endpoint's model name")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the endpoint")
    p.add_argument("--checkpoint", help="defender version to evaluate (default: the preset's models.defender)")
    p.add_argument("--preset", default="synthetic", help="config preset: its models.defender is evaluated by default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--protocol", choices=["strict", "paper"], default="strict")
    p.add_argument("--trials", type=int, help="strict protocol: answers per item (accuracy averaged; default 1)")
    p.add_argument("--temperature", type=float, help="strict protocol: sampling temperature (default 0, greedy)")
    p.add_argument("--cache", help="answer cache file (JSONL): an interrupted evaluation resumes from it")
    p.add_argument(
        "--prefetch",
        type=int,
        default=1,
        metavar="N",
        help="batches whose inputs (image resizing, patches, tokens) are made ahead in N worker threads "
        "while the model answers; more than 1 pays for large images on a fast card (same answers)",
    )
    p = sub.add_parser("models", help="model checkpoints: `aot models check --preset full`")
    p.add_argument("action", choices=["check"])
    p.add_argument("--preset", default="synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("config", help="print the resolved configuration")
    p.add_argument("--preset", default="synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = (
        {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols} if rows else {c: len(c) for c in cols}
    )
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def _reasons(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def _prefect_env(args) -> None:
    if not getattr(args, "verbose", False):
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _setup(args, overrides: dict | None = None):
    """(config, overrides, storage options, store, steps) of a command that runs stages. The
    config is resolved and checked first (a bad key or backend fails before anything starts);
    ``steps`` is the one execution seam: the stage functions in-process (``--no-prefect``) or
    the same calls as Prefect flows."""
    from stages.registry import resolve_config
    from storage import ShardStore

    overrides = overrides if overrides is not None else _dotted(args.overrides, "--set")
    if getattr(args, "report_to", None):
        overrides = {**overrides, "tracking.report_to": [t.strip() for t in args.report_to.split(",") if t.strip()]}
    cfg = resolve_config(args.preset, _nested(overrides))
    opts = storage_options(args)
    store = ShardStore(args.root, opts)
    store.check_root()  # a root that cannot be written fails now, before any model or server starts
    if args.no_prefect:
        from stages.steps import LocalSteps
        from training.distributed import init_from_env, is_main

        init_from_env()  # under torchrun: the trainers run data parallel over the ranks
        quiet = args.no_progress or not is_main()
        say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        steps = LocalSteps(store, cfg, say, on_step=_StepPrinter(quiet))
    else:
        _prefect_env(args)
        from aot.ephemeral import end_orphan, start_and_note
        from flows.steps import PrefectSteps

        orphan = end_orphan()  # a server a killed run of this Prefect home left running
        if orphan:
            print(f"ended the Prefect server (pid {orphan}) a killed earlier run left running", file=sys.stderr)
        start_and_note()

        steps = PrefectSteps(
            args.root,
            args.preset,
            overrides,
            opts,
            progress=not args.no_progress,
            refresh_cache=args.refresh_cache,
            task_runner=getattr(args, "task_runner", None),
        )
    return cfg, store, steps


def _flow_failed(exc) -> int:
    print(f"\nerror: {exc}", file=sys.stderr)
    print(exc.retry_hint(), file=sys.stderr)
    return 1


def cmd_run(args, stage: str | None = None) -> int:
    overrides = _dotted(args.overrides, "--set")
    if getattr(args, "scenes", None) is not None:
        overrides["source.num_scenes"] = args.scenes  # 0 is refused by the config check, never ignored
    cfg, store, steps = _setup(args, overrides)
    if getattr(args, "until", "export") == "coevolution":
        return _run_coevolution(args, store, steps)
    t0 = time.perf_counter()
    try:
        summaries = [steps.stage(stage, args.input)] if stage else steps.bootstrap(args.source)
    except Exception as exc:  # noqa: BLE001 - a failed Prefect flow run says how to retry it
        if hasattr(exc, "retry_hint"):
            return _flow_failed(exc)
        raise
    wall = time.perf_counter() - t0
    rows = [
        {
            "stage": s["stage"],
            "version": s["version"],
            "in": s["rows_in"],
            "kept": s["rows"],
            "rejected": s["rejected"],
            "shards": s["shards"],
            "recomputed": s["recomputed"],
            "seconds": f"{s['seconds']:.1f}",
            "reject reasons": _reasons(s["reasons"]),
        }
        for s in summaries
    ]
    print()
    _print_table(
        rows, ["stage", "version", "in", "kept", "rejected", "shards", "recomputed", "seconds", "reject reasons"]
    )
    total = sum(s["shards"] for s in summaries)
    recomputed = sum(s["recomputed"] for s in summaries)
    print()
    if recomputed == 0:
        print(f"recomputed 0 of {total} shards: every stage's output was already in the store")
    else:
        print(f"recomputed {recomputed} of {total} shards")
    last = summaries[-1]
    label = "AOT-SFT version" if last["stage"] == "export" else f"{last['stage']} version"
    print(f"{label}: {last['version']}")
    print(f"wall time: {wall:.1f} s (config: {cfg.dataset}, preset {args.preset}, root {args.root})")
    if last["stage"] == "export":
        print(f'load it: import aot; ds = aot.load_version("{args.root}", "{last["version"]}")')
        if last["rows"] == 0:
            why = next((s for s in summaries if s["rows"] == 0), last)
            print(
                f"note: the AOT-SFT version has no rows: stage {why['stage']} kept none of its {why['rows_in']} "
                f"({_reasons(why['reasons'])}); see them with aot show {why['version']}",
                file=sys.stderr,
            )
    return 0


def _run_coevolution(args, store, steps) -> int:
    t0 = time.perf_counter()
    version = steps.coevolution(args.source)
    rows = store.read(store.manifest(version)).to_dicts()
    cols = [
        "iteration",
        "attack_success_before",
        "attack_success_after",
        "defender_clean_accuracy",
        "defender_attacked_accuracy",
        "curriculum_kept",
    ]
    print()
    _print_table([{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in cols} for r in rows], cols)
    print(f"\ncoevolution run: {version}")
    if args.report:
        _write_report(store, version, args.report)
    else:
        print(f"report: aot report {version} --out report.html --root {args.root}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def _write_report(store, version: str, out: str | None) -> None:
    from stages.coevolution import render_report

    text = render_report(store, version, "html" if out and out.endswith(".html") else "md")
    if out:
        Path(out).write_text(text)
        print(f"report written: {out}")
    else:
        print(text)


def cmd_serve(args) -> int:
    from aot.serve import serve

    return serve(args.host, args.port, worker=not args.no_worker, ready_file=args.ready_file)


def cmd_report(args) -> int:
    from storage import ShardStore

    try:
        _write_report(ShardStore(args.root, storage_options(args)), args.run, args.out)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_ls(args) -> int:
    from storage import ShardStore

    store = ShardStore(args.root, storage_options(args))
    damaged: list = []
    ms = store.versions(args.dataset, args.stage, damaged=damaged)
    for d in damaged:
        print(f"damaged: {d}", file=sys.stderr)
    if not ms:
        print(f"no versions under {args.root} (make one with `aot run`)")
        return 0
    _print_table(
        [
            {
                "created": m.created,
                "dataset": m.dataset,
                "stage": m.stage,
                "version": m.version,
                "rows": m.rows,
                "rejected": m.reject_rows,
                "parents": ",".join(m.parents) or "-",
            }
            for m in ms
        ],
        ["created", "dataset", "stage", "version", "rows", "rejected", "parents"],
    )
    return 0


def cmd_show(args) -> int:
    from storage import ShardStore

    store = ShardStore(args.root, storage_options(args))
    m = store.manifest(args.version)
    print(
        f"version   {m.version}\ndataset   {m.dataset}\nstage     {m.stage}\ncreated   {m.created}\n"
        f"location  {m.uri}\ncode      {m.code_version}\nparents   {', '.join(m.parents) or '-'}\n"
        f"rows      {m.rows_in} in, {m.rows} kept, {m.reject_rows} rejected\nreasons   {_reasons(m.reasons)}\n"
        f"parts     {len(m.parts)} ({', '.join(p.path for p in m.parts[:4])}{', ...' if len(m.parts) > 4 else ''})"
    )
    print("columns   " + ", ".join(m.schema))
    print("config    " + json.dumps(m.config, sort_keys=True))
    if m.reject_rows and args.rejects:
        rej = store.read(m, "rejects").head(args.rejects)
        print(f"\nfirst {rej.height} rejects:")
        for r in rej.iter_rows(named=True):
            detail = r["detail"] if len(r["detail"]) < 160 else r["detail"][:157] + "..."
            print(f"  {r['id']}: {r['reason']}: {detail}")
    return 0


def cmd_gc(args) -> int:
    from storage import ShardStore

    store = ShardStore(args.root, storage_options(args))
    if args.dry_run:
        remove, skipped = store.gc_plan(args.min_age, args.drop_unfinished)
        for r in remove:
            print(f"would remove {store.url(r)}")
        for k in skipped:
            print(f"would keep {k}")
        print(f"{len(remove)} paths would be removed, {len(skipped)} kept")
        return 0
    removed = store.gc(min_age_seconds=args.min_age, drop_unfinished=args.drop_unfinished)
    for r in removed:
        print(f"removed {r}")
    print(f"{len(removed)} paths removed")
    return 0


def cmd_verify(args) -> int:
    from stages.maintenance import verify_store
    from storage import ShardStore

    if not args.versions and not args.all:
        print("error: name versions to verify, or --all", file=sys.stderr)
        return 2
    results = verify_store(ShardStore(args.root, storage_options(args)), args.versions or None, args.images)
    for folder, problems in results.items():
        print(f"{'ok      ' if not problems else 'DAMAGED '}{folder}")
        for problem in problems:
            print(f"          {problem}")
    bad = [f for f, p in results.items() if p]
    print(
        f"{len(results)} versions checked, {len(bad)} damaged" + (": aot repair VERSION rebuilds them" if bad else "")
    )
    return 1 if bad else 0


def cmd_repair(args) -> int:
    from stages.maintenance import repair_version
    from storage import ShardStore

    out = repair_version(ShardStore(args.root, storage_options(args)), args.version)
    what = [f"shards {out['shards']} rebuilt"] if out["shards"] else []
    if out["restored_manifest"]:
        what.append("manifest restored from its copy")
    print(f"{args.version}: " + ("; ".join(what) if what else "nothing to repair") + " (it verifies)")
    return 0


def cmd_import(args) -> int:
    from config import load_config
    from stages.importer import import_records
    from storage import ShardStore

    cfg = load_config(args.preset, _nested(_dotted(args.overrides, "--set")))
    store = ShardStore(args.root, storage_options(args))
    store.check_root()
    m = import_records(store, args.records, args.images, cfg, dataset=args.dataset, box_format=args.box_format)
    print(f"imported {m.rows_in} lines: {m.rows} kept, {m.reject_rows} rejected ({_reasons(m.reasons)})")
    if not m.rows:
        print(
            f"error: none of the {m.rows_in} lines was kept, nothing to run Stage 1 and 2 on: see why with "
            f"aot show {m.version} --root {args.root}",
            file=sys.stderr,
        )
        return 2
    print(f"source version: {m.version}  ({m.uri})")
    if m.reject_rows:
        print(f"see the rejects with: aot show {m.version} --root {args.root}")
    print(f"next: aot run --source {m.version} --preset tiny --root {args.root}")
    return 0


def cmd_defender(args) -> int:
    _, store, steps = _setup(args)
    t0 = time.perf_counter()
    if args.command == "train-defender":
        m = store.manifest(steps.train_defender(args.data, args.init, args.mode, also=args.also))
        final = {k: round(v, 4) for k, v in m.extra.get("final", {}).items() if k in ("loss", "reward", "accuracy")}
        print(f"defender version: {m.version}  (last step: {final})")
        print(f"evaluate it: aot eval-defender --checkpoint {m.version} --data VERSION --root {args.root}")
    else:
        for k, v in steps.evaluate(args.checkpoint, args.data).items():
            print(f"{k:<22}{v}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_attacker(args) -> int:
    if args.command == "train-attacker" and args.mode == "grpo" and not args.defender:
        print(
            "error: --mode grpo trains against a frozen defender: give --defender VERSION "
            "(train one with aot train-defender)",
            file=sys.stderr,
        )
        return 2
    _, store, steps = _setup(args)
    t0 = time.perf_counter()
    if args.command == "train-attacker":
        m = store.manifest(steps.train_attacker(args.data, args.defender, args.init, args.mode))
        final = {k: round(v, 4) for k, v in m.extra.get("final", {}).items() if k in ("loss", "reward", "aot/efficacy")}
        print(f"attacker version: {m.version}  (last step: {final})")
        print(
            f"generate a curriculum: aot curriculum --attacker {m.version} --data VERSION --defender VERSION "
            f"--root {args.root}"
        )
    else:
        out = steps.curriculum(args.attacker, args.data, args.defender)
        for k, v in out.items():
            print(f"{k:<22}{v}")
        print(
            f"train the defender on it: aot train-defender --data {out['version']} --mode dapo --init "
            f"{args.defender} --root {args.root}"
        )
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


class _StepPrinter:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, row: dict) -> None:
        if not self.quiet and (row["step"] % 10 == 0 or row["step"] == 1):
            shown = {
                k: round(v, 3)
                for k, v in row.items()
                if k in ("loss", "reward", "accuracy", "kept_group_fraction", "aot/integrity", "aot/efficacy")
            }
            print(f"step {row['step']}: {shown}", file=sys.stderr)


def cmd_models(args) -> int:
    from models.check import check_models
    from stages.registry import resolve_config as load_config

    cfg = load_config(args.preset, _nested(_dotted(args.overrides, "--set")))
    rows = check_models({**cfg.models, "defender.model": cfg.defender.model, "attacker.model": cfg.attacker.model})
    _print_table(
        [
            {
                "role": r.role,
                "backend": r.backend,
                "checkpoint": r.checkpoint,
                "present": "yes" if r.present else "NO",
                "size GiB": f"{r.size_gib:.1f}" if r.size_gib is not None else "-",
            }
            for r in rows
        ],
        ["role", "backend", "checkpoint", "present", "size GiB"],
    )
    missing = [r for r in rows if not r.present]
    for r in missing:
        print(f"\n{r.role}: {r.checkpoint} is missing. Fix: {r.fix}")
    return 1 if missing else 0


def _named_paths(pairs: list[str], option: str) -> dict[str, str]:
    """``["vstar=/data/vstar"]`` -> ``{"vstar": "/data/vstar"}``, naming the fix for a bad pair."""
    from evaluation.readers import READERS, FormatError

    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise FormatError(f"{option} {pair!r} is not NAME=PATH (e.g. {option} vstar=/data/vstar)")
        if name not in READERS:
            raise FormatError(f"{option} {pair!r}: unknown benchmark {name!r}; choose from {', '.join(READERS)}")
        out[name] = path
    return out


def _print_benchmark_summary(name: str, m: dict) -> None:
    """Everything a benchmark's summary holds, one line each: counts, the benchmark's own
    metrics, and accuracy per category."""
    head = [f"n={m['n']}", f"rejected={m.get('rejected', 0)}", f"unparsed={m['unparsed']:.3f}"]
    for k in ("precision", "recall", "f1", "aAcc", "fAcc", "qAcc"):
        if k in m:
            head.append(f"{k}={100 * m[k]:.1f}")
    print(f"{name}: " + "  ".join(head))
    for cat, v in m.get("categories", {}).items():
        acc = v["accuracy"] if isinstance(v, dict) else v
        rest = f"  F1 {100 * v['f1']:.1f}" if isinstance(v, dict) and "f1" in v else ""
        print(f"  {cat:<28}{100 * acc:6.1f}{rest}")


def cmd_eval(args) -> int:
    from evaluation.readers import PAPER_COLUMNS, check_layout
    from stages.benchmark import evaluate_benchmarks, evaluated_model
    from stages.registry import resolve_config as load_config
    from storage import ShardStore

    specs = _named_paths(args.benchmark, "--benchmark")
    images = _named_paths(args.benchmark_images, "--benchmark-images")
    if not specs and not args.synthetic:
        print("error: name at least one --benchmark NAME=PATH or --synthetic N", file=sys.stderr)
        return 2
    if set(images) - set(specs):
        print(
            f"error: --benchmark-images names {sorted(set(images) - set(specs))} without its --benchmark",
            file=sys.stderr,
        )
        return 2
    if args.endpoint and not args.endpoint_model:
        print("error: --endpoint needs --endpoint-model NAME", file=sys.stderr)
        return 2
    if args.prefetch < 0:
        print("error: --prefetch N needs N >= 0 (0: no inputs made ahead, 1: the default)", file=sys.stderr)
        return 2
    protocol = args.protocol
    if args.trials or args.temperature is not None:
        import dataclasses

        from evaluation.harness import PROTOCOLS

        if protocol != "strict":
            print("error: --trials/--temperature configure the strict protocol; the paper's is fixed", file=sys.stderr)
            return 2
        protocol = dataclasses.replace(
            PROTOCOLS["strict"],
            trials=args.trials or 1,
            temperature=args.temperature if args.temperature is not None else 0.0,
        )
    for name, path in specs.items():  # a file in the wrong layout fails now, not after the model loads
        check_layout(name, path)
    store = ShardStore(args.root, storage_options(args))
    store.check_root()
    cfg = load_config(args.preset, _nested(_dotted(args.overrides, "--set")))
    model, model_id = evaluated_model(store, cfg, args.checkpoint, args.endpoint, args.endpoint_model, args.concurrency)
    if specs:
        m = evaluate_benchmarks(
            store, specs, model, model_id, protocol, args.cache, images=images, prefetch=args.prefetch
        )
        summary = m.extra["summary"]
        cols = [c for c in PAPER_COLUMNS if c in summary]
        _print_table(
            [{"protocol": args.protocol, **{c: f"{100 * summary[c]['accuracy']:.1f}" for c in cols}}],
            ["protocol", *cols],
        )
        print()
        for c in cols:
            _print_benchmark_summary(c, summary[c])
        print(f"results version: {m.version} ({m.rows} items, {m.reject_rows} rejected rows: aot show {m.version})")
    if args.synthetic:
        from stages.robustness import robustness_suite

        r = robustness_suite(store, load_config("synthetic"), model, model_id, scenes=args.synthetic)
        print(
            f"synthetic robustness ({r['rows']} held-out rows, AOT-SFT version {r['export_version']}): "
            f"clean {100 * r['clean_accuracy']:.1f}%, attacked {100 * r['attacked_accuracy']:.1f}%, "
            f"drop {100 * r['drop']:.1f} points"
        )
    return 0


def cmd_config(args) -> int:
    import yaml

    from config import load_config

    print(
        yaml.safe_dump(load_config(args.preset, _nested(_dotted(args.overrides, "--set"))).to_dict(), sort_keys=False)
    )
    return 0


class Terminated(Exception):
    """SIGTERM, turned into an exception so that the process unwinds: finally blocks and exit
    handlers run, among them the one that stops the ephemeral Prefect server this run started."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from config import ConfigError
    from evaluation.endpoint import EndpointError
    from evaluation.readers import FormatError
    from models.synthetic import MissingSceneError
    from stages.base import StageError
    from stages.registry import ModelConfigError
    from storage import StorageError

    known = (ConfigError, StageError, StorageError, ModelConfigError, FormatError, EndpointError, MissingSceneError)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "stage":
            return cmd_run(args, stage=args.name)
        return {
            "ls": cmd_ls,
            "show": cmd_show,
            "gc": cmd_gc,
            "import": cmd_import,
            "config": cmd_config,
            "train-defender": cmd_defender,
            "eval-defender": cmd_defender,
            "train-attacker": cmd_attacker,
            "curriculum": cmd_attacker,
            "report": cmd_report,
            "verify": cmd_verify,
            "repair": cmd_repair,
            "serve": cmd_serve,
            "models": cmd_models,
            "eval": cmd_eval,
        }[args.command](args)
    except known as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: finished shards are kept; rerun the same command to continue", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
