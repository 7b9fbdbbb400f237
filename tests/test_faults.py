"""Fault drills: damaged data is never committed, served or loaded without an error; `aot verify`
finds every kind of damage; `aot repair` restores the exact bytes; permanent faults fail at once,
in one line; a store that lost its data says so and rebuilds."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from aot.cli import main
from config import load_config
from conftest import REPO, free_port, prefect_home, wait_port
from stages.maintenance import repair_version, verify_store
from stages.runner import plan, run_bootstrap, run_shard
from storage import DamagedVersion, ShardStore, StorageError

# The embedded default's world with the perception baseline as Stage 2's defender: fast, and
# every stage runs (no warm-up).
FAST = {"source": {"num_scenes": 12, "shard_size": 4}, "models": {"defender": "perception-baseline"}}


@pytest.fixture
def built(tmp_path):
    store = ShardStore(str(tmp_path / "root"))
    cfg = load_config("synthetic", FAST)
    versions = {s.stage: s.version for s in run_bootstrap(store, cfg)}
    return store, cfg, versions


def _folder(store, version) -> str:
    m = store.manifest(version)
    return store.version_path(m.dataset, m.stage, m.version)


def _flip(path: str, rng: random.Random) -> bytes:
    data = bytearray(open(path, "rb").read())
    original = bytes(data)
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))
    return original


def test_verify_finds_every_kind_of_damage_and_repair_restores_the_bytes(built, capsys):
    store, cfg, v = built
    root = store.root_url
    assert main(["verify", "--all", "--root", root]) == 0
    capsys.readouterr()
    shas = {s: [p.sha256 for p in store.manifest(v[s]).parts] for s in v}
    f = {s: _folder(store, v[s]) for s in v}
    # five kinds of damage, one per version
    part = os.path.join(f["extend"], "part-00001.parquet")
    open(part, "r+b").truncate(100)  # truncated
    os.remove(os.path.join(f["filter"], "part-00002.parquet"))  # deleted
    _flip(os.path.join(f["implant"], "part-00000.parquet"), random.Random(1))  # a bit flipped in a part
    manifest = os.path.join(f["export"], "manifest.json")
    text = open(manifest).read()
    n = int(text.split('"rows_in": ')[1].split(",")[0])
    open(manifest, "w").write(text.replace(f'"rows_in": {n},', f'"rows_in": {n + 1},', 1))  # one number changed
    open(os.path.join(f["source"], "part-00002.parquet.tmp-123"), "wb").write(b"half a file")  # a torn temp file
    assert main(["verify", "--all", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "5 damaged" in out
    assert "is 100 bytes, not" in out and "part-00002.parquet is missing" in out
    assert "does not match its sha256" in out and "manifest.json does not match its checksum" in out
    assert "stray temporary file part-00002.parquet.tmp-123" in out
    # repair, inputs first where an input is damaged too
    with pytest.raises(StorageError, match="is itself damaged"):
        repair_version(store, v["filter"])  # its input, extend, is damaged: repair that first
    for stage in ("source", "extend", "filter", "implant", "export"):
        assert main(["repair", v[stage], "--root", root]) == 0
    assert "manifest restored from its copy" in capsys.readouterr().out
    assert main(["verify", "--all", "--root", root]) == 0
    assert {s: [p.sha256 for p in store.manifest(v[s]).parts] for s in v} == shas  # the very same bytes


def test_300_random_bit_flips_in_parts_and_manifests_are_all_detected(built):
    store, cfg, v = built
    targets = []
    for stage in ("source", "filter", "export"):
        m = store.manifest(v[stage])
        folder = _folder(store, v[stage])
        targets += [(folder, os.path.join(folder, p.path)) for p in m.parts + m.rejects]
        targets.append((folder, os.path.join(folder, "manifest.json")))
    rng = random.Random(0)
    for _ in range(300):
        folder, path = rng.choice(targets)
        original = _flip(path, rng)
        problems = store.verify_folder(folder)
        assert problems, f"a flipped bit in {path} went unnoticed"
        open(path, "wb").write(original)
    assert all(problems == [] for problems in verify_store(store).values())  # every flip undone


def test_damaged_parts_are_never_loaded_or_committed(built):
    """Readers verify against the manifest: a missing or changed part is an error naming it, not
    fewer or different rows; a shard whose part changed after it finished is recomputed; a commit
    whose part does not verify is refused."""
    import aot

    store, cfg, v = built
    ds = aot.load_version(store.root_url, v["export"])
    assert len(ds) == store.manifest(v["export"]).rows
    folder = _folder(store, v["filter"])
    os.remove(os.path.join(folder, "part-00001.parquet"))
    with pytest.raises(DamagedVersion, match="part part-00001.parquet is missing"):
        aot.load_version(store.root_url, v["filter"])
    with pytest.raises(DamagedVersion, match="aot repair"):
        store.read(v["filter"])
    # A next stage (another implant config: nothing of it is stored yet) fails loud at that shard.
    other = load_config("synthetic", {**FAST, "implant": {"seed": 1}})
    p = plan(store, "implant", other, v["filter"])
    with pytest.raises(DamagedVersion, match="part-00001.parquet is missing"):
        run_shard(store, p, p.shards[1], other)


def test_a_version_with_an_empty_part_loads(tmp_path):
    import polars as pl

    import aot

    store = ShardStore(str(tmp_path))
    rejects = pl.DataFrame(schema={"id": pl.String, "reason": pl.String})
    recs = [
        store.write_shard("ds", "st", "v1", 0, "k0", 2, pl.DataFrame({"x": [1, 2]}), rejects),
        store.write_shard("ds", "st", "v1", 1, "k1", 0, pl.DataFrame(schema={"x": pl.Int64}), rejects),
    ]
    store.commit("ds", "st", "v1", recs, config={}, parents=[], code_version="t")
    assert aot.load_version(str(tmp_path), "v1")["x"] == [1, 2]
    recs = [store.write_shard("ds", "st", "v2", 0, "k0", 0, pl.DataFrame(schema={"x": pl.Int64}), rejects)]
    store.commit("ds", "st", "v2", recs, config={}, parents=[], code_version="t")
    assert len(aot.load_version(str(tmp_path), "v2")) == 0


def test_a_changed_part_is_not_committed(tmp_path):
    import polars as pl

    store = ShardStore(str(tmp_path))
    rejects = pl.DataFrame(schema={"id": pl.String, "reason": pl.String})
    rec = store.write_shard("ds", "st", "v1", 0, "k0", 1, pl.DataFrame({"x": [1]}), rejects)
    open(os.path.join(str(tmp_path), "ds", "st", "v1", "part-00000.parquet"), "ab").write(b"x")
    with pytest.raises(StorageError, match="cannot commit v1: shard 0: part-00000.parquet is"):
        store.commit("ds", "st", "v1", [rec], config={}, parents=[], code_version="t")
    assert store.manifest_at("ds", "st", "v1") is None


def test_a_damaged_manifest_breaks_only_its_version(built, capsys):
    store, cfg, v = built
    root = store.root_url
    manifest = os.path.join(_folder(store, v["extend"]), "manifest.json")
    open(manifest, "w").write("{torn")
    assert main(["ls", "--root", root]) == 0
    captured = capsys.readouterr()
    assert "damaged:" in captured.err and "manifest.json is unreadable" in captured.err
    listed = {ln.split()[2]: ln.split()[3] for ln in captured.out.splitlines()[1:] if ln.strip()}
    assert listed["source"] == v["source"] and "extend" not in listed  # the rest is listed
    assert main(["gc", "--dry-run", "--root", root]) == 0
    assert "damaged" in capsys.readouterr().out
    assert main(["show", v["extend"], "--root", root]) == 2  # one line, naming the fix
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json is unreadable" in err and f"aot repair {v['extend']}" in err
    assert main(["show", v["source"], "--root", root]) == 0


def test_a_cached_shard_whose_part_changed_is_recomputed_under_prefect(tmp_path):
    """A filter shard fails after others finished; one finished part is then truncated. Prefect's
    cache still vouches for it: the rerun must recompute it, never commit it."""
    from flows.bootstrap import bootstrap

    root = str(tmp_path / "root")
    over = {"source.num_scenes": 12, "source.shard_size": 4, "models.defender": "perception-baseline"}
    os.environ["AOT_FAULT"] = "filter:2:error"
    try:
        state = bootstrap(root=root, overrides=over, progress=False, return_state=True)
    finally:
        os.environ.pop("AOT_FAULT")
    assert not state.is_completed()
    store = ShardStore(root)
    [filt] = [f for f in store.version_folders() if "/filter/" in f]
    part = os.path.join(filt, "part-00000.parquet")
    open(part, "r+b").truncate(50)
    out = bootstrap(root=root, overrides=over, progress=False)
    by = {s["stage"]: s for s in out["stages"]}
    assert by["filter"]["recomputed"] >= 2  # the damaged shard and the failed one
    assert verify_store(store) and all(p == [] for p in verify_store(store).values())
    ref = ShardStore(str(tmp_path / "ref"))
    pure = {s.stage: s.version for s in run_bootstrap(ref, load_config("synthetic", FAST))}
    assert [p.sha256 for p in store.manifest(by["filter"]["version"]).parts] == [
        p.sha256 for p in ref.manifest(pure["filter"]).parts
    ]


def test_permanent_faults_are_not_retried():
    from tasks.shards import is_transient

    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOENT):
        assert not is_transient(OSError(code, os.strerror(code))), code
    assert is_transient(ConnectionError("reset")) and is_transient(OSError(errno.EIO, "i/o"))

    class ClientError(Exception):
        response = {"Error": {"Code": "NoSuchBucket"}}

    ClientError.__module__ = "botocore.exceptions"
    assert not is_transient(ClientError())


def _mount_tmpfs(path, options: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_a_full_or_read_only_root_fails_once_in_one_line_within_2_s(tmp_path, capsys, kind):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "size=64k" if kind == "full" else "ro,size=64k"):
        pytest.skip("needs root and tmpfs mounts (the drill mounts a small tmpfs)")
    try:
        if kind == "full":  # fill it to the last block
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
        t0 = time.perf_counter()
        rc = main(["run", "--root", str(mnt / "data"), "--no-prefect", "--set", "models.defender=perception-baseline"])
        seconds = time.perf_counter() - t0
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and seconds < 2, (rc, err, seconds)
        expected = "the disk is full" if kind == "full" else "read-only"
        assert err[0].startswith("error: root ") and expected in err[0]
        assert not list((mnt).glob("**/*.tmp-*")) and not (mnt / "data" / "synthetic").exists()
    finally:
        subprocess.run(["umount", str(mnt)])


def test_the_store_losing_its_data_says_so_and_rebuilds(tmp_path):
    """An S3 server (moto) restarted mid-run, its data lost: the next stage says the bucket or its
    input is gone, in one line; with the bucket back, the run rebuilds the same versions."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")

    def start():
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        wait_port(port)
        return proc

    server = start()
    try:
        opts = [f"client_kwargs.endpoint_url=http://127.0.0.1:{port}", "use_listings_cache=false"]
        cli = [sys.executable, "-m", "aot.cli"]
        common = [
            "--root",
            "s3://aot-lost/data",
            *[a for o in opts for a in ("--storage-option", o)],
            "--no-prefect",
            "--set",
            "models.defender=perception-baseline",
            "--set",
            "source.num_scenes=8",
            "--set",
            "source.shard_size=4",
        ]
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import s3fs; s3fs.S3FileSystem(client_kwargs={'endpoint_url': "
                f"'http://127.0.0.1:{port}'}}).mkdir('aot-lost')",
            ],
            env=env,
            check=True,
        )
        first = subprocess.run([*cli, "stage", "source", *common], env=env, capture_output=True, text=True, cwd=REPO)
        assert first.returncode == 0, first.stderr[-2000:]
        source = first.stdout.split("source version: ")[1].split()[0]
        server.terminate()
        server.wait()
        server = start()  # back, empty
        lost = subprocess.run(
            [*cli, "stage", "extend", "--input", source, *common], env=env, capture_output=True, text=True, cwd=REPO
        )
        err = [ln for ln in lost.stderr.splitlines() if ln.strip()]
        assert lost.returncode == 2 and len(err) == 1 and "bucket 'aot-lost' does not exist" in err[0], lost.stderr
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import s3fs; s3fs.S3FileSystem(client_kwargs={'endpoint_url': "
                f"'http://127.0.0.1:{port}'}}).mkdir('aot-lost')",
            ],
            env=env,
            check=True,
        )
        gone = subprocess.run(
            [*cli, "stage", "extend", "--input", source, *common], env=env, capture_output=True, text=True, cwd=REPO
        )
        assert gone.returncode == 2 and "no committed version" in gone.stderr, gone.stderr
        again = subprocess.run([*cli, "run", *common], env=env, capture_output=True, text=True, cwd=REPO)
        assert again.returncode == 0 and f"source   {source}" in again.stdout, again.stderr[-2000:]
    finally:
        server.terminate()
        server.wait()


