"""Where derived model files live on this machine (downloaded checkpoints, warm starts, fits),
the one way to put something there (built once, atomically, whoever else is waiting), and the
kernel family that a trained file's bytes depend on (part of its key and of version ids)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def cache_root() -> Path:
    """``$AOT_CACHE`` (read at each call, so tests and users can point it elsewhere), else ~/.cache/aot."""
    return Path(os.environ.get("AOT_CACHE", Path.home() / ".cache" / "aot"))


@contextlib.contextmanager
def build_lock(path: Path):
    """Hold an exclusive lock for building ``path`` (a file lock beside it): concurrent builders —
    threads or processes, e.g. the evidence run's seeds — build once; the others wait here, then
    find it built. The OS drops the lock if its holder dies, so a crash never leaves others waiting."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_once(path: Path, build: Callable[[Path], None], folder: bool = True) -> Path:
    """``path`` in the cache, made by ``build(tmp)`` if it is not there yet. ``build`` writes a
    temporary folder (or file, ``folder=False``) beside ``path``, which is then renamed into place:
    a reader never sees a half-written result, and a crashed build leaves only a temporary name
    (removed here on failure). Concurrent callers build once (``build_lock``)."""
    if path.exists():
        return path
    with build_lock(path):
        if path.exists():  # another builder finished while we waited
            return path
        tmp = Path(
            tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-")
            if folder
            else path.with_name(f".{path.name}.{os.getpid()}.tmp")
        )
        try:
            build(tmp)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink(missing_ok=True)
            raise
    return path


# Fits that ship with the code, as ``<kind>/<hash of the fit key without its machine fields>.safetensors``
# (or a folder of that name): the embedded default's editor fits and its warmed Stage 2 defender
# (minutes on a 2-core CPU, once per machine otherwise), made by experiments/ship_fits.py. Every
# machine then computes with the same bytes, whatever its kernels.
SHIPPED_FITS = Path(__file__).resolve().parent / "fitted"
MACHINE_FIELDS = ("kernels", "threads")  # what a fit key says of the machine that fitted, not of the fit
# A key's code version is left out of a shipped name too: a shipped fit is an artifact of the code
# that made it (its metadata says which), used until it is shipped again, as a downloaded
# checkpoint is; its bytes are hashed into the versions of the stages that use it
# (stages/version.MODULE_DATA).
SHIPPED_NAME_IGNORES = (*MACHINE_FIELDS, "code")


def shipped_fit_path(kind: str, key: dict, suffix: str = ".safetensors") -> Path:
    """Where the fit of ``kind`` with ``key`` ships: named by the key without the machine and code
    fields (SHIPPED_NAME_IGNORES), since a shipped file is the same on every machine. ``suffix``
    "" names a folder (a saved model)."""
    from storage import content_hash

    portable = {k: v for k, v in key.items() if k not in SHIPPED_NAME_IGNORES}
    return SHIPPED_FITS / kind / f"{content_hash(portable)}{suffix}"


def shipped_fit(kind: str, key: dict, suffix: str = ".safetensors") -> Path | None:
    """The shipped fit of ``kind`` for ``key``, if there is one and ``$AOT_NO_SHIPPED_FITS`` is
    unset (set it to fit afresh, as experiments/ship_fits.py does)."""
    path = shipped_fit_path(kind, key, suffix)
    return path if path.exists() and not os.environ.get("AOT_NO_SHIPPED_FITS") else None


def kernel_family(devices: Iterable[str] = ("cpu",)) -> dict:
    """Which floating-point kernels a learned model's outputs come from: the torch version, the
    CPU vendor and the instruction set torch dispatches to (AVX2 and AVX-512 round differently),
    and the GPU where one is used."""
    import platform

    import torch

    out = {
        "torch": torch.__version__,
        "cpu": f"{_cpu_vendor()} {torch.backends.cpu.get_cpu_capability()}",
        "machine": platform.machine(),
    }
    for device in sorted(set(devices)):
        if str(device).startswith("cuda") and torch.cuda.is_available():
            out["cuda"] = f"{torch.cuda.get_device_name()} (cuda {torch.version.cuda})"
    return out


@functools.lru_cache(maxsize=1)
def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
