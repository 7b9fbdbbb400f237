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

from stages.config import load_config
from stages.runner import run_bootstrap
from storage import ShardStore

pytestmark = pytest.mark.slow

SMALL = {"source.num_scenes": 16, "source.shard_size": 4}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config run by the pure runner: Prefect must produce the same versions and bytes."""
    store = ShardStore(str(tmp_path_factory.mktemp("ref")))
    cfg = load_config("synthetic", {"source": {"num_scenes": 16, "shard_size": 4}})
    summaries = run_bootstrap(store, cfg)
    export = store.manifest(summaries[-1].version)
    return {s.stage: s.version for s in summaries}, [p.sha256 for p in export.parts], export.rows


def _bootstrap(root, **kw):
    from flows.bootstrap import bootstrap

    return bootstrap(root=str(root), overrides=dict(SMALL), progress=False, **kw)


def _by_stage(result):
    return {s["stage"]: s for s in result["stages"]}


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
    ds = datasets.load_dataset("parquet", data_files=f"{folder}/part-*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == rows
    row = ds[0]
    assert row["clean_image"].size == row["adversarial_image"].size == (row["width"], row["height"])
    assert row["answer"] in "ABCD" and row["prompt"].endswith("letter of your choice.")
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


def test_cached_result_pointing_at_deleted_files_names_the_fix(tmp_path, reference):
    versions, _, _ = reference
    from flows.bootstrap import STAGE_FLOWS
    from storage import StorageError

    _bootstrap(tmp_path)
    store = ShardStore(str(tmp_path))
    store.fs.rm(store.path("synthetic", "export", versions["export"]), recursive=True)
    common = dict(input_version=versions["implant"], root=str(tmp_path), overrides=dict(SMALL), progress=False)
    with pytest.raises(StorageError, match="--refresh-cache"):
        STAGE_FLOWS["export"](**common)
    out = STAGE_FLOWS["export"](refresh_cache=True, **common)
    assert out["version"] == versions["export"] and out["recomputed"] == 4


def test_bootstrap_on_s3(s3_root, reference):
    versions, shas, _ = reference
    root, opts = s3_root
    from flows.bootstrap import bootstrap

    out = bootstrap(root=root, overrides=dict(SMALL), storage_options=opts, progress=False)
    assert out["version"] == versions["export"]
    store = ShardStore(root, opts)
    assert [p.sha256 for p in store.manifest(out["version"]).parts] == shas
    assert len(store.fs.glob(store.path("_prefect", "results", "*"))) == 20


def _cli(args, env, cwd):
    """Run the CLI in its own session; afterwards kill the session, so a Prefect server child
    orphaned by a killed run (it outlives SIGKILL of its parent) does not linger or hold pipes."""
    import signal
    import types

    out, err = Path(cwd) / "cli.out", Path(cwd) / "cli.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "aot.cli", *args], cwd=cwd, env=env, stdout=o, stderr=e,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=400)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return types.SimpleNamespace(returncode=rc, stdout=out.read_text(), stderr=err.read_text())


def test_killed_cli_run_resumes_without_losing_or_duplicating_rows(tmp_path, reference):
    versions, shas, rows = reference
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), AOT_FAULT="implant:2:kill")
    args = ["run", "--root", str(tmp_path / "data"), "--no-progress",
            "--set", "source.num_scenes=16", "--set", "source.shard_size=4"]
    killed = _cli(args, env, tmp_path)
    assert killed.returncode == 137, killed.stderr[-2000:]
    store = ShardStore(str(tmp_path / "data"))
    assert store.manifest_at("synthetic", "implant", versions["implant"]) is None
    shards = store.path("synthetic", "implant", versions["implant"], "_shards")
    finished = len(store.fs.ls(shards)) if store.fs.exists(shards) else 0
    env.pop("AOT_FAULT")
    done = _cli(args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    table = {ln.split()[0]: ln.split() for ln in done.stdout.splitlines()
             if ln.split()[:1] in (["source"], ["extend"], ["filter"], ["implant"], ["export"])}
    recomputed = {k: int(v[6]) for k, v in table.items()}  # stage version in kept rejected shards recomputed
    assert recomputed == {"source": 0, "extend": 0, "filter": 0, "implant": 4 - finished, "export": 4}, done.stdout
    assert f"AOT-SFT version: {versions['export']}" in done.stdout
    assert 1 <= 4 - finished <= 3  # shard 2 at least; shards finished before the kill were kept
    m = store.manifest(versions["export"])
    assert m.rows == rows and [p.sha256 for p in m.parts] == shas
    ids = store.read(m)["id"].to_list()
    assert len(ids) == len(set(ids)) == rows


def test_cli_against_a_running_prefect_server(tmp_path):
    from conftest import free_port, wait_port

    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "server-home"))
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        out = _cli(["run", "--root", str(tmp_path / "data"), "--no-progress", "--set", "source.num_scenes=8",
                    "--set", "source.shard_size=4"], client_env, tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert re.search(r"AOT-SFT version: [0-9a-f]{16}", out.stdout)
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        names = sorted({r["name"] for r in runs})
        assert len(runs) == 6  # bootstrap + five stage subflows
        flows = httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()
        assert {f["name"] for f in flows} >= {"bootstrap", "generate-scenes", "implant-distractors"}, names
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
            w.writerow([str(i), base64.b64encode(buf.getvalue()).decode(), "Is there a red circle in the image?",
                        "yes" if i % 2 else "no", "random"])
    out = evaluate_flow(benchmarks={"pope": str(pope)}, synthetic_scenes=16, root=str(tmp_path / "data"),
                        overrides={"source.shard_size": 8})
    assert out["summary"]["pope"]["n"] == 4 and 0 <= out["summary"]["pope"]["accuracy"] <= 1
    assert out["synthetic"]["drop"] == 1.0  # the baseline against its own implanter


def test_a_failed_run_retried_by_prefect_recomputes_only_the_missing_shards(tmp_path, reference):
    """A shard error fails the run and the CLI names both ways to continue; `prefect flow-run
    retry` of the failed run recomputes the one missing implant shard, rewrites none of the
    finished shards and redoes none of the finished stages. (Rerunning the CLI command:
    ``test_killed_cli_run_resumes_without_losing_or_duplicating_rows``.)"""
    import re

    versions, shas, _ = reference
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), AOT_FAULT="implant:2:error")
    root = tmp_path / "data"
    args = ["run", "--root", str(root), "--no-progress", "--set", "source.num_scenes=16", "--set", "source.shard_size=4"]
    failed = _cli(args, env, tmp_path)
    assert failed.returncode == 1 and "injected fault at implant shard 2" in failed.stderr
    assert "rerun the same command" in failed.stderr
    run_id = re.search(r"prefect flow-run retry ([0-9a-f-]{36}) --entrypoint flows/bootstrap.py:bootstrap",
                       failed.stderr).group(1)
    store = ShardStore(str(root))
    shards = store.path("synthetic", "implant", versions["implant"], "_shards")
    before = {Path(f).name: store.fs.info(f)["mtime"] for f in store.fs.ls(shards)}
    assert "shard-00002.json" not in before and len(before) >= 2
    done_stages = {st: store.fs.info(store.path("synthetic", st, versions[st], "manifest.json"))["mtime"]
                   for st in ("source", "extend", "filter")}
    clean = {k: v for k, v in env.items() if k != "AOT_FAULT"}
    prefect = str(Path(sys.executable).parent / "prefect")
    out = subprocess.run([prefect, "flow-run", "retry", run_id, "--entrypoint", "flows/bootstrap.py:bootstrap"],
                         env=clean, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0 and "completed successfully" in out.stdout + out.stderr, out.stderr[-2000:]
    after = {Path(f).name: store.fs.info(f)["mtime"] for f in store.fs.ls(shards)}
    assert set(after) == {f"shard-0000{i}.json" for i in range(4)}
    assert all(after[k] == before[k] for k in before)  # finished shards were not rewritten
    assert done_stages == {st: store.fs.info(store.path("synthetic", st, versions[st], "manifest.json"))["mtime"]
                           for st in done_stages}  # finished stages were not redone
    assert [p.sha256 for p in store.manifest(versions["export"]).parts] == shas


def test_data_stages_on_a_local_dask_cluster_give_the_same_versions(tmp_path, reference):
    """The same bootstrap with its shards on a local Dask cluster (worker processes): the same
    version ids and bytes as the default runner."""
    pytest.importorskip("prefect_dask", reason="needs prefect-dask (requirements.txt)")
    versions, shas, _ = reference
    out = _by_stage(_bootstrap(tmp_path, task_runner="dask"))
    assert {k: v["version"] for k, v in out.items()} == versions
    assert [p.sha256 for p in ShardStore(str(tmp_path)).manifest(versions["export"]).parts] == shas


def test_dask_gpus_pins_one_card_per_worker(monkeypatch):
    """`--task-runner dask-gpus`: one worker process per GPU, each seeing only its own card."""
    pytest.importorskip("distributed")
    from distributed import Client

    from flows.bootstrap import local_dask_cluster

    monkeypatch.setenv("AOT_GPUS", "2")
    cluster = local_dask_cluster("dask-gpus")
    try:
        with Client(cluster) as client:
            seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
    finally:
        cluster.close()
