"""Fit (or find cached) a preset's tiny attacker editor — its VAE and transformer fits — once,
under ``$AOT_CACHE``, so the processes of a GPU run that start beside it load it instead of each
waiting on the fit's lock with nothing to show (experiments/evidence_gpu.sh,
experiments/attacker_learnability_gpu.sh).

    python experiments/fit_preset_editor.py [PRESET]          # default: evidence
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    from config import load_config
    from experiments.common import preset_path
    from models.editor import load_editor

    preset = preset_path((argv if argv is not None else sys.argv[1:] or ["evidence"])[0])
    t = time.perf_counter()
    load_editor(load_config(preset).attacker.model)
    print(f"{preset}: tiny VAE and editor fitted and cached in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
