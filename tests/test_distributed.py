"""Data-parallel defender training under torchrun (2 CPU ranks, gloo): the same update as one
process on the same global batch, and rank 0 alone writes the version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import load_config
from stages.runner import run_stage
from storage import ShardStore

ARGS = [
    "--set",
    "source.num_scenes=8",
    "--set",
    "source.shard_size=8",
    "--set",
    "defender.warmup.steps=3",
    "--set",
    "defender.warmup.batch_prompts=8",
    "--set",
    "defender.warmup.lr=0.01",
    "--set",
    "defender.model={backend: tiny, seed: 0, min_pixels: 1024, max_pixels: 4096}",
]


def _weights(store: ShardStore, version: str) -> dict:
    from safetensors.torch import load_file

    from stages.defender import fetch_version

    return load_file(str(fetch_version(store, store.manifest(version)) / "model.safetensors"))


@pytest.mark.slow
def test_two_ranks_take_the_single_process_step(tmp_path):
    cfg = load_config("synthetic", {"source": {"num_scenes": 8, "shard_size": 8}})
    repo = Path(__file__).resolve().parent.parent
    out = {}
    for name, launcher in (
        ("single", [sys.executable, "-m", "aot.cli"]),
        (
            "ddp",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                "29533",
                "-m",
                "aot.cli",
            ],
        ),
    ):
        store = ShardStore(str(tmp_path / name))
        data = run_stage(store, "source", cfg).version
        env = dict(os.environ, OMP_NUM_THREADS="1", AOT_CACHE=str(tmp_path / f"cache-{name}"))
        proc = subprocess.run(
            [
                *launcher,
                "train-defender",
                "--no-prefect",
                "--no-progress",
                "--data",
                data,
                "--root",
                str(tmp_path / name),
                *ARGS,
            ],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (m,) = store.versions(stage="defender")
        out[name] = (store, m)
    (s1, m1), (s2, m2) = out["single"], out["ddp"]
    assert m1.version == m2.version and m2.extra["ranks"] == 2 and m1.extra["ranks"] == 1
    l1, l2 = s1.read(m1)["loss"].to_list(), s2.read(m2)["loss"].to_list()
    assert len(l1) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(l1, l2)), (l1, l2)
    w1, w2 = _weights(s1, m1.version), _weights(s2, m2.version)
    assert set(w1) == set(w2)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
