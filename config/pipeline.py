"""The pipeline's typed configuration: one section per stage, each field with its help.

A section's name is its stage's name (``source``, ``extend``, ``filter``, ``implant``,
``export``, ``defender``, ``attacker``, ``coevolution``): ``--set implant.num_proposals=4``
configures ``stages/implant.py``. Every default is the documented one (METHOD.md section, or
"(default)" where the paper gives no value and the choice is ours); presets
(``config/presets/``) specialise them, e.g. the tiny models' training settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from config.fields import Int, documented, settings
from config.training import EFFICACY_KINDS, AttackerTrainConfig, DefenderTrainConfig
from world import COLOURS, QUESTION_TYPES


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


@settings
class SourceConfig:
    num_scenes: Int = documented(
        64, "Synthetic source scenes to generate (default: enough for a useful AOT-SFT set on a laptop)."
    )
    shard_size: Int = documented(16, "Rows per shard: one Prefect task each (DESIGN.md: a few hundred or fewer).")
    seed: Int = documented(0, "Seed of the synthetic world; scene i is a pure function of (seed, i).")
    resolution: Int = documented(128, "Source image side in pixels (default; small so the default run fits a laptop).")
    question_types: list[str] = documented(
        ["relative_position", "colour", "count", "existence"],
        "Question types to draw (METHOD.md: V*-style spatial relations first).",
    )
    question_weights: list[float] = documented([0.7, 0.1, 0.1, 0.1], "Probability of each question type (default).")
    shuffle_options: bool = documented(
        True,
        "Shuffle each question's options (V*'s lists vary); false: a fixed "
        "canonical order, so a small defender need not find the answer's letter in "
        "the prompt (the evidence preset, experiments/RESULTS.md).",
    )
    colour_options: Int = documented(
        4,
        "Options of a colour question (V*: 4). With all colours and a fixed "
        "order, an option's letter names one colour in every question.",
    )
    objects_min: Int = documented(3, "Fewest objects fully inside a source window (default).")
    objects_max: Int = documented(5, "Most objects fully inside a source window (default).")
    object_size: list[float] = documented(
        [0.10, 0.18],
        "Object side range, as fractions of the source window's side "
        "(default; larger objects are easier for a small defender to see).",
    )
    outside_density: float = documented(
        0.35, "Object density outside the source window, relative to inside; what outpainting reveals (default)."
    )
    max_image_pixels: Int = documented(40_000_000, "Decompression-bomb guard for imported images (pixels).")


# Source fields that say how many scenes a run draws and how it stores them, not what a scene is.
RUN_ONLY_SOURCE_FIELDS = ("num_scenes", "shard_size", "seed", "max_image_pixels")


@settings
class ExtendConfig:
    canvas_scale: float | list[float] = documented(
        [1.5, 2.0], "Canvas side / source side: a number, or [min, max] drawn per scene (METHOD.md: 1.5-2x per side)."
    )
    max_pixels: Int = documented(4_000_000, "Extended images above this are downscaled (METHOD.md: up to about 4 MP).")
    seed: Int = documented(0, "Seed for per-scene canvas scales.")


@settings
class FilterConfig:
    clip_threshold: float | None = documented(
        None,
        "Reject below this CLIP image-text cosine; null = record only "
        "(the synthetic preset's CLIP is a tiny random model).",
    )
    composition_ssim_min: float = documented(0.98, "Original region SSIM needed by the composition check (default).")


@settings
class ImplantConfig:
    num_proposals: Int = documented(8, "Distractor proposals K per image (DESIGN.md Stage 2; K is ours).")
    box_margin: float = documented(4.0, "Pixels of free margin required around every target box (box check).")
    box_min_frac: float = documented(0.04, "Smallest allowed box side, as a fraction of the image side (box check).")
    box_max_frac: float = documented(0.35, "Largest allowed box side, as a fraction of the image side (box check).")
    fill_batch: Int = documented(
        1,
        "Proposals painted per inpainter call. 1 paints only what is verified; larger "
        "batches use a GPU better but may paint proposals after the first effective one.",
    )
    detector_iou_min: float = documented(
        0.5,
        "IoU between a detection of the description and the box needed to confirm the distractor is there (default).",
    )
    target_ssim_min: float = documented(
        0.95,
        "Localized SSIM every target box must keep (METHOD.md uses tau 0.9 "
        "for the attacker; implantation is stricter).",
    )
    effectiveness_tries: Int = documented(
        1,
        "k: an edit is effective when the base defender is wrong on k of k tries (METHOD.md: k = 1 greedy by default).",
    )
    require_clean_correct: bool = documented(
        True,
        "Keep an edit only if the defender was right on the clean image, so the edit caused the failure (default).",
    )
    seed: Int = documented(0, "Seed for proposals.")


@settings
class ExportConfig:
    name: str = documented("aot-sft", "Dataset name in the dataset card.")


@settings
class DefenderConfig:
    model: dict = documented(
        {"backend": "tiny", "seed": 0, "min_pixels": 4096, "max_pixels": 16384},
        "The defender to start from: {backend: tiny, seed, min_pixels, max_pixels} (random init, "
        "tiny Qwen2.5-VL), {backend: qwen-vl, model: ID_OR_PATH, dtype, device}, or {backend: base}: "
        "Stage 2's base defender (models.defender, warm-up included), the model the data was "
        "filtered against, as AOT's defender starts from its base MLLM; the first two take "
        "vision_attention: grouped (default: the vision tower's windows batched into a few attention "
        "calls instead of one per window; same results, models/vision_attention.py) | stock, and "
        "image_device: where the image processor resizes and patchifies (default the CPU; cuda moves "
        "that work of large benchmark images onto the card), and text_attention: packed (default: a "
        "decoding step attends with the query heads that share a key-value head packed onto it, where "
        "transformers' SDPA path copies every key-value head per query head; the same attention up to "
        "float rounding, "
        "models/text_attention.py) | stock.",
    )
    images: str = documented(
        "both", "Which images of an AOT-SFT version to train and evaluate on: clean, adversarial or both."
    )
    max_examples: Int = documented(0, "Use at most this many rows of the dataset version (0: all).")
    warmup: DefenderTrainConfig = documented(
        DefenderTrainConfig(),
        "Defender 0's warm-up (config/training.py). AOT: "
        "a DAPO stage on clean data, 100 steps (METHOD.md); a defender that "
        "starts from random weights warms up supervised (mode sft).",
    )
    rl: DefenderTrainConfig = documented(
        DefenderTrainConfig(),
        "Each iteration's DAPO stage (config/training.py); "
        "AOT's values (METHOD.md): lr 1e-6, G 5, 4096-token responses.",
    )


@settings
class CurriculumConfig:
    clean_fraction: float = documented(
        0.5,
        "Share of clean items in the curriculum (the rest: kept attacks). AOT "
        "mixes adversarial and clean samples; the paper does not state the ratio.",
    )
    min_rows: Int = documented(
        64,
        "Fill the curriculum with clean items up to this many rows (or every item): a "
        "weak attacker keeps few edits, and DAPO needs enough distinct prompts to find "
        "informative groups (dynamic sampling).",
    )
    sampling_steps: Int = documented(10, "Denoising steps of a curriculum edit (deterministic ODE sampler).")
    noise_level: float = documented(
        0.0,
        "SDE noise a of a curriculum edit; 0: the deterministic ODE sampler "
        "(Flow-GRPO's evaluation). Flow-GRPO trains the SDE policy "
        "(attacker.rl.flow_grpo.noise_level): a > 0 samples the curriculum as the "
        "attacker was trained (one item per sampler call, its noise seeded by the "
        "item), for when what it learned does not carry to ODE edits (experiments/RESULTS.md).",
    )
    batch: Int = documented(
        16,
        "Items edited per sampler call and scored per defender call (throughput; each edit's "
        "noise is seeded by its item alone and each sampled answer by its query's seed alone, "
        "so results match one-by-one edits and answers up to float rounding).",
    )
    max_items: Int = documented(0, "Attack at most this many items of the input version (0: all).")
    shard_size: Int = documented(
        64,
        "Items per shard: each shard's edits are written when it finishes, so a crashed "
        "or retried run redoes only the unfinished shards (0: one shard).",
    )
    seed: Int = documented(0, "Seed of the edits' initial noise and of the clean items' choice.")
    describe: bool = documented(
        False,
        "Ask the judge (models.judge, an MLLM backend) to describe each kept edit; "
        "the description is stored and refines ambiguous strategy labels "
        "(METHOD.md, 'Emergent strategies').",
    )


@settings
class AttackerConfig:
    model: dict = documented(
        {"backend": "tiny", "seed": 0, "resolution": 64, "cfg_scale": 1.0},
        "The editor: {backend: tiny, seed, resolution, cfg_scale} (random init, tiny "
        "Qwen-Image-Edit; tiny-kontext: tiny FLUX.1-Kontext) or {backend: qwen-image-edit | "
        "flux-kontext, model: ID_OR_PATH, resolution: 512, cfg_scale: 4 (Kontext: 1, it is "
        "guidance-distilled), device, dtype}.",
    )
    max_items: Int = documented(0, "Use at most this many rows of the dataset version for training (0: all).")
    cold_start_scenes: Int = documented(
        0,
        "The cold start's pairs: 0 = the run's AOT-SFT version; N = the oracle implanter's verified "
        "distractors (Stage 2 without the defender) on N fresh scenes of the same world: it renders one "
        "for nearly any scene, so the cold start is not limited to the few rows Stage 2 keeps.",
    )
    cold_start_seed_offset: Int = documented(
        40_000, "source.seed + this = that pool's seed (no scene in common with the items, held-out or warm-up)."
    )
    cold_start_named: float = documented(
        1.0,
        "Share of cold-start pairs whose instruction names the distractor ('Add a red square ...'); "
        "the rest get the instruction the attacker is given on fresh items ('Change the scene ...'), "
        "which names none: with 1.0 the cold start never sees the instruction it is used with.",
    )
    cold_start: AttackerTrainConfig = documented(
        AttackerTrainConfig(mode="sft"), "Cold start: flow matching on AOT-SFT pairs (config/training.py)."
    )
    rl: AttackerTrainConfig = documented(
        AttackerTrainConfig(),
        "Flow-GRPO against a frozen defender (config/training.py; Flow-GRPO's reference values, METHOD.md).",
    )
    curriculum: CurriculumConfig = documented(CurriculumConfig(), "The frozen attacker's curriculum (above).")
    keep_targets: bool = documented(
        False,
        "Give every target box back from the clean image after each edit (Flow-GRPO's rollouts, the "
        "curriculum, the aot-attacker attack), as inpainting pastes back its unmasked region: the "
        "attacker can then only change the scene around the targets, which keeps the ground truth by "
        "construction. Off is the paper's attacker, which edits the whole image and is gated by target "
        "SSIM; on the tiny editor Flow-GRPO then traded integrity against efficacy (experiments/RESULTS.md).",
    )
    keep_target_shapes: bool = documented(
        False,
        "With keep_targets: give back the target objects' own pixels (their outlines, from the row's "
        "scene: synthetic rows) instead of their whole boxes; a target the scene does not place keeps "
        "its box. A pasted box leaves a clean rectangle around the target in every edit whose change "
        "reaches it, a cue a defender trained on the curriculum can learn to read instead of the object "
        "(the backdrop-tint / backdrop-tint-outline columns tell which, experiments/RESULTS.md). The "
        "target SSIM gate then compares the targets' shapes (training.attacker_rewards.targets_view): "
        "gated on the whole box, its background made Flow-GRPO trade integrity for efficacy again "
        "(the CPU loop's held-out integrity fell 0.83 -> 0.39 over three iterations).",
    )
    edits_at_source_size: bool = documented(
        False,
        "Apply each edit to the image at its own size (the clean image plus the edit's change, "
        "upsampled) instead of scoring and keeping the editor-sized image, wherever the editor's "
        "resolution is below the image's (Flow-GRPO's rewards, the curriculum's rows, the aot-attacker "
        "attack). A defender judged on the downscaled image fails it for the downscale, so an "
        "attacker's success there is mostly the resize's (the embedded default: 78% of clean 64-px "
        "canvases failed against 48% at their own size, experiments/RESULTS.md); a photo editor at "
        "1024 px meets 4K HR-Bench images the same way. Off keeps every image at the editor's size.",
    )
    change_from_reconstruction: bool = documented(
        False,
        "Take each edit's change against the editor's own reconstruction of its input (the "
        "autoencoder's round trip: what an edit that changes nothing comes out as) instead of the "
        "input, and add it to the clean image, wherever an edit is applied (Flow-GRPO's rewards, the "
        "curriculum, the aot-attacker attack). Off, what a small editor's autoencoder loses is part "
        "of every edit (round-trip SSIM ~0.92 for the evidence preset's fit): every attacked image "
        "is blurred except the targets given back (keep_targets), a crisp region a defender trained "
        "on the curriculum can learn to look for instead of binding the question to its object "
        "(experiments/RESULTS.md). On, the pixels the editor leaves as it would leave an unedited "
        "image come back exactly clean, and only what it drew is new.",
    )
    change_floor: Int = documented(
        0,
        "Drop every pixel's change smaller than this many 8-bit levels in all three channels (at the "
        "editor's size, before carrying; 0: keep every change), wherever an edit is applied. A small "
        "editor copies the scene it does not edit only roughly: after change_from_reconstruction the "
        "embedded default's trained attacker still moved the median pixel by 10 levels, a washed-out "
        "scene around crisp targets given back; its colour strokes move pixels by 64-255 "
        "(experiments/RESULTS.md). A photo editor leaves what it does not edit as it was.",
    )


@settings
class CoevolutionConfig:
    iterations: Int = documented(3, "N: attacker / curriculum / defender rounds (AOT reports iterations 1-3).")
    heldout_scenes: Int = documented(32, "Held-out scenes (the source under another seed) for every evaluation.")
    heldout_seed_offset: Int = documented(
        1000,
        "source.seed + this = the held-out world's seed, never trained on: the "
        "co-evolution's evaluations and the synthetic robustness suite.",
    )
    warmup_scenes: Int = documented(
        0,
        "Defender 0's supervised warm-up data: 0 = the AOT-SFT version's clean images; "
        "N = N fresh scenes of the same world (a small defender memorizes a few hundred "
        "images instead of learning the task: experiments/RESULTS.md).",
    )
    warmup_objects_min: Int = documented(
        0,
        "Fewest objects in a warm-up scene (0 = source.objects_min). With single objects in the pool "
        "a small defender settles on 'answer a colour in view' and never ties the question's shape "
        "to its colour; with at least 2 it does (experiments/RESULTS.md, 'the warm-up binds').",
    )
    curriculum_replay: Int = documented(
        0,
        "The defender phase of iteration n also trains on the training curricula of up to this many "
        "earlier iterations (0: its own only; its number of steps is unchanged, so replay changes "
        "the mix, not the amount of training). METHOD.md does not say what a phase trains on beyond "
        "its own curriculum; an attacker that settles on one strategy gives a phase one attack to "
        "learn, which held out did not transfer to other attacks (experiments/RESULTS.md, evidence run 4).",
    )
    warmup_seed_offset: Int = documented(
        20_000,
        "source.seed + this = the warm-up pool's seed (no scene in common "
        "with the training items or the held-out world).",
    )


TRACKERS = ("tensorboard", "mlflow", "wandb", "none")  # tracking.report_to's choices (training/tracking.py)


@settings
class TrackingConfig:
    report_to: list[str] = documented(
        ["tensorboard"],
        "Where every trainer's per-step rows (and every data stage's counts and reject reasons) go "
        "besides its version (as TRL's report_to): "
        "tensorboard (event files in the version's folder, under _work/tensorboard while it "
        "trains on a local root: `tensorboard --logdir ROOT`), mlflow (the server MLFLOW_TRACKING_URI "
        "names, experiment MLFLOW_EXPERIMENT_NAME or 'aot'; the co-evolution run nests its iterations "
        "and their phases), wandb (an offline run under WANDB_DIR, default ./wandb, project "
        "WANDB_PROJECT or 'aot'; WANDB_MODE=online logs live, `wandb sync` uploads later), or none.",
    )


DEFAULT_MODELS = {
    "outpainter": "synthetic",
    "inpainter": "synthetic",
    "judge": "synthetic",
    "clip": "tiny",
    "detector": "synthetic",
    "segmenter": "synthetic",
    "defender": "perception-baseline",
}


@settings
class PipelineConfig:
    dataset: str = documented("synthetic", "Dataset name: the first folder under the root.")
    source: SourceConfig = field(default_factory=SourceConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    implant: ImplantConfig = field(default_factory=ImplantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    defender: DefenderConfig = field(default_factory=DefenderConfig)
    attacker: AttackerConfig = field(default_factory=AttackerConfig)
    coevolution: CoevolutionConfig = field(default_factory=CoevolutionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    models: dict = documented(
        DEFAULT_MODELS,
        "Backend of each model role: a name, or {backend: NAME, **options} (stages/registry.py lists the backends).",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_spec(self, role: str) -> dict | str:
        """``models[role]`` as this run loads it: a warmed tiny defender (``warmup``) learns this
        run's world (question mix, object sizes), not the default one, so the world goes into
        its spec and with it into its cache key. Only the fields that shape a scene go in: the
        number of scenes, the shard size and the seed do not change what the warm-up trains on
        (it draws its own scenes under ``warmup.seed``), so changing them reuses the cache."""
        spec = self.models[role]
        if role == "defender" and isinstance(spec, dict) and "warmup" in spec:
            world = {k: v for k, v in dataclasses.asdict(self.source).items() if k not in RUN_ONLY_SOURCE_FIELDS}
            spec = {**spec, "warmup": {"source": world, **spec["warmup"]}}
        return spec

    def validate(self) -> "PipelineConfig":
        """The checks a type cannot express (ranges, relations between fields). Model backends
        are checked by the registry (``stages.registry.check_specs``), which knows them."""
        s = self.source
        _check(s.num_scenes >= 1, "source.num_scenes", "must be >= 1")
        _check(s.shard_size >= 1, "source.shard_size", "must be >= 1")
        _check(s.resolution >= 32, "source.resolution", "must be >= 32 pixels")
        _check(1 <= s.objects_min <= s.objects_max, "source.objects_min/objects_max", "need 1 <= min <= max")
        _check(
            len(s.question_types) == len(s.question_weights) and s.question_types,
            "source.question_weights",
            "needs one weight per question type",
        )
        _check(
            len(s.object_size) == 2 and 0 < s.object_size[0] <= s.object_size[1] < 1,
            "source.object_size",
            "needs [min, max] with 0 < min <= max < 1",
        )
        _check(2 <= s.colour_options <= len(COLOURS), "source.colour_options", f"needs 2..{len(COLOURS)}")
        for q in s.question_types:
            _check(q in QUESTION_TYPES, "source.question_types", f"unknown type {q!r}; choose from {QUESTION_TYPES}")
        _check(
            all(w >= 0 for w in s.question_weights) and sum(s.question_weights) > 0,
            "source.question_weights",
            "must be >= 0 with a positive sum",
        )
        lo, hi = canvas_scale_range(self.extend.canvas_scale)
        _check(1.0 <= lo <= hi <= 4.0, "extend.canvas_scale", "must be a number or [min, max] within 1..4")
        _check(self.extend.max_pixels >= 64 * 64, "extend.max_pixels", "must be >= 4096")
        q = self.filter
        _check(0 <= q.composition_ssim_min <= 1, "filter.composition_ssim_min", "must be within 0..1")
        i = self.implant
        _check(i.num_proposals >= 1, "implant.num_proposals", "must be >= 1")
        _check(0 < i.box_min_frac < i.box_max_frac <= 1, "implant.box_min_frac/box_max_frac", "need 0 < min < max <= 1")
        _check(i.fill_batch >= 1, "implant.fill_batch", "must be >= 1")
        _check(i.effectiveness_tries >= 1, "implant.effectiveness_tries", "must be >= 1")
        _check(0 <= i.target_ssim_min <= 1, "implant.target_ssim_min", "must be within 0..1")
        _check(
            self.defender.images in ("clean", "adversarial", "both"),
            "defender.images",
            "must be clean, adversarial or both",
        )
        for name in ("warmup", "rl"):
            t = getattr(self.defender, name)
            _check(
                t.mode in ("sft", "dapo") and t.steps >= 0 and t.batch_prompts >= 1 and t.lr > 0,
                f"defender.{name}",
                "needs mode sft|dapo, steps >= 0, batch_prompts >= 1, lr > 0",
            )
            _check(
                t.lr_schedule in ("constant", "cosine") and t.lr_warmup_steps >= 0,
                f"defender.{name}.lr_schedule",
                "needs lr_schedule constant|cosine and lr_warmup_steps >= 0",
            )
            _check(
                0 <= t.target_accuracy <= 1 and t.eval_every >= 1 and t.eval_examples >= 1,
                f"defender.{name}.target_accuracy",
                "needs 0 <= target_accuracy <= 1, eval_every >= 1, eval_examples >= 1",
            )
            try:
                t.dapo.validate()
            except ValueError as exc:
                raise ConfigError(f"config defender.{name}.{exc}") from None
        a = self.attacker
        for name, mode in (("cold_start", "sft"), ("rl", "grpo")):
            t = getattr(a, name)
            _check(
                t.mode == mode and t.steps >= 0 and t.lr > 0 and t.groups_per_step >= 1 and t.sft_batch >= 1,
                f"attacker.{name}",
                f"needs mode {mode}, steps >= 0, lr > 0, groups_per_step >= 1, sft_batch >= 1",
            )
            _check(
                t.flow_grpo.group_size >= 2,
                f"attacker.{name}.flow_grpo.group_size",
                "must be >= 2 (advantages are normalized within a group)",
            )
            _check(t.flow_grpo.sampling_steps >= 2, f"attacker.{name}.flow_grpo.sampling_steps", "must be >= 2")
            _check(
                t.reward.queries >= 1 and -1 <= t.reward.tau <= 1,
                f"attacker.{name}.reward",
                "needs queries >= 1 and -1 <= tau <= 1 (SSIM's range)",
            )
            _check(
                t.reward.efficacy in EFFICACY_KINDS,
                f"attacker.{name}.reward.efficacy",
                f"must be one of {EFFICACY_KINDS}, not {t.reward.efficacy!r}",
            )
        _check(
            self.coevolution.iterations >= 1
            and self.coevolution.heldout_scenes >= 1
            and self.coevolution.warmup_scenes >= 0,
            "coevolution",
            "needs iterations >= 1, heldout_scenes >= 1 and warmup_scenes >= 0",
        )
        _check(
            self.coevolution.warmup_objects_min == 0 or 1 <= self.coevolution.warmup_objects_min <= s.objects_max,
            "coevolution.warmup_objects_min",
            f"must be 0 (source.objects_min) or within 1..source.objects_max ({s.objects_max})",
        )
        _check(
            a.cold_start_scenes >= 0 and 0 <= a.cold_start_named <= 1,
            "attacker.cold_start_scenes",
            "needs cold_start_scenes >= 0 and 0 <= attacker.cold_start_named <= 1",
        )
        _check(
            a.keep_targets or not a.keep_target_shapes,
            "attacker.keep_target_shapes",
            "gives back the targets' shapes instead of their boxes: it needs attacker.keep_targets on",
        )
        _check(0 <= a.curriculum.clean_fraction < 1, "attacker.curriculum.clean_fraction", "must be within [0, 1)")
        _check(a.curriculum.shard_size >= 0, "attacker.curriculum.shard_size", "must be >= 0 (0: one shard)")
        _check(
            a.curriculum.batch >= 1 and a.curriculum.shard_size % a.curriculum.batch == 0,
            "attacker.curriculum.shard_size",
            "must be a multiple of attacker.curriculum.batch (>= 1): a shard then "
            "makes the sampler calls of the whole run, and its edits are bit-identical to an unsharded run's",
        )
        _check(a.curriculum.noise_level >= 0, "attacker.curriculum.noise_level", "must be >= 0 (0: the ODE sampler)")
        _check(0 <= self.attacker.change_floor <= 255, "attacker.change_floor", "must be within 0..255 (8-bit levels)")
        _check(self.coevolution.curriculum_replay >= 0, "coevolution.curriculum_replay", "must be >= 0 (0: no replay)")
        _check(
            set(self.tracking.report_to) <= set(TRACKERS),
            "tracking.report_to",
            f"choose from {list(TRACKERS)} (got {self.tracking.report_to})",
        )
        return self


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {msg} (fix it in the preset or with --set {key.split('/')[0]}=...)")


def canvas_scale_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    raise ConfigError(f"config extend.canvas_scale: {value!r} is neither a number nor [min, max]")
