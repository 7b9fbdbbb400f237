"""`aot serve`: the Prefect UI with every deployment, in one command.

Starts a local Prefect server, creates the process work pool of prefect.yaml (``aot-local``) if
it is missing, registers every deployment (``prefect deploy --all`` from the repository root,
with ``AOT_REPO`` pointing the pull step at this checkout) and starts a worker for the pool.
Ctrl-C (or SIGTERM) stops the worker and the server. Nothing here is needed to run the
pipeline: `aot run` works without a server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POOL = "aot-local"


def _prefect() -> str:
    exe = Path(sys.executable).parent / "prefect"
    return str(exe) if exe.exists() else "prefect"


def wait_healthy(api: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} (is the port taken?)")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Prefect server at {api} did not answer within {timeout:.0f} s")


def register(env: dict) -> None:
    """The work pool (if missing) and every deployment of prefect.yaml."""
    exe = _prefect()
    have = subprocess.run([exe, "work-pool", "inspect", POOL], env=env, capture_output=True, text=True)
    if have.returncode != 0:
        subprocess.run(
            [exe, "work-pool", "create", POOL, "--type", "process"], env=env, check=True, capture_output=True, text=True
        )
    out = subprocess.run([exe, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def serve(host: str = "127.0.0.1", port: int = 4200, worker: bool = True, ready_file: str | None = None) -> int:
    api = f"http://{host}:{port}/api"
    env = dict(os.environ, PREFECT_API_URL=api, AOT_REPO=str(REPO))
    procs: list[subprocess.Popen] = []

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"starting the Prefect server on {host}:{port} ...", file=sys.stderr, flush=True)
        procs.append(
            subprocess.Popen(
                [_prefect(), "server", "start", "--host", host, "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_healthy(api, proc=procs[0])
        register(env)
        if worker:
            procs.append(
                subprocess.Popen(
                    [_prefect(), "worker", "start", "--pool", POOL],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        print(
            f"Prefect UI: http://{host}:{port}  (deployments registered, worker {'running' if worker else 'off'}; "
            f"Ctrl-C stops)",
            flush=True,
        )
        print(f"in another shell: export PREFECT_API_URL={api}", flush=True)
        from aot.cli import DEFAULT_ROOT  # the root the CLI and the deployments default to

        # the trainers' event files live in their versions' folders (tracking.report_to)
        print(f"training curves: tensorboard --logdir {DEFAULT_ROOT}", flush=True)
        if ready_file:
            Path(ready_file).write_text(api)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = next(p for p in procs if p.poll() is not None)
        print(f"error: {dead.args[1:3]} exited with code {dead.returncode}", file=sys.stderr)
        stop()
    except KeyboardInterrupt:
        stop()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in procs:
            p.terminate()
        return 1
    return 0
