"""The attacker: a flow-matching, instruction-guided image editor with LoRA adapters.

Full: ``Qwen/Qwen-Image-Edit`` through diffusers' ``QwenImageEditPipeline``, or
``black-forest-labs/FLUX.1-Kontext-dev`` through ``FluxKontextPipeline``. ``tiny``: the same
pipeline classes from small random components (shared/notes/dependencies.md §4.6, §4.7) with
locally built tokenizers and processors, no download.

Flow-GRPO needs the denoiser as a function, not the pipeline's closed loop, so this adapter
exposes the four pieces our sampler (rl/flow_sampler.py) composes — ``condition`` (prompt
embeddings and condition-image latents, computed once per group), ``velocity`` (one transformer
call with the model's own classifier-free guidance), ``schedule`` and ``decode`` — and reuses
the pipeline's own helpers for everything else (prompt encoding, VAE encode, packing, decoding).

Both pipelines resize to about 1024^2 whatever the input (26 s and 274 s per call even with
tiny models, notes §4.6-4.7); here the edit size always comes from ``resolution``.
Everything the two models share (sizes, schedule, CFG, LoRA, reference) is ``FlowEditor``; a
model class adds its prompt encoding, its transformer call and its VAE conventions.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from models.deterministic import deterministic_kernels
from models.progress import StepProgress

LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
]
NEGATIVE_PROMPT = " "  # Qwen-Image-Edit's reference negative prompt: true CFG needs one, even empty


def _fit_module(
    name: str,
    module: torch.nn.Module,
    loss_of: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
) -> list[float]:
    """AdamW on ``module`` for ``steps`` batches of ``loss_of(generator)`` (gradients clipped to 1:
    a 3000-step GPU fit of the tiny VAE diverged without it), then frozen again. A fit runs once,
    inside a model load, for minutes on a CPU: ``StepProgress`` says how far it is."""
    module.requires_grad_(True).train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    gen, losses = torch.Generator().manual_seed(seed), []
    progress = StepProgress(f"{name} fit", steps)
    with deterministic_kernels():  # the cached weights identify the editor: the same on every run
        for step in range(1, steps + 1):
            loss = loss_of(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            progress(step, losses[-1])
    module.requires_grad_(False).eval()
    return losses


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Warnings of ``loggers`` (libraries' module loggers) off for the block."""
    import logging

    logs = [logging.getLogger(name) for name in loggers]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


@dataclass
class EditCondition:
    """What the velocity of one batch needs and what stays fixed through its rollout."""

    prompt: dict  # per-item prompt tensors (batch first), as the transformer takes them
    negative: dict | None  # the same for the CFG negative prompt (None: no CFG)
    image_latents: torch.Tensor  # packed condition-image latents (B, L, C*4)
    size: tuple[int, int]  # (width, height) of the edit in pixels
    shared: dict = field(default_factory=dict)  # tensors without a batch dimension (position ids)

    def repeat(self, n: int) -> "EditCondition":
        """Each item n times in a row (a group of n samples of one prompt)."""

        def rep(d):
            if d is None:
                return None
            return {k: None if t is None else t.repeat_interleave(n, dim=0) for k, t in d.items()}

        return EditCondition(
            rep(self.prompt), rep(self.negative), self.image_latents.repeat_interleave(n, dim=0), self.size, self.shared
        )

    def select(self, i: int) -> "EditCondition":
        """Item i alone (a batch of one)."""

        def one(d):
            return None if d is None else {k: None if t is None else t[i : i + 1] for k, t in d.items()}

        return EditCondition(
            one(self.prompt), one(self.negative), self.image_latents[i : i + 1], self.size, self.shared
        )

    @property
    def batch(self) -> int:
        return self.image_latents.shape[0]


def edit_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(w, h) with about ``resolution^2`` pixels, the input's aspect ratio, multiples of ``multiple``."""
    ratio = width / height
    w = max(multiple, round(math.sqrt(resolution * resolution * ratio) / multiple) * multiple)
    h = max(multiple, round(resolution * resolution / max(w, 1) / multiple) * multiple)
    return int(w), int(h)


def attack_instruction(question: str, target_names: list[str], description: str | None = None) -> str:
    """The attacker's edit instruction: one template, for fresh items and cold-start pairs alike."""
    keep = ", ".join(target_names) or "the objects the question is about"
    what = f"Add {description}" if description else "Change the scene"
    return f"{what} so that answering '{question}' becomes harder; keep {keep} unchanged."


