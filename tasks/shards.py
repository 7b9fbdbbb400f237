"""The one Prefect task of the data stages: process one shard of one stage.

- Cache key: content hash of (stage, output version, shard index, input shard hash). The output
  version already hashes the stage config, the code version and the input version, so the key
  is exactly "this input shard through this code and config" (Prefect's default key would
  include the flow run id and never hit across runs).
- Result: the shard's small JSON record (URIs, row counts, sha256), persisted under
  ``ROOT/_prefect/results`` so a cache hit works from any process or machine. Never images.
- Retries: exponential backoff, only for transient faults (network, timeouts, object-store
  hiccups). Bad data never reaches here as an exception: it becomes reject rows.
- Even without a Prefect cache hit, a shard whose parts are already in the store is not
  recomputed (``stages.runner.run_shard`` checks the store first).
"""

from __future__ import annotations

import hashlib

from prefect import task
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.tasks import exponential_backoff

from config import config_from_dict
from stages.runner import Shard, StagePlan, run_shard
from storage import ShardStore, StorageError, content_hash
from storage.store import PERMANENT_ERRNOS
from tasks import run_log  # noqa: F401  (progress lines of model loads into the run log)

SECRET_KEYS = ("key", "secret", "token", "password", "aws_secret_access_key", "aws_access_key_id")


PERMANENT_S3 = {
    "NoSuchBucket",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "NoSuchKey",
}


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: network and object-store hiccups. Not: a full disk, a read-only root, no
    permission, a missing file or bucket, bad data, bugs (those fail at once: a retry cannot help)."""
    if exc is None:
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    if code in PERMANENT_S3:
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "aiohttp", "aiobotocore", "urllib3", "requests")):
        return True
    return isinstance(exc, OSError)  # other OSErrors from fsspec backends (EIO, resets, 5xx)


def retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


def shard_cache_key(context, parameters: dict) -> str:
    p = parameters["plan"]
    s = parameters["shard"]
    return "shard-" + content_hash(
        {"stage": p["stage"], "version": p["version"], "index": s["index"], "input": s["input_key"]}, 32
    )


def results_storage(store: ShardStore):
    """A saved Prefect storage block for task results under ``ROOT/_prefect/results``.

    Prefect requires result storage blocks to be saved server-side. Credentials are left out of
    the block (s3fs reads them from the environment), so secrets never land in Prefect's DB.
    """
    base = store.path("_prefect", "results")
    name = "aot-results-" + hashlib.sha256(store.root_url.encode()).hexdigest()[:12]
    if store.is_local:
        block = LocalFileSystem(basepath=base)
    else:
        settings = {k: v for k, v in store.storage_options.items() if k.lower() not in SECRET_KEYS}
        block = RemoteFileSystem(basepath=store.url(base), settings=settings)
    block.save(name, overwrite=True)
    return block


@task(
    name="process-shard",
    task_run_name="{plan[stage]}-shard-{shard[index]}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
    cache_key_fn=shard_cache_key,
    persist_result=True,
    result_serializer="json",
)
def process_shard(plan: dict, shard: dict, config: dict, root: str, storage_options: dict | None = None) -> dict:
    store = ShardStore(root, storage_options)
    p = StagePlan.from_dict({**plan, "shards": []})
    s = Shard(**shard)
    record, recomputed = run_shard(store, p, s, config_from_dict(config))
    return {**record.to_dict(), "recomputed": recomputed}
