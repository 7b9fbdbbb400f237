"""Recovery and scale-out of the data stages: a killed CLI run, a failed run retried by
Prefect, and the shards on Dask clusters. (Split from test_flows.py so the suite's two
workers share the slow Prefect tests.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _bootstrap, _by_stage, _cli, prefect_home
from storage import ShardStore
from storage.store import MANIFEST_COPY

pytestmark = pytest.mark.slow


def test_killed_cli_run_resumes_without_losing_or_duplicating_rows(tmp_path, reference):
    versions, shas, rows = reference
    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"), AOT_FAULT="implant:2:kill")
    args = [
        "run",
        "--root",
        str(tmp_path / "data"),
        "--no-progress",
        "--set",
        "source.num_scenes=16",
        "--set",
        "source.shard_size=4",
    ]
    killed = _cli(args, env, tmp_path)
    assert killed.returncode == 137, killed.stderr[-2000:]
    store = ShardStore(str(tmp_path / "data"))
    assert store.manifest_at("synthetic", "implant", versions["implant"]) is None
    shards = store.path("synthetic", "implant", versions["implant"], "_shards")
    finished = len(store.fs.ls(shards)) if store.fs.exists(shards) else 0
    env.pop("AOT_FAULT")
    done = _cli(args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    table = {
        ln.split()[0]: ln.split()
        for ln in done.stdout.splitlines()
        if ln.split()[:1] in (["source"], ["extend"], ["filter"], ["implant"], ["export"])
    }
    recomputed = {k: int(v[6]) for k, v in table.items()}  # stage version in kept rejected shards recomputed
    assert recomputed == {"source": 0, "extend": 0, "filter": 0, "implant": 4 - finished, "export": 4}, done.stdout
    assert f"AOT-SFT version: {versions['export']}" in done.stdout
    assert 1 <= 4 - finished <= 3  # shard 2 at least; shards finished before the kill were kept
    m = store.manifest(versions["export"])
    assert m.rows == rows and [p.sha256 for p in m.parts] == shas
    ids = store.read(m)["id"].to_list()
    assert len(ids) == len(set(ids)) == rows


def test_a_failed_run_retried_by_prefect_recomputes_only_the_missing_shards(tmp_path, reference):
    """A shard error fails the run and the CLI names both ways to continue; `prefect flow-run
    retry` of the failed run recomputes the one missing implant shard, rewrites none of the
    finished shards and redoes none of the finished stages. (Rerunning the CLI command:
    ``test_killed_cli_run_resumes_without_losing_or_duplicating_rows``.)"""
    import re

    versions, shas, _ = reference
    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"), AOT_FAULT="implant:2:error")
    root = tmp_path / "data"
    args = [
        "run",
        "--root",
        str(root),
        "--no-progress",
        "--set",
        "source.num_scenes=16",
        "--set",
        "source.shard_size=4",
    ]
    failed = _cli(args, env, tmp_path)
    assert failed.returncode == 1 and "injected fault at implant shard 2" in failed.stderr
    assert "rerun the same command" in failed.stderr
    run_id = re.search(
        r"prefect flow-run retry ([0-9a-f-]{36}) --entrypoint flows/bootstrap.py:bootstrap", failed.stderr
    ).group(1)
    store = ShardStore(str(root))
    shards = store.path("synthetic", "implant", versions["implant"], "_shards")
    before = {Path(f).name: store.fs.info(f)["mtime"] for f in store.fs.ls(shards)}
    assert "shard-00002.json" not in before and len(before) >= 2
    done_stages = {
        st: store.fs.info(store.path("synthetic", st, versions[st], "manifest.json"))["mtime"]
        for st in ("source", "extend", "filter")
    }
    clean = {k: v for k, v in env.items() if k != "AOT_FAULT"}
    prefect = str(Path(sys.executable).parent / "prefect")
    out = subprocess.run(
        [prefect, "flow-run", "retry", run_id, "--entrypoint", "flows/bootstrap.py:bootstrap"],
        env=clean,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0 and "completed successfully" in out.stdout + out.stderr, out.stderr[-2000:]
    after = {Path(f).name: store.fs.info(f)["mtime"] for f in store.fs.ls(shards)}
    # the shard records, and the manifest's copy that commit keeps beside them for `aot repair`
    assert set(after) == {f"shard-0000{i}.json" for i in range(4)} | {Path(MANIFEST_COPY).name}
    assert all(after[k] == before[k] for k in before)  # finished shards were not rewritten
    assert done_stages == {
        st: store.fs.info(store.path("synthetic", st, versions[st], "manifest.json"))["mtime"] for st in done_stages
    }  # finished stages were not redone
    assert [p.sha256 for p in store.manifest(versions["export"]).parts] == shas


def test_data_stages_on_a_local_dask_cluster_give_the_same_versions(tmp_path, reference, monkeypatch):
    """The same bootstrap with its shards on a local Dask cluster (a worker process): the same
    version ids and bytes as the default runner. One worker: the process boundary is what is
    tested, and each worker imports torch and loads the models (~25 s of CPU each on 2 cores)."""
    pytest.importorskip("prefect_dask", reason="needs prefect-dask (requirements.txt)")
    monkeypatch.setenv("AOT_WORKERS", "1")
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