def world_edit_pairs(n: int, resolution: int, seed: int = 0) -> list[tuple[Image.Image, Image.Image, str]]:
    """(clean, edited, instruction) for ``n`` synthetic scenes: one object of a random colour and
    category drawn into a free place (1 px from every object), with the attacker's instruction for
    a question about the scene — naming the object half of the time, as cold-start pairs do, and
    not naming it otherwise, as fresh items to attack do."""
    import numpy as np

    from world import (
        CATEGORIES,
        COLOURS,
        NoQuestion,
        WorldConfig,
        draw_object_into,
        generate_world,
        make_question,
        render,
    )

    rng, out, i = np.random.default_rng(seed), [], 0
    while len(out) < n:
        i += 1
        scene = generate_world(30_000_000 + seed * 100_003 + i, WorldConfig(resolution=resolution))
        try:
            q = make_question(scene, str(rng.choice(["relative_position", "colour"])), rng)
        except NoQuestion:
            continue
        clean = render(scene)
        boxes = [scene.image_box(o) for o in scene.visible(1e-9)]
        side = float(np.median([b[2] - b[0] for b in boxes])) if boxes else 0.15 * resolution
        for _ in range(20):
            x0, y0 = rng.uniform(0, resolution - side, size=2)
            box = [x0, y0, x0 + side, y0 + side]
            if all(box[2] + 1 <= b[0] or b[2] + 1 <= box[0] or box[3] + 1 <= b[1] or b[3] + 1 <= box[1] for b in boxes):
                break
        else:
            continue
        colour, category = str(rng.choice(list(COLOURS))), str(rng.choice(CATEGORIES))
        edited, _ = draw_object_into(clean, box, category, colour)
        named = f"a {colour} {category}" if rng.random() < 0.5 else None
        out.append((clean, edited, attack_instruction(q.text, q.target_names, named)))
    return out


VAE_FIT_REVISION = 3  # part of the tiny VAE cache key: bump when the fitting procedure or its images change
# (3: fits run on deterministic kernels, models/deterministic.py)


