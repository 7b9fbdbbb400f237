"""What every benchmark records about where it ran, and the CLI options they share."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def environment(**extra) -> dict:
    """Card, library versions and Python: the context every result table states."""
    import transformers

    env = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for name in ("diffusers", "trl"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    env.update(extra)
    return env


def _seconds(device: str, work, reps: int = 10, warm: int = 3) -> float:
    """Wall seconds of ``reps`` calls of ``work`` after ``warm`` untimed ones, the device idle at
    both ends (kernels are asynchronous on CUDA)."""
    import time

    for _ in range(warm):
        work()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def matmul_tflops(device: str) -> float:
    """The card's measured bf16 matmul rate (8192^3 GEMMs): the MFU denominator."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 * 10 / _seconds(device, lambda: a @ b) / 1e12


def memory_gbs(device: str, mib: int = 1024) -> float:
    """The device's measured memory bandwidth, GB/s: a ``mib`` MiB tensor copied 10 times (each
    copy reads and writes it). The denominator of a weight-reading floor: a decoding step that
    reads every weight once cannot take less than weight bytes / this."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 * 10 / _seconds(device, lambda: dst.copy_(src), warm=1) / 1e9


def step_timing(seconds: list[float], compiled: list[int] | None = None, slow: float = 1.5) -> dict:
    """The timing protocol of every step-timed benchmark. A step in which the compiler captured a
    graph (``compiled[i]``: graphs its own counter gained during step i, ``compiled_graphs``) paid
    for compilation and leaves the statistic; the others give the **median**, which one slow
    step cannot pull the way it pulls a mean; every step is kept, and any non-compiling step over
    ``slow`` x that median is flagged (``slow_steps``), so a slow step is shown, never averaged in
    or dropped unseen. If every step compiled, they all count (and all are compile steps)."""
    import statistics

    compiled = compiled if compiled is not None else [0] * len(seconds)
    if len(compiled) != len(seconds):
        raise ValueError(f"{len(seconds)} step times but {len(compiled)} compile counts")
    compile_steps = [i for i, c in enumerate(compiled) if c]
    steady = [i for i in range(len(seconds)) if i not in compile_steps] or list(range(len(seconds)))
    median = statistics.median(seconds[i] for i in steady) if seconds else float("nan")
    return {
        "median": median,
        "steps": list(seconds),
        "compile_steps": compile_steps,
        "slow_steps": [i for i in steady if seconds[i] > slow * median and i not in compile_steps],
    }


def compiled_graphs() -> int:
    """Graphs torch.compile has captured in this process so far (dynamo's own counter): a step
    that adds some paid for compilation (a new shape or attention-mask kind, or a recompile)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny configs (checks the code paths)")
    ap.add_argument("--out", default="experiments/results", help="folder for the JSON results")
    return ap


def add_config_args(ap: argparse.ArgumentParser, set_help: str = "config override, e.g. source.resolution=32") -> None:
    """``--preset`` and ``--set`` for a benchmark of the pipeline's config (see ``load_bench_config``)."""
    ap.add_argument("--preset", default=None, help="pipeline preset (default: evidence; with --tiny: synthetic)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


EVIDENCE_PRESET = str(Path(__file__).resolve().parent / "evidence.yaml")


def preset_path(name: str) -> str:
    """A preset name for the experiments: ``evidence`` is the evidence experiment's own preset
    (experiments/evidence.yaml); any other name or path is the pipeline's (config/presets/)."""
    return EVIDENCE_PRESET if name == "evidence" else name


def load_bench_config(args, tiny_overrides: list[str] | tuple = ()) -> tuple[str, list[str], object]:
    """(preset, overrides, config) of ``add_config_args``' options: the ``evidence`` preset, or with
    ``--tiny`` the ``synthetic`` one after ``tiny_overrides``; ``--set`` applies last."""
    from config import load_config

    preset = preset_path(args.preset or ("synthetic" if args.tiny else "evidence"))
    overrides = (list(tiny_overrides) if args.tiny else []) + args.overrides
    return preset, overrides, load_config(preset, overrides)


def loop_start(args, tiny_overrides: list[str] | tuple, root: str):
    """The co-evolution loop's starting point (stages.coevolution.loop_start) in a store under
    ``--root`` (default ``root``, ``-tiny`` appended with ``--tiny``): returns (preset, overrides,
    cfg, steps, say, start) — ``say`` prints progress lines timed from this call."""
    import time

    from stages.coevolution import loop_start as start_of_loop
    from stages.steps import LocalSteps
    from storage import ShardStore

    preset, overrides, cfg = load_bench_config(args, tiny_overrides)
    store = ShardStore(args.root or (root + ("-tiny" if args.tiny else "")))
    t0 = time.perf_counter()

    def say(m: str) -> None:
        print(f"{time.perf_counter() - t0:7.1f}s {m}", flush=True)

    steps = LocalSteps(store, cfg, say)
    return preset, overrides, cfg, steps, say, start_of_loop(steps, cfg)


def write_results(out_dir: str, name: str, info: dict, rows: list[dict]) -> None:
    """``OUT/<name>.json``: the environment and the result rows (rewritten after each row)."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"info": info, "results": rows}, indent=1))


def colours_in_view(scene_json: str) -> list[str]:
    """The colours of the objects a viewer would count in a source row's ``scene`` (one entry per
    object: two red objects give two entries)."""
    import json

    from world import Scene

    return [o.colour for o in Scene.from_dict(json.loads(scene_json)).visible()]


def accuracy_by_crowding(ids: list[str], correct: list[bool], crowded: dict[str, bool]) -> dict:
    """Accuracy (and n) on the items whose image shows one object (``clean_1obj``) and several
    (``clean_multi``); ``correct`` may be a probability per item; ids not in ``crowded`` count in
    neither."""
    out = {}
    for key, several in (("clean_1obj", False), ("clean_multi", True)):
        picked = [float(c) for i, c in zip(ids, correct) if crowded.get(i) is several]
        out[key], out[f"{key}_n"] = (sum(picked) / len(picked) if picked else None), len(picked)
    return out


def no_binding_accuracy(items) -> float | None:
    """Expected accuracy of answering a colour in view uniformly at random (each item: the list of
    its objects' colours; the right one is always among them): mean of 1 / #distinct colours. The
    score of a defender that sees colours but ties no shape name to them."""
    shares = [1 / len(set(c)) for c in items if c]
    return sum(shares) / len(shares) if shares else None


def no_binding_reference(in_view: dict[str, list[str]]) -> tuple[dict[str, bool], dict]:
    """From each item's colours in view: which items show several objects, and the no-binding
    score overall and split by one / several objects (``accuracy_by_crowding``'s keys)."""
    crowded = {i: len(c) > 1 for i, c in in_view.items()}
    reference = {"clean": no_binding_accuracy(in_view.values())}
    reference |= accuracy_by_crowding(list(in_view), [no_binding_accuracy([c]) for c in in_view.values()], crowded)
    return crowded, reference
