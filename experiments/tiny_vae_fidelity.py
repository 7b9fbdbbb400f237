"""Can the tiny editor leave a target intact? Its fitted VAE against the integrity gate.

    python experiments/tiny_vae_fidelity.py --z-dim 4 16 --steps 1500 --batch 32   # on a GPU
    python experiments/tiny_vae_fidelity.py --tiny                                  # CPU smoke run

An edit can pass the attacker's integrity gate (every target box's localized SSIM >= tau) only if
the editor reproduces the unedited image closely: the VAE round trip is the ceiling of what any
edit keeps. Per latent width: fits the tiny Qwen-Image VAE to world images (``vae_fit``, cached
under ``$AOT_CACHE/tiny-vae`` as the editor does, so a later run with the same settings loads
it), then on held-out questions of the preset's world reports the whole-image SSIM of the round
trip, the mean and minimum target-box SSIM, and the fraction of questions whose every target box
passes tau. Writes ``OUT/<name>.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import add_config_args, device, environment, load_bench_config, parser, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    add_config_args(ap, "config override of the world, e.g. source.resolution=32")
    ap.add_argument("--z-dim", type=int, nargs="+", default=[4, 16], help="VAE latent channels to compare")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=512)
    ap.add_argument("--questions", type=int, default=128, help="held-out questions scored")
    ap.add_argument("--tau", type=float, nargs="+", default=[0.9], help="gates to report pass rates at")
    ap.add_argument(
        "--editor-steps",
        type=int,
        default=0,
        help="also fit the transformer (editor_fit) for this many steps and score its edits",
    )
    ap.add_argument(
        "--editor-spec", default="{}", help="tiny transformer size as YAML, e.g. '{layers: 4, head_dim: 32}'"
    )
    ap.add_argument(
        "--preset-fits",
        action="store_true",
        help="measure the preset's own attacker: its z_dim, transformer size, vae_fit and editor_fit "
        "(overrides --z-dim, --editor-spec, --steps/--scenes/--batch, --editor-steps); the fits "
        "land in the cache the experiment then loads",
    )
    ap.add_argument("--name", default="tiny_vae_fidelity")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.scenes, args.batch, args.questions = 3, 8, 2, 4
        args.editor_steps = min(args.editor_steps, 2)
    import numpy as np
    import torch
    import yaml

    from metrics import localized_ssim, region_ssim
    from models.editor import QwenImageEditor, attack_instruction
    from rl.flow_sampler import sample
    from stages.source import heldout_config, world_rows
    from storage import decode_image

    spec = yaml.safe_load(args.editor_spec) or {}
    _, _, cfg = load_bench_config(args)
    res = cfg.source.resolution
    model = cfg.attacker.model if isinstance(cfg.attacker.model, dict) else {}
    preset_fits = args.preset_fits and not args.tiny
    if preset_fits:
        spec = {k: model[k] for k in ("layers", "head_dim") if k in model}
        args.z_dim = [model.get("z_dim", 4)]  # build_tiny_qwen_image_edit's default
    dev = device()
    # Held-out questions: their target boxes are what the gate measures ("is there a ...? no" has none).
    hcfg = heldout_config(cfg)
    rows = world_rows(args.questions, hcfg.source.seed, hcfg, keep=lambda r: bool(r["target_boxes"]))

    def pass_rates(worst: list[float]) -> dict:
        return {str(t): float(np.mean([w >= t for w in worst])) for t in args.tau}

    info = environment(resolution=res, tau=args.tau, steps=args.steps, batch=args.batch, scenes=args.scenes)
    out = []
    for z in args.z_dim:
        t0 = time.perf_counter()
        vae_fit = {"steps": args.steps, "scenes": args.scenes, "batch": args.batch}
        editor_fit = (
            {"steps": args.editor_steps, "scenes": args.scenes, "batch": args.batch} if args.editor_steps else None
        )
        if preset_fits:
            vae_fit, editor_fit = model.get("vae_fit", vae_fit), model.get("editor_fit")
        if editor_fit:  # the VAE alone first (then cached), so a long run shows where it is
            QwenImageEditor.tiny(resolution=res, device=dev, z_dim=z, **spec, vae_fit=vae_fit)
            print(f"z {z:3d}: VAE fitted in {time.perf_counter() - t0:.0f} s", flush=True)
        ed = QwenImageEditor.tiny(resolution=res, device=dev, z_dim=z, **spec, editor_fit=editor_fit, vae_fit=vae_fit)
        fit_s = time.perf_counter() - t0  # VAE and editor fits (cached: 0 on a rerun)
        whole, boxes, worst = [], [], []
        for r in rows:
            clean = ed.resize(decode_image(r["image"]))
            back = ed.decode(ed.latents_of([clean]), ed.condition([clean], ["x"]))[0]
            whole.append(region_ssim(np.asarray(clean), np.asarray(back)))
            s = [localized_ssim(clean, back, b) for b in r["target_boxes"]]
            boxes += s
            worst.append(min(s))
        out.append(
            {
                "z_dim": z,
                "fit_seconds": round(fit_s, 1),
                "image_ssim": float(np.mean(whole)),
                "box_ssim_mean": float(np.mean(boxes)),
                "box_ssim_min": float(np.min(boxes)),
                "pass_rate": pass_rates(worst),
            }
        )
        if editor_fit:  # the fitted editor's own edits (a = 0), with the attacker's instruction
            worst = []
            for k in range(0, len(rows), 32):
                chunk = rows[k : k + 32]
                cleans = [ed.resize(decode_image(r["image"])) for r in chunk]
                cond = ed.condition(cleans, [attack_instruction(r["question"], r["target_names"]) for r in chunk])
                x = sample(
                    ed, cond, cfg.attacker.curriculum.sampling_steps, 0.0, generator=torch.Generator().manual_seed(k)
                ).latents[-1]
                for r, c, e in zip(chunk, cleans, ed.decode(x, cond)):
                    worst.append(min(localized_ssim(c, e, b) for b in r["target_boxes"]))
            out[-1]["edit_pass_rate"] = pass_rates(worst)
            out[-1]["edit_box_ssim_min_mean"] = float(np.mean(worst))
        r = out[-1]
        print(
            f"z {z:3d}: fit {r['fit_seconds']} s, image SSIM {r['image_ssim']:.3f}, target boxes mean "
            f"{r['box_ssim_mean']:.3f} min {r['box_ssim_min']:.3f}, pass rate by tau {r['pass_rate']}; edits: "
            f"{r.get('edit_pass_rate')}",
            flush=True,
        )
        write_results(args.out, args.name, info, out)
    return out


if __name__ == "__main__":
    main()