def build_tiny_qwen_image_edit(seed: int = 0, layers: int = 2, heads: int = 4, head_dim: int = 16, z_dim: int = 4):
    """QwenImageEditPipeline from small random components; tokenizer and processor built locally.

    ``z_dim``: latent channels of the VAE (stride 4; the real Qwen-Image VAE has 16). Fitted for
    2000 steps at 64 px, 16 reproduced world images no better than 4 (RESULTS.md), so 4 stays."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )

    from models.qwen_vl import TinyDefenderSpec, build_byte_tokenizer, build_tiny_model, build_tiny_processor

    tok = build_byte_tokenizer()
    spec = TinyDefenderSpec(
        hidden=32,
        layers=1,
        heads=2,
        vision_depth=1,
        vision_hidden=32,
        patch_size=8,
        min_pixels=32 * 32,
        max_pixels=64 * 64,
    )
    text_encoder = build_tiny_model(tok, spec, seed)
    torch.manual_seed(seed)
    q = head_dim // 4  # rope axes (frame, height, width) must sum to head_dim
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=spec.hidden,
        axes_dims_rope=(head_dim - 2 * q, q, q),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    return QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        processor=build_tiny_processor(tok, spec),
        transformer=transformer,
    )


def build_tiny_flux_kontext(
    seed: int = 0,
    layers: int = 1,
    single_layers: int = 1,
    heads: int = 2,
    head_dim: int = 16,
    vae_channels: tuple[int, ...] = (4,),
    latent_channels: int = 2,
):
    """FluxKontextPipeline from the tiny FLUX components (notes §4.6: the fill recipe with an
    in_channels=8 transformer, i.e. 2 latent channels x 2x2 packing).

    ``vae_channels`` (one entry per VAE level; a stride of 2 per level after the first) and
    ``latent_channels`` replace the fill recipe's one-level VAE by an AutoencoderKL of that shape,
    e.g. (16, 32, 32) and 4: stride 4 as the tiny Qwen-Image VAE, but plain 2-D convolutions,
    which fit world images on a CPU in minutes where the Qwen-Image VAE's causal 3-D ones take
    hours (experiments/RESULTS.md, "an editor the CPU can fit")."""
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel

    from models.diffusion_fill import build_tiny_flux_fill

    fill = build_tiny_flux_fill(seed)
    vae = fill.vae
    if tuple(vae_channels) != (4,) or latent_channels != 2:
        torch.manual_seed(seed)
        levels = len(vae_channels)
        vae = AutoencoderKL(
            block_out_channels=tuple(vae_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=min(8, min(vae_channels)),
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
            shift_factor=0.0,
            scaling_factor=1.0,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
        )
    torch.manual_seed(seed)
    # rotary axes (id, height, width) sum to head_dim; the fill recipe's (4, 4, 8) at 16
    q = head_dim * 3 // 8 // 2 * 2
    axes = [4, 4, 8] if head_dim == 16 else [head_dim - 2 * q, q, q]
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        out_channels=4 * latent_channels,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=axes,
        guidance_embeds=True,
    )
    return FluxKontextPipeline(
        scheduler=fill.scheduler,
        vae=vae,
        text_encoder=fill.text_encoder,
        tokenizer=fill.tokenizer,
        text_encoder_2=fill.text_encoder_2,
        tokenizer_2=fill.tokenizer_2,
        transformer=transformer,
    )


def _tiny_pipeline(builder: Callable, seed: int, editor_fit: dict | None, given: dict) -> tuple[object, dict]:
    """A tiny editor's pipeline from ``builder`` and its whole architecture, the builder's defaults
    filled in: the fits' cache keys name it, so {layers: 4} and {layers: 4, z_dim: 4} are one
    model and share one fit. With ``editor_fit`` every part comes from the fit's seed: one fitted
    editor for every seed (the transformer learns to read that text encoder's embeddings and that
    VAE's latents); the attacker's seed still sets its LoRA's init and the sampling noise."""
    defaults = {k: p.default for k, p in inspect.signature(builder).parameters.items() if k != "seed"}
    arch = {**defaults, **given}
    return builder(editor_fit.get("seed", 0) if editor_fit else seed, **arch), arch


class FlowEditor:
    """A flow-matching editor as a policy: condition, velocity, schedule, decode; LoRA on the
    transformer. Subclasses give ``_encode_prompts``, ``_vae_encode``, ``_transformer``,
    ``_decode`` and their ``LORA_TARGETS``."""

    LORA_TARGETS: list[str] = []

    def __init__(
        self,
        pipe,
        resolution: int = 512,
        cfg_scale: float = 1.0,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        negative_prompt: str = NEGATIVE_PROMPT,
    ):
        self.pipe = pipe.to(device)
        if dtype != torch.float32:  # random-init models are float32 already; .to(float32) only warns
            self.pipe.to(dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = pipe.transformer
        self.resolution, self.cfg_scale, self.device, self.dtype = resolution, cfg_scale, device, dtype
        self.negative_prompt = negative_prompt
        self.multiple = pipe.vae_scale_factor * 2  # VAE stride x 2x2 packing
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):  # benchmarks may run without the prompt encoders
                # eval: freshly built modules are in train mode, and T5's dropout would make
                # every prompt encoding (and so every rollout) random; LoRA has no dropout
                m.requires_grad_(False).eval()

    # ------------------------------------------------------------------ the autoencoder
    def fit_autoencoder(
        self, images: list[Image.Image], steps: int, batch: int = 8, lr: float = 1e-3, seed: int = 0
    ) -> list[float]:
        """Fit the VAE to reconstruct ``images`` (MSE on pixels; encoder and decoder). For the
        tiny editors: a random VAE decodes a world image at SSIM ~0.4, so no edit can keep a
        target box intact; real checkpoints come with a trained VAE and never need this."""
        vae = self.pipe.vae
        images = [self.resize(im) for im in images]

        def loss(gen):
            idx = torch.randint(len(images), (batch,), generator=gen).tolist()
            x = self._pixels([images[i] for i in idx], images[0].size)
            return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)

        losses = _fit_module("tiny VAE", vae, loss, steps, lr, seed)
        if "scaling_factor" in vae.config and "shift_factor" in vae.config:
            # A VAE with a latent shift and scale (AutoencoderKL; the pipelines normalize its latents
            # with them): set them from the fitted latents, as the real checkpoints' were from their
            # data, so the editor's flow starts from unit-variance noise over unit-variance latents.
            # (The Qwen-Image VAE's per-channel mean/std stay 0/1: its GPU fits were made so.)
            with torch.no_grad():
                lat = torch.cat(
                    [
                        vae.encode(self._pixels(images[i : i + 64], images[0].size)).latent_dist.mode().float()
                        for i in range(0, len(images), 64)
                    ]
                )
            vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1 / lat.std()))
        return losses

    def fit_editor(
        self,
        pairs: list[tuple[Image.Image, Image.Image, str]],
        steps: int,
        batch: int = 16,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> list[float]:
        """Train the whole transformer by flow matching on (clean, edited, instruction) pairs of one
        size: x_s = (1 - s) x0 + s eps, target v = eps - x0. For the tiny editors only: what a real
        checkpoint's pretraining gives (copy the condition image, add what is described); a random
        transformer's edits share nothing with their input, so none could pass the integrity gate."""

        def loss(gen):
            idx = torch.randint(len(pairs), (batch,), generator=gen).tolist()
            cond = self.condition([pairs[i][0] for i in idx], [pairs[i][2] for i in idx])
            with torch.no_grad():
                x0 = self.latents_of([self.resize(pairs[i][1]) for i in idx])
            eps = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            s = torch.rand(batch, 1, 1, generator=gen).to(x0.device, x0.dtype)
            v = self.velocity((1 - s) * x0 + s * eps, s.flatten() * 1000, cond, guidance=False)
            return torch.nn.functional.mse_loss(v.float(), (eps - x0).float())

        return _fit_module("tiny editor", self.transformer, loss, steps, lr, seed)

    def apply_fits(
        self, resolution: int, vae_arch: dict, arch: dict, vae_fit: dict | None, editor_fit: dict | None
    ) -> None:
        """The tiny editors' fits, each cached: ``vae_fit`` ({steps, scenes, batch, lr, seed}) fits
        a fresh VAE (from the fit's seed) to world images, ``editor_fit`` (same keys) then trains
        the transformer on world edits (``world_edit_pairs``). ``vae_arch`` is what the VAE's fit
        depends on (its shape, not the transformer's); ``arch`` the whole architecture."""
        vae_key = None
        if vae_fit:
            from world import WorldConfig, generate_world, render

            fit = {"steps": 500, "scenes": 256, "batch": 8, "lr": 1e-3, "seed": 0, **vae_fit}
            n = fit.pop("scenes")
            # The fitted VAE starts from the fit's seed, not the editor's: editors of every seed (the
            # evidence experiment's arms) share one fit, and it is the same whoever fits it first.
            vae = self.pipe.vae
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(fit["seed"])
                self.pipe.vae = type(vae).from_config(vae.config).to(self.device).requires_grad_(False).eval()
            vae_key = {"resolution": resolution, **vae_arch, "scenes": n, "revision": VAE_FIT_REVISION, **fit}
            self.fit_autoencoder_cached(
                vae_key,
                lambda: [render(generate_world(10_000_000 + i, WorldConfig(resolution=resolution))) for i in range(n)],
                **fit,
            )
        if editor_fit:
            fit = {"steps": 500, "scenes": 512, "batch": 16, "lr": 1e-3, "seed": 0, **editor_fit}
            n = fit.pop("scenes")
            self.fit_editor_cached(
                {"resolution": resolution, "tiny": arch, "vae": vae_key, "scenes": n, "revision": VAE_FIT_REVISION},
                lambda: world_edit_pairs(n, resolution, fit["seed"]),
                **fit,
            )

    def cast(self, dtype: str | torch.dtype) -> "FlowEditor":
        """The editor's weights and latents in ``dtype`` (after any fit: fits run in float32)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype != torch.float32:
            self.pipe.to(dtype=dtype)
            self.dtype = dtype
        return self

    def fit_autoencoder_cached(self, key: dict, images: Callable[[], list[Image.Image]], **fit) -> Path:
        """``fit_autoencoder`` once per ``key`` (spec + fit settings); the VAE's weights are cached
        as safetensors under ``$AOT_CACHE/tiny-vae`` and later builds load them."""
        return self._fit_cached(
            "tiny-vae", self.pipe.vae, {**key, **fit}, lambda: self.fit_autoencoder(images(), **fit)
        )

    def fit_editor_cached(self, key: dict, pairs: Callable[[], list], **fit) -> Path:
        """``fit_editor`` once per ``key``, cached under ``$AOT_CACHE/tiny-editor``."""
        return self._fit_cached(
            "tiny-editor", self.transformer, {**key, **fit}, lambda: self.fit_editor(pairs(), **fit)
        )

    def _fit_cached(self, kind: str, module: torch.nn.Module, key: dict, fit: Callable[[], object]) -> Path:
        """Run ``fit`` (which trains ``module``) once per ``key``; its weights are cached as
        safetensors under ``$AOT_CACHE/<kind>`` and later builds load them."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from models.cache import build_once, cache_root, kernel_family, shipped_fit
        from storage import content_hash

        # A fit that ships with the code (models/fitted: the embedded default's) is the same file on
        # every machine, so it is found by the key without the kernels and threads it was fitted on.
        shipped = shipped_fit(kind, key)
        # The fit's bytes depend on the kernels it ran on (deterministic within one family) and, on
        # a CPU, on the intra-op thread count (convolutions split their sums by it): a cache folder
        # shared by machines never hands one another's fit.
        key = {**key, "kernels": kernel_family([str(self.device)])}
        if torch.device(self.device).type == "cpu":
            key["threads"] = torch.get_num_threads()

        # Config values a fit sets (a VAE's latent shift and scale) travel with its weights.
        fitted_config = [k for k in ("shift_factor", "scaling_factor") if k in getattr(module, "config", {})]

        def build(tmp: Path) -> None:
            fit()
            # The key rides along as metadata, so a cached file says which fit it is.
            meta = {"aot_fit_key": json.dumps(key, sort_keys=True, default=str)}
            if fitted_config:
                meta["aot_fit_config"] = json.dumps({k: module.config[k] for k in fitted_config})
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp), metadata=meta
            )

        path = shipped or build_once(cache_root() / kind / f"{content_hash(key)}.safetensors", build, folder=False)
        module.load_state_dict(load_file(str(path), device=str(self.device)))
        if fitted_config:
            with safe_open(str(path), "pt") as f:
                module.register_to_config(**json.loads((f.metadata() or {}).get("aot_fit_config", "{}")))
        return path

    # ------------------------------------------------------------------ sizes and conditions
    def size_for(self, image: Image.Image) -> tuple[int, int]:
        return edit_size(image.width, image.height, self.resolution, self.multiple)

    def resize(self, image: Image.Image) -> Image.Image:
        size = self.size_for(image)
        return image.convert("RGB") if image.size == size else image.convert("RGB").resize(size, Image.BICUBIC)

    def _pixels(self, images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        w, h = size
        return self.pipe.image_processor.preprocess(images, h, w).to(self.device, self.dtype)

    def latents_of(self, images: list[Image.Image]) -> torch.Tensor:
        """Packed, normalized VAE latents of same-size images (already at the edit size)."""
        lat = self._vae_encode(self._pixels(images, images[0].size))
        return self.pipe._pack_latents(lat, lat.shape[0], lat.shape[1], lat.shape[-2], lat.shape[-1])

    @torch.no_grad()
    def condition(self, images: list[Image.Image], prompts: list[str]) -> EditCondition:
        """Prompt encodings (with the negative ones when CFG is on) and condition latents.
        ``images`` must share one size after ``resize`` (a group is one image)."""
        images = [self.resize(im) for im in images]
        if len({im.size for im in images}) != 1:
            raise ValueError("one condition batch needs images of one edit size; batch groups by image size")
        prompt, shared = self._encode_prompts(prompts, images)
        negative = None
        if self.cfg_scale > 1:
            negative, _ = self._encode_prompts([self.negative_prompt] * len(prompts), images)
        lat = self.latents_of(images)
        return EditCondition(prompt, negative, lat, images[0].size, {**shared, **self._positions(images[0].size)})

    def _positions(self, size: tuple[int, int]) -> dict:
        return {}

    def noise(self, cond: EditCondition, generator: torch.Generator | None = None) -> torch.Tensor:
        b, n, c = cond.image_latents.shape
        return torch.randn((b, n, c), generator=generator, device="cpu", dtype=torch.float32).to(
            self.device, self.dtype
        )

    def schedule(self, steps: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (steps + 1, last 0), timesteps (steps)) exactly as the pipelines set them."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        mu = calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        self.pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=self.device)
        return self.pipe.scheduler.sigmas.clone(), self.pipe.scheduler.timesteps.clone()

    # ------------------------------------------------------------------ the denoiser
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: EditCondition, guidance: bool = True) -> torch.Tensor:
        """v(x, t) for a batch; ``t`` is the scheduler's timestep (0-1000). The model's true CFG
        when ``cfg_scale > 1`` and ``guidance`` (supervised flow matching trains the conditional
        branch alone)."""
        inp = torch.cat([x, cond.image_latents], dim=1)
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        # Half-precision weights with float32 LoRA (mixed precision): autocast runs the LoRA
        # matmuls in the weights' dtype instead of upcasting every activation they touch.
        amp = (
            torch.autocast(self.transformer.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with amp:
            v = self._transformer(inp, timestep, cond.prompt, cond)[:, : x.shape[1]]
            if guidance and self.cfg_scale > 1 and cond.negative is not None:
                neg = self._transformer(inp, timestep, cond.negative, cond)[:, : x.shape[1]]
                v = self._guide(v, neg)
        return v

    def _guide(self, v: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return neg + self.cfg_scale * (v - neg)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cond: EditCondition) -> list[Image.Image]:
        w, h = cond.size
        lat = self.pipe._unpack_latents(x, h, w, self.pipe.vae_scale_factor).to(self.pipe.vae.dtype)
        return self.pipe.image_processor.postprocess(self._decode(lat), output_type="pil")

    # ------------------------------------------------------------------ LoRA
    def _dead_modules(self) -> set[str]:
        """Modules whose output never reaches the image (LoRA there would get no gradient)."""
        return set()

    def add_lora(self, rank: int, alpha: int, targets: list[str] | None = None, seed: int = 0) -> None:
        from peft import LoraConfig

        dead = self._dead_modules()
        wanted = [
            n
            for n, _ in self.transformer.named_modules()
            if any(n.endswith("." + t) for t in (targets or self.LORA_TARGETS)) and n not in dead
        ]
        if not wanted:
            raise ValueError(f"none of the LoRA targets {targets or self.LORA_TARGETS} is a module of the transformer")
        torch.manual_seed(seed)
        self.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=wanted, init_lora_weights=True)
        )

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.transformer.named_parameters() if "lora_" in n]

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous().cpu() for n, p in self.transformer.named_parameters() if "lora_" in n}

    def load_lora_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.transformer.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise ValueError(
                f"LoRA tensors do not match this editor (first unknown: {missing[0]}); "
                "was the checkpoint made with another model or LoRA rank/targets?"
            )
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same model with its LoRA disabled (KL, comparisons)."""
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def enable_gradient_checkpointing(self, keep_blocks: int = 0) -> None:
        """Recompute each transformer block's activations in backward, except the last ``keep_blocks``
        blocks, whose activations are kept: each kept block saves 1/num_layers of the recompute (one
        extra forward) at the cost of its activations' memory. Calling it again changes the count; the
        blocks themselves are untouched, so a compiled transformer stays compiled."""
        import torch.utils.checkpoint

        tr = self.transformer  # Flux has single-stream blocks after its double-stream ones
        blocks = [*tr.transformer_blocks, *getattr(tr, "single_transformer_blocks", [])]
        if not 0 <= keep_blocks <= len(blocks):
            raise ValueError(f"keep_blocks={keep_blocks}: the transformer has {len(blocks)} blocks (0..{len(blocks)})")
        self.kept_blocks = {id(b) for b in blocks[len(blocks) - keep_blocks :]}

        def checkpointed(block, *args):
            if id(block) in self.kept_blocks or id(getattr(block, "_orig_mod", block)) in self.kept_blocks:
                return block(*args)
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

        self.transformer.enable_gradient_checkpointing(checkpointed)

    def save(self, folder: str | Path) -> Path:
        """What a checkpoint holds of the editor: its LoRA (the base model is named by the spec)."""
        return self.save_lora(folder)

    def save_lora(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.lora_state(), str(folder / "lora.safetensors"))
        return folder

    def load_lora(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_lora_state(load_file(str(Path(folder) / "lora.safetensors")))


class QwenImageEditor(FlowEditor):
    """Qwen-Image-Edit: Qwen2.5-VL prompt encoding of (instruction, image), condition tokens
    after the noisy ones, true CFG with the pipeline's norm rescaling."""

    LORA_TARGETS = LORA_TARGETS

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        resolution: int = 64,
        cfg_scale: float = 1.0,
        device: str = "cpu",
        vae_fit: dict | None = None,
        editor_fit: dict | None = None,
        dtype: str | torch.dtype = "float32",
        **kw,
    ) -> "QwenImageEditor":
        """``dtype``: the editor's weights and latents after any fit (bfloat16 tests the mixed-
        precision path on a CPU; fits run in float32).
        ``vae_fit`` ({steps, scenes, batch, lr, seed}): fit the random VAE to synthetic-world
        images first (cached), so that an edit can leave the rest of the image intact.
        ``editor_fit`` (same keys; after ``vae_fit``): then train the transformer on world edits —
        an object drawn into a free place of a scene, with the attacker's instruction — so that it
        copies its input and adds objects (cached; the attacker's LoRA trains on top)."""
        pipe, kw = _tiny_pipeline(build_tiny_qwen_image_edit, seed, editor_fit, kw)
        editor = cls(pipe, resolution=resolution, cfg_scale=cfg_scale, device=device)
        editor.apply_fits(resolution, {"z_dim": kw["z_dim"]}, kw, vae_fit, editor_fit)
        return editor.cast(dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str = "Qwen/Qwen-Image-Edit",
        resolution: int = 512,
        cfg_scale: float = 4.0,
        device: str = "cuda",
        dtype: str = "bfloat16",
    ) -> "QwenImageEditor":
        from diffusers import QwenImageEditPipeline

        pipe = QwenImageEditPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype), use_safetensors=True)
        return cls(pipe, resolution=resolution, cfg_scale=cfg_scale, device=device, dtype=getattr(torch, dtype))

    def _pixels(self, images, size):
        return super()._pixels(images, size).unsqueeze(2)  # a one-frame video for the 3D VAE

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pipe._encode_vae_image(pixels, generator=None)

    def _encode_prompts(self, prompts, images) -> tuple[dict, dict]:
        emb, mask = self.pipe.encode_prompt(prompts, image=images, device=self.device)
        return {"encoder_hidden_states": emb, "encoder_hidden_states_mask": mask}, {}

    def _transformer(self, inp, timestep, prompt: dict, cond: EditCondition) -> torch.Tensor:
        w, h = cond.size
        grid = (1, h // self.multiple, w // self.multiple)
        return self.transformer(
            hidden_states=inp, timestep=timestep, img_shapes=[[grid, grid]] * inp.shape[0], return_dict=False, **prompt
        )[0]

    def _guide(self, v, neg):
        comb = neg + self.cfg_scale * (v - neg)
        return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def _decode(self, lat: torch.Tensor) -> torch.Tensor:
        vcfg = self.pipe.vae.config
        mean = torch.tensor(vcfg.latents_mean).view(1, vcfg.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        std = torch.tensor(vcfg.latents_std).view(1, vcfg.z_dim, 1, 1, 1).to(lat.device, lat.dtype)
        return self.pipe.vae.decode(lat * std + mean, return_dict=False)[0][:, :, 0]

    def _dead_modules(self) -> set[str]:
        # Only image tokens leave the model: the last block's text-stream outputs are discarded.
        last = len(self.transformer.transformer_blocks) - 1
        return {f"transformer_blocks.{last}.attn.add_q_proj", f"transformer_blocks.{last}.attn.to_add_out"}


class FluxKontextEditor(FlowEditor):
    """FLUX.1-Kontext: CLIP pooled + T5 prompt encoding, condition tokens with position ids of
    frame 1, guidance-distilled (``guidance`` embedding); true CFG only if ``cfg_scale > 1``."""

    LORA_TARGETS = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_mlp",
        "proj_out",
    ]

    def __init__(self, pipe, guidance: float = 2.5, max_sequence_length: int = 512, **kw):
        super().__init__(pipe, **kw)
        self.guidance, self.max_sequence_length = guidance, max_sequence_length

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        resolution: int = 32,
        cfg_scale: float = 1.0,
        device: str = "cpu",
        vae_fit: dict | None = None,
        editor_fit: dict | None = None,
        dtype: str | torch.dtype = "float32",
        max_sequence_length: int = 256,
        **arch,
    ) -> "FluxKontextEditor":
        """The tiny FLUX.1-Kontext editor; ``arch``: ``build_tiny_flux_kontext``'s sizes. ``vae_fit``
        and ``editor_fit`` as ``QwenImageEditor.tiny``'s (each cached; with ``editor_fit`` every
        part comes from the fit's seed, the attacker's seed sets its LoRA and its noise)."""
        pipe, arch = _tiny_pipeline(build_tiny_flux_kontext, seed, editor_fit, arch)
        # 256 T5 tokens: the tiny T5 tokenizer spends about one per character, and an attacker's
        # instruction (attack_instruction) runs to ~160; cut at 32 it loses the question.
        editor = cls(
            pipe, resolution=resolution, cfg_scale=cfg_scale, max_sequence_length=max_sequence_length, device=device
        )
        vae_arch = {
            "backend": "tiny-kontext",
            "vae_channels": arch["vae_channels"],
            "latent_channels": arch["latent_channels"],
        }
        # the prompt encodings the transformer learns to read depend on where T5's input is cut
        editor.apply_fits(
            resolution, vae_arch, {**arch, "max_sequence_length": max_sequence_length}, vae_fit, editor_fit
        )
        return editor.cast(dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str = "black-forest-labs/FLUX.1-Kontext-dev",
        resolution: int = 512,
        cfg_scale: float = 1.0,
        guidance: float = 2.5,
        device: str = "cuda",
        dtype: str = "bfloat16",
    ) -> "FluxKontextEditor":
        from diffusers import FluxKontextPipeline

        pipe = FluxKontextPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype), use_safetensors=True)
        return cls(
            pipe,
            resolution=resolution,
            cfg_scale=cfg_scale,
            guidance=guidance,
            device=device,
            dtype=getattr(torch, dtype),
        )

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pipe._encode_vae_image(pixels, generator=None)

    def _encode_prompts(self, prompts, images) -> tuple[dict, dict]:
        # CLIP's pooled vector sees the first 77 tokens only (FLUX's design; T5 reads the whole
        # instruction): the pipeline's and the tokenizer's warnings about the cut, repeated for
        # every prompt of every rollout, say nothing new.
        with _quiet("diffusers.pipelines.flux.pipeline_flux_kontext", "transformers.tokenization_utils_base"):
            emb, pooled, text_ids = self.pipe.encode_prompt(
                prompts, device=self.device, max_sequence_length=self.max_sequence_length
            )
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}, {"txt_ids": text_ids}

    def _positions(self, size: tuple[int, int]) -> dict:
        w, h = size
        gh, gw = h // self.multiple, w // self.multiple
        latent = self.pipe._prepare_latent_image_ids(1, gh, gw, self.device, self.dtype)
        image = latent.clone()
        image[..., 0] = 1  # condition tokens: the same grid, frame 1
        return {"img_ids": torch.cat([latent, image], dim=0)}

    def _transformer(self, inp, timestep, prompt: dict, cond: EditCondition) -> torch.Tensor:
        g = None
        if self.transformer.config.guidance_embeds:
            g = torch.full([1], self.guidance, device=inp.device, dtype=torch.float32).expand(inp.shape[0])
        return self.transformer(
            hidden_states=inp,
            timestep=timestep,
            guidance=g,
            txt_ids=cond.shared["txt_ids"],
            img_ids=cond.shared["img_ids"],
            return_dict=False,
            **prompt,
        )[0]

    def _decode(self, lat: torch.Tensor) -> torch.Tensor:
        vcfg = self.pipe.vae.config
        return self.pipe.vae.decode(lat / vcfg.scaling_factor + vcfg.shift_factor, return_dict=False)[0]


EDITOR_BACKENDS = ("tiny", "tiny-kontext", "qwen-image-edit", "flux-kontext")


def load_editor(spec: dict | str) -> FlowEditor:
    """An editor from a model spec: ``{backend: tiny | tiny-kontext, seed, resolution, cfg_scale}``
    or ``{backend: qwen-image-edit | flux-kontext, model: <id or path>, resolution, cfg_scale,
    device, dtype}``."""
    spec = {"backend": spec} if isinstance(spec, str) else dict(spec)
    backend = spec.pop("backend", "tiny")
    if backend == "tiny":
        return QwenImageEditor.tiny(**spec)
    if backend == "tiny-kontext":
        return FluxKontextEditor.tiny(**spec)
    if backend == "qwen-image-edit":
        return QwenImageEditor.from_pretrained(spec.pop("model", "Qwen/Qwen-Image-Edit"), **spec)
    if backend == "flux-kontext":
        return FluxKontextEditor.from_pretrained(spec.pop("model", "black-forest-labs/FLUX.1-Kontext-dev"), **spec)
    raise ValueError(f"unknown attacker backend {backend!r}: use one of {', '.join(EDITOR_BACKENDS)}")