def test_an_input_lost_mid_stage_is_named(built):
    store, cfg, v = built
    other = load_config("synthetic", {**FAST, "extend": {"seed": 1}})  # a stage not yet computed
    p = plan(store, "extend", other, v["source"])
    os.remove(os.path.join(_folder(store, v["source"]), "manifest.json"))
    with pytest.raises(
        StorageError, match=rf"input version {v['source']} \(source\) is gone .* \(was the store wiped\?\)"
    ):
        run_shard(store, p, p.shards[0], other)


def test_gc_keeps_what_a_resume_reuses_and_says_what_it_skips(built, capsys):
    store, cfg, v = built
    root = store.root_url
    import polars as pl

    rejects = pl.DataFrame(schema={"id": pl.String, "reason": pl.String})
    store.write_shard("synthetic", "extend", "unfinished", 0, "k", 1, pl.DataFrame({"x": [1]}), rejects)
    assert main(["gc", "--dry-run", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "would keep" in out and "a writer may be at work" in out  # young: listed, not silently hidden
    assert main(["gc", "--min-age", "0", "--root", root]) == 0
    assert store.finished_shard("synthetic", "extend", "unfinished", 0, "k") is not None  # a resume reuses it
    assert main(["gc", "--min-age", "0", "--drop-unfinished", "--root", root]) == 0
    assert store.finished_shard("synthetic", "extend", "unfinished", 0, "k") is None


def test_zero_scenes_and_no_prefect_faults_are_not_silently_ignored(tmp_path, capsys):
    assert main(["run", "--root", str(tmp_path), "--scenes", "0", "--no-prefect"]) == 2
    assert "source.num_scenes: must be >= 1" in capsys.readouterr().err
    env = dict(os.environ, AOT_FAULT="source:1:error")
    out = subprocess.run(
        [sys.executable, "-m", "aot.cli", "stage", "source", "--root", str(tmp_path), "--no-prefect"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode != 0 and "injected fault at source shard 1" in out.stderr


def test_verify_and_repair_as_flows(built):
    """The deployments a nightly run uses: verify fails naming the damage, repair rebuilds it."""
    from flows.maintenance import repair_flow, verify_flow

    store, cfg, v = built
    assert verify_flow(root=store.root_url)["damaged"] == {}
    sha = store.manifest(v["filter"]).parts[0].sha256
    open(os.path.join(_folder(store, v["filter"]), "part-00000.parquet"), "r+b").truncate(10)
    state = verify_flow(root=store.root_url, return_state=True)
    assert (
        state.is_failed()
        and "1 damaged versions" in state.message
        and "part-00000.parquet is 10 bytes" in state.message
    )
    assert repair_flow(version=v["filter"], root=store.root_url)["shards"] == [0]
    assert store.manifest(v["filter"]).parts[0].sha256 == sha and verify_flow(root=store.root_url)["damaged"] == {}


def test_the_next_run_ends_the_server_a_killed_run_left(tmp_path):
    """kill -9 gives a run no chance to stop its ephemeral Prefect server; the next run in the
    same Prefect home ends it."""
    import json
    import signal

    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"))
    args = [
        sys.executable,
        "-m",
        "aot.cli",
        "run",
        "--root",
        str(tmp_path / "data"),
        "--no-progress",
        "--set",
        "models.defender=perception-baseline",
        "--set",
        "source.shard_size=4",
    ]
    first = subprocess.Popen(
        [*args, "--scenes", "400"],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    record = tmp_path / "home" / "aot-ephemeral-server.json"
    deadline = time.time() + 240
    while time.time() < deadline and not record.exists():
        time.sleep(0.5)
    server = json.loads(record.read_text())["server"]
    first.kill()  # SIGKILL: no handler runs
    first.wait()
    try:
        os.kill(server, 0)  # the server outlived its run
        second = subprocess.run(
            [*args, "--scenes", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 0, second.stderr[-2000:]
        assert f"ended the Prefect server (pid {server})" in second.stderr
        time.sleep(1)
        with pytest.raises(ProcessLookupError):
            os.kill(server, 0)
    finally:
        for pid in (server,):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
