"""Deterministic kernels for one-time fits whose weights are cached and then identify a model.

On a GPU, cuDNN picks convolution algorithms by benchmark and several backward kernels add with
atomics, so two fits of the tiny editor with the same seed on one card give different weights —
and so different editors under one version id (docs/reproducibility.md). A fit runs once per
machine, so its speed matters less than its bytes: fits run inside ``deterministic_kernels``."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def deterministic_kernels():
    """torch's deterministic algorithms (warn-only: an op without a deterministic kernel warns
    instead of failing), cuDNN deterministic and not benchmarking, attention on the math kernel
    (warn-only leaves the memory-efficient kernel's backward on atomics: two H200 fits of the
    tiny VAE, whose middle block is attention, differed by up to 3e-5 after 20 steps), cuBLAS
    with a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS first starts in the
    process: set it before anything runs on the GPU for cuBLAS to follow it); the previous
    settings come back after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
