"""Do two fits of the tiny editor with the same seed give the same weights? Default kernels
against ``models.deterministic.deterministic_kernels`` (what the fits now run in).

    python experiments/fit_determinism.py --steps 30        # on a GPU
    python experiments/fit_determinism.py --tiny            # CPU smoke run

Fits the tiny VAE (and then the transformer on world edit pairs) twice per mode from the same
seed, in one process, and compares the sha256 of the weights and the largest weight difference.
Writes ``OUT/<name>.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import device, environment, parser, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--name", default="fit_determinism")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.scenes = 2, 2, 4
    # cuBLAS reads its workspace setting once, when it starts: set here, both modes share it, and
    # the comparison is of the algorithm choices deterministic_kernels makes.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    from models.editor import QwenImageEditor, world_edit_pairs
    from world import WorldConfig, generate_world, render

    dev = device()
    world = WorldConfig(resolution=args.resolution)
    images = [render(generate_world(10_000_000 + i, world)) for i in range(args.scenes)]
    pairs = world_edit_pairs(args.scenes, args.resolution, 0)

    def fit(kind: str) -> dict[str, torch.Tensor]:
        ed = QwenImageEditor.tiny(resolution=args.resolution, device=dev, layers=4, head_dim=32)
        if kind == "vae":
            ed.fit_autoencoder(images, args.steps, batch=args.batch)
            return ed.pipe.vae.state_dict()
        ed.fit_editor(pairs, args.steps, batch=args.batch)
        return ed.transformer.state_dict()

    def digest(sd: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(sd[k].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    out = []
    for mode in ("default", "deterministic"):
        # "default": the kernels a fit ran with before (torch's defaults: atomics in some backwards)
        ctx = contextlib.nullcontext if mode == "deterministic" else _default_kernels
        for kind in ("vae", "editor"):
            t0 = time.perf_counter()
            with ctx():
                a, b = fit(kind), fit(kind)
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            out.append(
                {
                    "mode": mode,
                    "module": kind,
                    "steps": args.steps,
                    "identical": digest(a) == digest(b),
                    "sha256": [digest(a), digest(b)],
                    "max_abs_diff": diff,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(
                f"{mode:13s} {kind:6s}: identical {out[-1]['identical']}, max |diff| {diff:.3g} "
                f"({out[-1]['seconds']} s for two fits)",
                flush=True,
            )
    write_results(args.out, args.name, environment(device=dev), out)
    return out


@contextlib.contextmanager
def _default_kernels():
    """The fits as they ran before: deterministic_kernels made a no-op."""
    import models.editor as E

    saved = E.deterministic_kernels
    E.deterministic_kernels = contextlib.nullcontext
    try:
        yield
    finally:
        E.deterministic_kernels = saved


if __name__ == "__main__":
    main()
