"""The ephemeral Prefect server a CLI run starts, and the one a killed run left behind.

Without ``PREFECT_API_URL`` a run starts its own Prefect server (a uvicorn subprocess). A normal
exit, Ctrl-C or SIGTERM stops it (aot/cli.py turns SIGTERM into an exception, so exit handlers
run); ``kill -9`` cannot, and the server lives on. So each run notes (CLI pid, server pid) in its
Prefect home, and the next run there ends a server whose CLI is gone.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

RECORD = "aot-ephemeral-server.json"


def _home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_prefect_server(pid: int) -> bool:
    cmd = _cmdline(pid)
    return "uvicorn" in cmd and "prefect" in cmd


def end_orphan() -> int | None:
    """End the server a killed run of this Prefect home left running; returns its pid, if any."""
    path = _home() / RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    cli, server = int(rec.get("cli", 0)), int(rec.get("server", 0))
    if cli and _alive(cli) and cli != os.getpid():
        return None  # its run is still going: the server is not an orphan
    path.unlink(missing_ok=True)
    if server and _alive(server) and _is_prefect_server(server):
        os.kill(server, signal.SIGTERM)
        return server
    return None


def start_and_note() -> int | None:
    """Start this run's ephemeral server now and note its pid (Linux: /proc); returns it."""
    if os.environ.get("PREFECT_API_URL") or not Path("/proc").is_dir():
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and _is_prefect_server(int(entry.name)):
            home = _home()
            home.mkdir(parents=True, exist_ok=True)
            (home / RECORD).write_text(json.dumps({"cli": me, "server": int(entry.name)}))
            return int(entry.name)
    return None
