"""The DAG under Prefect: caching, injected failures, a killed run, S3, and a running server.

These start Prefect's ephemeral server once per test process (~30 s on a fresh home).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from storage import ShardStore

pytestmark = pytest.mark.slow

from conftest import SMALL, _bootstrap, _by_stage, _cli  # noqa: E402  (shared with test_flows_recovery.py)

REPO = Path(__file__).resolve().parent.parent


def test_bootstrap_matches_pure_runner_then_everything_is_cached(tmp_path, reference):
    versions, shas, rows = reference
    first = _by_stage(_bootstrap(tmp_path))
    assert {k: v["version"] for k, v in first.items()} == versions
    assert all(s["recomputed"] == s["shards"] == 4 for s in first.values())
    store = ShardStore(str(tmp_path))
    assert [p.sha256 for p in store.manifest(versions["export"]).parts] == shas
    # Task results are small JSON references persisted under the root.
    results = store.fs.glob(store.path("_prefect", "results", "*"))
    assert len(results) == 20
    import json

    stored = json.loads(store.fs.cat_file(results[0]))
    value = json.loads(stored["result"]) if isinstance(stored["result"], str) else stored["result"]
    assert stored["metadata"]["serializer"]["type"] == "json"
    assert set(value) == {"index", "input_key", "rows_in", "data", "rejects", "reasons", "recomputed"}
    assert len(store.fs.cat_file(results[0])) < 2000  # a reference, not data
    # Rerun: the same version ids, nothing recomputed.
    again = _by_stage(_bootstrap(tmp_path))
    assert {k: v["version"] for k, v in again.items()} == versions
    assert sum(s["recomputed"] for s in again.values()) == 0
    # Lose the implant manifest (as if the run died just before it): the shards come from Prefect's cache.
    m = store.manifest(versions["implant"])
    store.fs.rm(store.path(m.dataset, "implant", m.version, "manifest.json"))
    third = _by_stage(_bootstrap(tmp_path))
    assert third["implant"]["version"] == versions["implant"]
    assert third["implant"]["cached"] == 4 and third["implant"]["recomputed"] == 0


def test_exported_version_loads_with_datasets(tmp_path, reference):
    import datasets

    versions, _, rows = reference
    _bootstrap(tmp_path)
    store = ShardStore(str(tmp_path))
    m = store.manifest(versions["export"])
    # The README's one-liner: a glob over the version folder's parts.
    folder = m.uri.removeprefix("file://")
    ds = datasets.load_dataset(
        "parquet", data_files=f"{folder}/part-*.parquet", split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(ds) == rows
    row = ds[0]
    assert row["clean_image"].size == row["adversarial_image"].size == (row["width"], row["height"])
    assert row["answer"] in "ABCDEF"[: len(row["options"])] and row["prompt"].endswith("letter of your choice.")
    assert store.fs.exists(f"{folder}/README.md")  # the dataset card


def test_failed_shard_then_rerun_recomputes_only_that_shard(tmp_path, reference, monkeypatch):
    versions, shas, _ = reference
    monkeypatch.setenv("AOT_FAULT", "filter:2:error")
    with pytest.raises(RuntimeError, match="injected fault at filter shard 2"):
        _bootstrap(tmp_path)
    store = ShardStore(str(tmp_path))
    assert store.manifest_at("synthetic", "filter", versions["filter"]) is None  # no half-visible version
    monkeypatch.delenv("AOT_FAULT")
    out = _by_stage(_bootstrap(tmp_path))
    assert out["source"]["reused_version"] and out["extend"]["reused_version"]
    assert out["filter"]["recomputed"] == 1 and out["filter"]["cached"] == 3
    assert [p.sha256 for p in store.manifest(versions["export"]).parts] == shas


def test_transient_fault_is_retried(tmp_path, reference, monkeypatch):
    versions, shas, _ = reference
    monkeypatch.setenv("AOT_FAULT", "extend:1:transient")
    out = _by_stage(_bootstrap(tmp_path))
    store = ShardStore(str(tmp_path))
    assert store.fs.exists(store.path("_faults", "extend-1"))  # the fault fired once...
    assert out["export"]["version"] == versions["export"]  # ...and the retry completed the run
    assert [p.sha256 for p in store.manifest(versions["export"]).parts] == shas


def test_cached_result_pointing_at_deleted_files_is_recomputed(tmp_path, reference, caplog):
    """Prefect's result cache vouches for files that are gone: each such shard is recomputed (with a
    warning naming it), and the version comes back with the same id and bytes, no flag needed."""
    versions, shas, _ = reference
    from flows.bootstrap import STAGE_FLOWS

    _bootstrap(tmp_path)
    store = ShardStore(str(tmp_path))
    store.fs.rm(store.path("synthetic", "export", versions["export"]), recursive=True)
    common = dict(input_version=versions["implant"], root=str(tmp_path), overrides=dict(SMALL), progress=False)
    out = STAGE_FLOWS["export"](**common)
    assert out["version"] == versions["export"] and out["recomputed"] == 4 and out["cached"] == 0
    assert [p.sha256 for p in store.manifest(versions["export"]).parts] == shas
    warned = [r.getMessage() for r in caplog.records if "no longer verify" in r.getMessage()]
    assert sorted(warned) == [f"export shard {i}: its cached parts no longer verify; recomputing" for i in range(4)]


def test_bootstrap_on_s3(s3_root, reference):
    versions, shas, _ = reference
    root, opts = s3_root
    from flows.bootstrap import bootstrap

    out = bootstrap(root=root, overrides=dict(SMALL), storage_options=opts, progress=False)
    assert out["version"] == versions["export"]
    store = ShardStore(root, opts)
    assert [p.sha256 for p in store.manifest(out["version"]).parts] == shas
    assert len(store.fs.glob(store.path("_prefect", "results", "*"))) == 20


def test_cli_against_a_running_prefect_server(tmp_path):
    from conftest import free_port, prefect_home, wait_port

    port = free_port()
    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "server-home"))
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=120)
        import httpx

        api = f"http://127.0.0.1:{port}/api"
        for _ in range(240):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            import time

            time.sleep(0.5)
        client_env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"))
        out = _cli(
            [
                "run",
                "--root",
                str(tmp_path / "data"),
                "--no-progress",
                "--set",
                "source.num_scenes=8",
                "--set",
                "source.shard_size=4",
                "--set",  # the server's wiring is under test, not Stage 2's warmed defender: skip its warm-up
                "models.defender=perception-baseline",
            ],
            client_env,
            tmp_path,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert re.search(r"AOT-SFT version: [0-9a-f]{16}", out.stdout)
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        names = sorted({r["name"] for r in runs})
        assert len(runs) == 6  # bootstrap + five stage subflows
        flows = httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()
        assert {f["name"] for f in flows} >= {"bootstrap", "source", "implant"}, names
        arts = httpx.post(f"{api}/artifacts/filter", json={}, timeout=10).json()
        assert {"implant-counts", "export-summary"} <= {a["key"] for a in arts}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_evaluate_flow_on_fixture_benchmarks(tmp_path):
    import base64
    import csv

    from flows.evaluate import evaluate_flow
    from world import generate_world, render

    pope = tmp_path / "pope.tsv"
    with open(pope, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", "answer", "category"])
        for i in range(4):
            import io

            buf = io.BytesIO()
            render(generate_world(i)).save(buf, format="PNG")
            w.writerow(
                [
                    str(i),
                    base64.b64encode(buf.getvalue()).decode(),
                    "Is there a red circle in the image?",
                    "yes" if i % 2 else "no",
                    "random",
                ]
            )
    out = evaluate_flow(
        benchmarks={"pope": str(pope)},
        synthetic_scenes=16,
        root=str(tmp_path / "data"),
        overrides={
            "source.shard_size": 8,
            "models.defender": "perception-baseline",
            "source.question_types": ["relative_position"],
            "source.question_weights": [1.0],
        },
    )
    assert out["model"] == 'defender:"perception-baseline"'  # no checkpoint: the config's own defender
    assert out["summary"]["pope"]["n"] == 4 and 0 <= out["summary"]["pope"]["accuracy"] <= 1
    assert out["synthetic"]["drop"] == 1.0  # the baseline against its own implanter


def test_nightly_regeneration_seeds_by_date_and_leaves_the_caller_alone():
    import datetime

    from flows.bootstrap import dated_seed, resolve_config

    given = {"source": {"num_scenes": 8}}
    night = dated_seed(given, datetime.date(2026, 11, 27))
    cfg = resolve_config("synthetic", night)
    assert cfg.source.seed == 20261127 and cfg.source.num_scenes == 8
    assert given == {"source": {"num_scenes": 8}}
    assert resolve_config("synthetic", dated_seed(given, datetime.date(2026, 11, 28))).source.seed == 20261128


def test_progress_of_model_work_reaches_the_run_log_and_stderr(capsys):
    """A fit or warm-up inside a task says its progress on stderr (the CLI shows it) and in the
    task run's log (the UI shows it), not only through print, which the CLI's WARNING level hides."""
    import logging

    from prefect import flow, task

    import tasks.shards  # noqa: F401  (the task modules add the run-log sink)
    from models.progress import StepProgress

    @task
    def fit():
        p = StepProgress("tiny fit", 4, lines=2)
        for s in range(1, 5):
            p(s, 0.5)

    @flow
    def run():
        fit()

    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    runs = logging.getLogger("prefect.task_runs")
    level = runs.level
    runs.addHandler(handler)
    runs.setLevel("INFO")  # the suite runs Prefect at WARNING, as the CLI does
    try:
        capsys.readouterr()
        run()
    finally:
        runs.removeHandler(handler)
        runs.setLevel(level)
    said = [r.getMessage().split(",")[0] for r in logged if r.getMessage().startswith("tiny fit:")]
    assert said == ["tiny fit: step 2/4", "tiny fit: step 4/4"]
    assert "task_run_id" in logged[0].__dict__  # a run's record, which the API handler ships
    err = capsys.readouterr().err
    assert "tiny fit: step 2/4, loss 0.5000" in err and "tiny fit: step 4/4, loss 0.5000" in err


def test_training_tasks_say_progress_per_tenth_of_their_steps():
    """The train tasks' on_step: a line per tenth of the steps, the loss (Flow-GRPO: the reward)
    averaged since the last line, through models.progress (stderr and the run-log sink)."""
    from models import progress
    from tasks.training import trainer_progress

    lines: list[str] = []
    progress.SINKS.append(lines.append)
    try:
        sft = trainer_progress("train defender sft", 20)
        for step in range(1, 21):
            sft({"step": step, "loss": float(step), "grad_norm": 1.0})
        grpo = trainer_progress("train attacker grpo", 4, "reward")
        for step in range(1, 5):
            grpo({"step": step, "reward": 0.25 * step})
    finally:
        progress.SINKS.remove(lines.append)
    heads = [ln.split(", ")[:2] for ln in lines]
    assert heads[:2] == [
        ["train defender sft: step 2/20", "loss 1.5000"],
        ["train defender sft: step 4/20", "loss 3.5000"],
    ]
    assert len([h for h in heads if h[0].startswith("train defender")]) == 10
    assert [h for h in heads if h[0].startswith("train attacker")] == [
        [f"train attacker grpo: step {s}/4", f"reward {0.25 * s:.4f}"] for s in range(1, 5)
    ]
