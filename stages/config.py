"""Typed pipeline configuration: dataclass defaults <- YAML preset <- ``--set a.b=value`` overrides.

Every field carries a ``help`` that says what it does and where its default comes from
(METHOD.md section, or "(default)" where the paper gives no value and the choice is ours).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from config_fields import documented

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


@dataclass
class SourceConfig:
    num_scenes: int = documented(64, "Synthetic source scenes to generate (issue 2: at least 64 by default).")
    shard_size: int = documented(16, "Rows per shard: one Prefect task each (DESIGN.md: a few hundred or fewer).")
    seed: int = documented(0, "Seed of the synthetic world; scene i is a pure function of (seed, i).")
    resolution: int = documented(128, "Source image side in pixels (default; small so the default run fits a laptop).")
    question_types: list = documented(["relative_position", "colour", "count", "existence"],
                              "Question types to draw (METHOD.md: V*-style spatial relations first).")
    question_weights: list = documented([0.7, 0.1, 0.1, 0.1], "Probability of each question type (default).")
    shuffle_options: bool = documented(True, "Shuffle each question's options (V*'s lists vary); false: a fixed "
                                       "canonical order, so a small defender need not find the answer's letter in "
                                       "the prompt (the evidence preset, RESULTS.md).")
    colour_options: int = documented(4, "Options of a colour question (V*: 4). With all colours and a fixed "
                                     "order, an option's letter names one colour in every question.")
    objects_min: int = documented(3, "Fewest objects fully inside a source window (default).")
    objects_max: int = documented(5, "Most objects fully inside a source window (default).")
    object_size: list = documented([0.10, 0.18], "Object side range, as fractions of the source window's side "
                                   "(default; larger objects are easier for a small defender to see).")
    outside_density: float = documented(0.35, "Object density outside the source window, relative to inside; "
                                      "what outpainting reveals (default).")
    max_image_pixels: int = documented(40_000_000, "Decompression-bomb guard for imported images (pixels).")


# Source fields that say how many scenes a run draws and how it stores them, not what a scene is.
RUN_ONLY_SOURCE_FIELDS = ("num_scenes", "shard_size", "seed", "max_image_pixels")


@dataclass
class ExtendConfig:
    canvas_scale: Any = documented([1.5, 2.0], "Canvas side / source side: a number, or [min, max] drawn per "
                                       "scene (METHOD.md: 1.5-2x per side).")
    max_pixels: int = documented(4_000_000, "Extended images above this are downscaled (METHOD.md: up to about 4 MP).")
    seed: int = documented(0, "Seed for per-scene canvas scales.")


@dataclass
class QualityConfig:
    clip_threshold: Any = documented(None, "Reject below this CLIP image-text cosine; null = record only "
                                   "(the synthetic preset's CLIP is a tiny random model).")
    composition_ssim_min: float = documented(0.98, "Original region SSIM needed by the composition check (default).")


@dataclass
class ImplantConfig:
    num_proposals: int = documented(8, "Distractor proposals K per image (DESIGN.md Stage 2; K is ours).")
    box_margin: float = documented(4.0, "Pixels of free margin required around every target box (box check).")
    box_min_frac: float = documented(0.04, "Smallest allowed box side, as a fraction of the image side (box check).")
    box_max_frac: float = documented(0.35, "Largest allowed box side, as a fraction of the image side (box check).")
    fill_batch: int = documented(1, "Proposals painted per inpainter call. 1 paints only what is verified; larger "
                                    "batches use a GPU better but may paint proposals after the first effective one.")
    detector_iou_min: float = documented(0.5, "IoU between a detection of the description and the box needed to "
                                      "confirm the distractor is there (default).")
    target_ssim_min: float = documented(0.95, "Localized SSIM every target box must keep (METHOD.md uses tau 0.9 "
                                      "for the attacker; implantation is stricter).")
    effectiveness_tries: int = documented(1, "k: an edit is effective when the base defender is wrong on k of k "
                                     "tries (METHOD.md: k = 1 greedy by default).")
    require_clean_correct: bool = documented(True, "Keep an edit only if the defender was right on the clean image, "
                                           "so the edit caused the failure (default).")
    seed: int = documented(0, "Seed for proposals.")


@dataclass
class ExportConfig:
    name: str = documented("aot-sft", "Dataset name in the dataset card.")


def _tiny_warmup():
    from training.config import DefenderTrainConfig

    return DefenderTrainConfig(mode="sft", steps=100, batch_prompts=32, lr=1e-3)


def _tiny_rl():
    from rl.config import DapoConfig
    from training.config import DefenderTrainConfig

    # Dynamic sampling off for the tiny defender: under DAPO it collapses to near-deterministic
    # answers (1-4% of groups informative on the embedded default's curricula), and the draw cap
    # would stop the co-evolution loop; uninformative groups then simply carry no gradient. The
    # full preset keeps DAPO's dynamic sampling (rl/config.py).
    return DefenderTrainConfig(mode="dapo", steps=100, batch_prompts=16, micro_batch=80, lr=1e-3, max_new_tokens=3,
                               dapo=DapoConfig(dynamic_sampling=False))


@dataclass
class DefenderConfig:
    model: dict = documented({"backend": "tiny", "seed": 0, "min_pixels": 4096, "max_pixels": 16384},
                     "The defender to start from: {backend: tiny, seed, min_pixels, max_pixels} (random init, "
                     "tiny Qwen2.5-VL) or {backend: qwen-vl, model: ID_OR_PATH, dtype, device}; either takes "
                     "vision_attention: grouped (default: the vision tower's windows batched into a few attention "
                     "calls instead of one per window; same results, models/vision_attention.py) | stock.")
    images: str = documented("both", "Which images of an AOT-SFT version to train and evaluate on: clean, adversarial or both.")
    max_examples: int = documented(0, "Use at most this many rows of the dataset version (0: all).")
    warmup: Any = field(default_factory=_tiny_warmup, metadata={"help": "Supervised warm-up (training/config.py)."})
    rl: Any = field(default_factory=_tiny_rl, metadata={"help": "DAPO stage (training/config.py); AOT: lr 1e-6, G 5."})


def _tiny_cold_start():
    from training.config import AttackerTrainConfig

    return AttackerTrainConfig(mode="sft", steps=20, sft_batch=4, lr=1e-3, lora_rank=8, lora_alpha=16)


def _tiny_attacker_rl():
    from rl.config import FlowGrpoConfig
    from training.config import AttackerRewardConfig, AttackerTrainConfig

    return AttackerTrainConfig(mode="grpo", steps=10, groups_per_step=2, lr=3e-2, lora_rank=8, lora_alpha=16,
                               flow_grpo=FlowGrpoConfig(group_size=8, sampling_steps=6, noise_level=1.0),
                               reward=AttackerRewardConfig(queries=3))


@dataclass
class CurriculumConfig:
    clean_fraction: float = documented(0.5, "Share of clean items in the curriculum (the rest: kept attacks). AOT "
                                            "mixes adversarial and clean samples; the paper does not state the ratio.")
    min_rows: int = documented(64, "Fill the curriculum with clean items up to this many rows (or every item): a "
                                   "weak attacker keeps few edits, and DAPO needs enough distinct prompts to find "
                                   "informative groups (dynamic sampling).")
    sampling_steps: int = documented(10, "Denoising steps of a curriculum edit (deterministic ODE sampler).")
    noise_level: float = documented(0.0, "SDE noise a of a curriculum edit; 0: the deterministic ODE sampler "
                                         "(Flow-GRPO's evaluation). Flow-GRPO trains the SDE policy "
                                         "(attacker.rl.flow_grpo.noise_level): a > 0 samples the curriculum as the "
                                         "attacker was trained (one item per sampler call, its noise seeded by the "
                                         "item), for when what it learned does not carry to ODE edits (RESULTS.md).")
    batch: int = documented(16, "Items edited per sampler call (throughput; each edit's noise is seeded by its item "
                                "alone, so results match one-by-one edits up to float rounding).")
    max_items: int = documented(0, "Attack at most this many items of the input version (0: all).")
    shard_size: int = documented(64, "Items per shard: each shard's edits are written when it finishes, so a crashed "
                                     "or retried run redoes only the unfinished shards (0: one shard).")
    seed: int = documented(0, "Seed of the edits' initial noise and of the clean items' choice.")
    describe: bool = documented(False, "Ask the judge (models.judge, an MLLM backend) to describe each kept edit; "
                                       "the description is stored and refines ambiguous strategy labels "
                                       "(METHOD.md, 'Emergent strategies').")


@dataclass
class AttackerConfig:
    model: dict = documented({"backend": "tiny", "seed": 0, "resolution": 64, "cfg_scale": 1.0},
                             "The editor: {backend: tiny, seed, resolution, cfg_scale} (random init, tiny "
                             "Qwen-Image-Edit; tiny-kontext: tiny FLUX.1-Kontext) or {backend: qwen-image-edit | "
                             "flux-kontext, model: ID_OR_PATH, resolution: 512, cfg_scale: 4 (Kontext: 1, it is "
                             "guidance-distilled), device, dtype}.")
    max_items: int = documented(0, "Use at most this many rows of the dataset version for training (0: all).")
    cold_start: Any = field(default_factory=_tiny_cold_start,
                            metadata={"help": "Cold start: flow matching on AOT-SFT pairs (training/config.py)."})
    rl: Any = field(default_factory=_tiny_attacker_rl,
                    metadata={"help": "Flow-GRPO against a frozen defender (training/config.py)."})
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


@dataclass
class CoevolutionConfig:
    iterations: int = documented(3, "N: attacker / curriculum / defender rounds (AOT reports iterations 1-3).")
    heldout_scenes: int = documented(32, "Held-out scenes (the source under another seed) for every evaluation.")
    heldout_seed_offset: int = documented(10_000, "source.seed + this = the held-out world's seed: never trained on.")
    warmup_scenes: int = documented(0, "Defender 0's supervised warm-up data: 0 = the AOT-SFT version's clean images; "
                                       "N = N fresh scenes of the same world (a small defender memorizes a few hundred "
                                       "images instead of learning the task: benchmarks/RESULTS.md, issue 8).")
    warmup_seed_offset: int = documented(20_000, "source.seed + this = the warm-up pool's seed (no scene in common "
                                                 "with the training items or the held-out world).")


DEFAULT_MODELS = {
    "outpainter": "synthetic",
    "inpainter": "synthetic",
    "judge": "synthetic",
    "clip": "tiny",
    "detector": "synthetic",
    "segmenter": "synthetic",
    "defender": "perception-baseline",
}


@dataclass
class PipelineConfig:
    dataset: str = documented("synthetic", "Dataset name: the first folder under the root.")
    source: SourceConfig = field(default_factory=SourceConfig)
    stage1: ExtendConfig = field(default_factory=ExtendConfig)
    filter: QualityConfig = field(default_factory=QualityConfig)
    stage2: ImplantConfig = field(default_factory=ImplantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    defender: DefenderConfig = field(default_factory=DefenderConfig)
    attacker: AttackerConfig = field(default_factory=AttackerConfig)
    coevolution: CoevolutionConfig = field(default_factory=CoevolutionConfig)
    models: dict = field(default_factory=lambda: dict(DEFAULT_MODELS), metadata={"help": "Backend of each model role."})

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
        from models import ModelConfigError, normalize_spec

        s = self.source
        _check(s.num_scenes >= 1, "source.num_scenes", "must be >= 1")
        _check(s.shard_size >= 1, "source.shard_size", "must be >= 1")
        _check(s.resolution >= 32, "source.resolution", "must be >= 32 pixels")
        _check(1 <= s.objects_min <= s.objects_max, "source.objects_min/objects_max", "need 1 <= min <= max")
        _check(len(s.question_types) == len(s.question_weights) and s.question_types,
               "source.question_weights", "needs one weight per question type")
        from world import COLOURS, QUESTION_TYPES

        _check(len(s.object_size) == 2 and 0 < s.object_size[0] <= s.object_size[1] < 1, "source.object_size",
               "needs [min, max] with 0 < min <= max < 1")
        _check(2 <= s.colour_options <= len(COLOURS), "source.colour_options", f"needs 2..{len(COLOURS)}")
        for q in s.question_types:
            _check(q in QUESTION_TYPES, "source.question_types", f"unknown type {q!r}; choose from {QUESTION_TYPES}")
        _check(all(w >= 0 for w in s.question_weights) and sum(s.question_weights) > 0,
               "source.question_weights", "must be >= 0 with a positive sum")
        lo, hi = canvas_scale_range(self.stage1.canvas_scale)
        _check(1.0 <= lo <= hi <= 4.0, "stage1.canvas_scale", "must be a number or [min, max] within 1..4")
        _check(self.stage1.max_pixels >= 64 * 64, "stage1.max_pixels", "must be >= 4096")
        q = self.filter
        _check(q.clip_threshold is None or isinstance(q.clip_threshold, (int, float)), "filter.clip_threshold",
               "must be a number or null")
        _check(0 <= q.composition_ssim_min <= 1, "filter.composition_ssim_min", "must be within 0..1")
        i = self.stage2
        _check(i.num_proposals >= 1, "stage2.num_proposals", "must be >= 1")
        _check(0 < i.box_min_frac < i.box_max_frac <= 1, "stage2.box_min_frac/box_max_frac", "need 0 < min < max <= 1")
        _check(i.fill_batch >= 1, "stage2.fill_batch", "must be >= 1")
        _check(i.effectiveness_tries >= 1, "stage2.effectiveness_tries", "must be >= 1")
        _check(0 <= i.target_ssim_min <= 1, "stage2.target_ssim_min", "must be within 0..1")
        _check(self.defender.images in ("clean", "adversarial", "both"), "defender.images",
               "must be clean, adversarial or both")
        for name in ("warmup", "rl"):
            t = getattr(self.defender, name)
            _check(t.mode in ("sft", "dapo") and t.steps >= 0 and t.batch_prompts >= 1 and t.lr > 0,
                   f"defender.{name}", "needs mode sft|dapo, steps >= 0, batch_prompts >= 1, lr > 0")
            _check(t.lr_schedule in ("constant", "cosine") and t.lr_warmup_steps >= 0, f"defender.{name}.lr_schedule",
                   "needs lr_schedule constant|cosine and lr_warmup_steps >= 0")
            _check(0 <= t.target_accuracy <= 1 and t.eval_every >= 1 and t.eval_examples >= 1,
                   f"defender.{name}.target_accuracy", "needs 0 <= target_accuracy <= 1, eval_every >= 1, "
                   "eval_examples >= 1")
            try:
                t.dapo.validate()
            except ValueError as exc:
                raise ConfigError(f"config defender.{name}.{exc}") from None
        a = self.attacker
        for name, mode in (("cold_start", "sft"), ("rl", "grpo")):
            t = getattr(a, name)
            _check(t.mode == mode and t.steps >= 0 and t.lr > 0 and t.groups_per_step >= 1 and t.sft_batch >= 1,
                   f"attacker.{name}", f"needs mode {mode}, steps >= 0, lr > 0, groups_per_step >= 1, sft_batch >= 1")
            _check(t.flow_grpo.group_size >= 2, f"attacker.{name}.flow_grpo.group_size", "must be >= 2 (advantages "
                   "are normalized within a group)")
            _check(t.flow_grpo.sampling_steps >= 2, f"attacker.{name}.flow_grpo.sampling_steps", "must be >= 2")
            _check(t.reward.queries >= 1 and -1 <= t.reward.tau <= 1, f"attacker.{name}.reward", "needs queries >= 1 "
                   "and -1 <= tau <= 1 (SSIM's range)")
        _check(self.coevolution.iterations >= 1 and self.coevolution.heldout_scenes >= 1
               and self.coevolution.warmup_scenes >= 0, "coevolution",
               "needs iterations >= 1, heldout_scenes >= 1 and warmup_scenes >= 0")
        _check(0 <= a.curriculum.clean_fraction < 1, "attacker.curriculum.clean_fraction", "must be within [0, 1)")
        _check(a.curriculum.shard_size >= 0, "attacker.curriculum.shard_size", "must be >= 0 (0: one shard)")
        _check(a.curriculum.noise_level >= 0, "attacker.curriculum.noise_level", "must be >= 0 (0: the ODE sampler)")
        from models.editor import EDITOR_BACKENDS

        _check(a.model.get("backend", "tiny") in EDITOR_BACKENDS, "attacker.model.backend",
               f"must be one of {', '.join(EDITOR_BACKENDS)}")
        for role, spec in self.models.items():
            try:
                normalize_spec(role, spec)
            except ModelConfigError as exc:
                raise ConfigError(str(exc)) from None
        return self


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {msg} (fix it in the preset or with --set {key.split('/')[0]}=...)")


def canvas_scale_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    raise ConfigError(f"config stage1.canvas_scale: {value!r} is neither a number nor [min, max]")


# ----------------------------------------------------------------- building
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config {key}: {value!r} does not fit {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config {key}: expected text, got {value!r}")
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if isinstance(value, base):
            return value
        raise ConfigError(f"config {key}: expected a {base.__name__}, got {value!r}")
    return value


def _deep_update(base: dict, update: dict) -> dict:
    if "backend" in update and update["backend"] != base.get("backend"):
        return dict(update)  # a spec naming another backend replaces it whole: options differ per backend
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _merge(obj: Any, data: dict, prefix: str, into_specs: bool = False) -> None:
    """Set ``data`` on the config ``obj``. A preset names a model spec whole (its mapping replaces
    the default); ``into_specs`` (command-line overrides) merges into a spec mapping instead, so
    ``--set defender.model.device=cpu`` changes the device and keeps the preset's model."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config {full}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            _merge(current, value, f"{full}.", into_specs)
        elif isinstance(current, dict) and isinstance(value, dict) and (into_specs or key == "models"):
            # a preset's ``models`` names roles' specs whole, beside the other roles' defaults
            setattr(obj, key, _deep_update(current, value) if into_specs else {**current, **value})
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def nest_dotted(dotted: dict) -> dict:
    """``{"stage1.canvas_scale": 1.75}`` -> ``{"stage1": {"canvas_scale": 1.75}}`` (nested keys pass through)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def dotted_pairs(pairs: list[str], what: str = "override") -> dict:
    """``["stage1.canvas_scale=1.75"]`` -> ``{"stage1.canvas_scale": 1.75}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{what} {pair!r} is not KEY=VALUE (e.g. --set stage1.canvas_scale=1.75)")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {pair!r}: value is not valid YAML ({exc})") from None
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """``["stage1.canvas_scale=1.75", "models.clip=tiny"]`` -> nested dict (values parsed as YAML)."""
    return nest_dotted(dotted_pairs(pairs))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str = "synthetic", overrides: list[str] | dict | None = None) -> PipelineConfig:
    cfg = PipelineConfig()
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"no preset {preset!r}; available: {', '.join(available_presets())} (or a path to a .yaml file)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping")
    _merge(cfg, data, "")
    if overrides:
        _merge(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides, "", into_specs=True)
    return cfg.validate()


def config_from_dict(data: dict) -> PipelineConfig:
    cfg = PipelineConfig()
    _merge(cfg, data, "")
    return cfg.validate()
