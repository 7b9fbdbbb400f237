"""Shared fixtures: an isolated Prefect home, real S3 (moto_server) and MLflow tracking servers on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A Prefect home whose database is already migrated, made once per whole-suite run (see
# pytest_configure): an ephemeral server on a fresh home spends ~15 s of CPU migrating its
# database, and the suite starts one in every test process and in every CLI test with a home of
# its own. Each process and each such test gets its own copy (one SQLite file per server).
_TEMPLATE = os.environ.get("AOT_TEST_PREFECT_TEMPLATE")


def prefect_home(path) -> str:
    """A Prefect home at ``path`` for a test's own server: a copy of the migrated template."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if _TEMPLATE and (Path(_TEMPLATE) / "prefect.db").exists():
        shutil.copy(Path(_TEMPLATE) / "prefect.db", path / "prefect.db")
    return str(path)


_PREFECT_HOME = prefect_home(tempfile.mkdtemp(prefix="aot-prefect-home-"))
# Before anything imports Prefect: an isolated home, a patient ephemeral server, no telemetry.
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("AOT_FAULT", None)
# The model cache (warmed defenders, fitted editors, fetched checkpoints) is the run's own: a test's
# outcome never depends on what another process left in ~/.cache/aot. One folder per test run,
# made by the first process (pytest, or the xdist controller) and inherited by its workers, so a
# warm-up happens once per run; removed when the run ends.
if "AOT_TEST_CACHE" not in os.environ:
    os.environ["AOT_TEST_CACHE"] = tempfile.mkdtemp(prefix="aot-test-cache-")
os.environ["AOT_CACHE"] = os.environ["AOT_TEST_CACHE"]


_PREWARM: list = []
# The embedded default's warmed Stage 2 defender: the shipped one (models/fitted), else built into
# the run's cache (stages/warm_defender.py) — minutes, when the preset's warm-up changed unshipped.
_WARM = "from stages.registry import load, resolve_config; load('defender', resolve_config().model_spec('defender'))"


def warm_default_defender() -> None:
    """The embedded default's warmed Stage 2 defender, in a process of its own: loads the shipped
    or cached one, waits on the prewarm's build lock if it is being built, else builds it.
    For tests that time a run and should not time the one-time warm-up inside it."""
    out = subprocess.run([sys.executable, "-c", _WARM], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def pytest_configure(config):
    """On a whole-suite run (`make test`: no paths given), start warming the embedded default's
    Stage 2 defender at once, in a process of its own: the tests that need it wait on its build
    lock instead of one of them building it while the other workers idle behind it."""
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if hasattr(config, "workerinput") or not whole_suite or os.environ.get("AOT_TEST_NO_PREWARM"):
        return
    log = open(Path(os.environ["AOT_TEST_CACHE"]) / "prewarm.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _PREWARM.append(
        subprocess.Popen(
            [sys.executable, "-c", _WARM], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
        )
    )
    # The migrated Prefect home the workers (started after this hook) and CLI tests copy.
    global _TEMPLATE
    template = Path(os.environ["AOT_TEST_CACHE"]) / "prefect-home-template"
    template.mkdir()
    migrate = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"],
        env=dict(os.environ, PREFECT_HOME=str(template)),
        stdout=log,
        stderr=log,
    )
    if migrate.returncode == 0:  # else every home stays fresh: slower, not wrong
        os.environ["AOT_TEST_PREFECT_TEMPLATE"] = _TEMPLATE = str(template)


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) owns the folder
        for proc in _PREWARM:
            proc.kill()
            proc.wait()
        shutil.rmtree(os.environ["AOT_TEST_CACHE"], ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port, as s3fs's own tests do. Yields storage options."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        wait_port(port)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        yield {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "use_listings_cache": False}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stop_session(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to a server started with ``start_new_session=True`` and everything it spawned
    (MLflow's and Prefect's servers run workers), SIGKILL after ``grace`` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend) on a free loopback port, started and stopped
    as the S3 tests do with moto. Yields its URI."""
    folder = tmp_path_factory.mktemp("mlflow")
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root",
         str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_session(proc, 20)
        log.close()


@pytest.fixture
def s3_root(s3_server, request):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    import re

    bucket = ("aot-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:50].strip("-")
    fs.mkdir(bucket)
    return f"s3://{bucket}/data", s3_server


@pytest.fixture
def small_config():
    from config import load_config

    return load_config("synthetic", {"source": {"num_scenes": 24, "shard_size": 8}})


# The longest test files, longest first (worker-seconds under `make test`). `--dist loadfile`
# hands whole files to the workers in collection order, so a long file collected last (say
# test_real_backends, alphabetically late) runs alone at the end while the other workers idle;
# longest-first keeps the tail short. A file missing here only runs later, never wrongly.
LONGEST_FIRST = (
    "test_real_backends.py",
    "test_attacker.py",
    "test_faults.py",
    "test_flows_recovery.py",
    "test_coevolution.py",
    "test_flows.py",
    "test_ui.py",
    "test_defender.py",
    "test_evidence.py",
    "test_import_cli.py",
    "test_distributed.py",
)


def pytest_collection_modifyitems(config, items):
    """Files longest first (LONGEST_FIRST; stable, so each file keeps its own order). GPU tests are
    skipped, with the reason shown, where no CUDA device exists (CI, laptops)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the lent GPU machine (experiments/README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Under pytest-xdist (`make test` runs three workers on two cores) each worker gets one CPU
# thread, for torch in-process and for the subprocesses the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# ------------------------------------------------------------------ the bootstrap reference
SMALL = {"source.num_scenes": 16, "source.shard_size": 4}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config run by the pure runner: Prefect must produce the same versions and bytes."""
    from config import load_config
    from stages.runner import run_bootstrap
    from storage import ShardStore

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


def _cli(args, env, cwd):
    """Run the CLI in its own session; afterwards kill the session, so a Prefect server child
    orphaned by a killed run (it outlives SIGKILL of its parent) does not linger or hold pipes."""
    import signal
    import types

    out, err = Path(cwd) / "cli.out", Path(cwd) / "cli.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aot.cli", *args], cwd=cwd, env=env, stdout=o, stderr=e, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=400)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return types.SimpleNamespace(returncode=rc, stdout=out.read_text(), stderr=err.read_text())
