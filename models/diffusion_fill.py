"""Outpainter and inpainter through a diffusers fill pipeline (default: FLUX.1-Fill through
``FluxFillPipeline``).

Both roles are one operation: repaint the masked pixels of an image from a prompt. The result
is composited with the input, so every pixel outside the mask comes back bit-identical whatever
the model does (VAE round trips are lossy). Sizes the pipeline cannot take (its latent grid needs
multiples of ``2 * vae_scale_factor``) are padded by edge replication and cropped back.

``tiny``: FluxFillPipeline from small random components and locally built CLIP and T5 tokenizers
(shared/notes/dependencies.md §4.0, §4.6), no download.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.roles import Box, Context, Painted, Painter, serialized

OUTPAINT_PROMPT = "the same scene, extended naturally beyond its borders"


def _byte_chars() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    # model_max_length is required: without it FluxFill overflows computing max_length (notes §9.14).
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", 0.0)] + [(chr(i), -1.0) for i in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_flux_fill(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=20,
        out_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=514,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            max_position_embeddings=77,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=98, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )


class DiffusersFiller(Painter):
    """Implements both the Outpainter and the Inpainter role; batches same-size images."""

    def __init__(
        self,
        pipe,
        steps: int = 28,
        guidance: float = 30.0,
        seed: int = 0,
        device: str = "cpu",
        max_sequence_length: int = 512,
        batch_size: int = 4,
    ):
        self.pipe = pipe.to(device)
        for m in pipe.components.values():  # built tiny modules start in train mode: T5 dropout is random
            if isinstance(m, torch.nn.Module):
                m.eval()
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.seed, self.device = steps, guidance, seed, device
        self.max_sequence_length = max_sequence_length
        self.multiple = 2 * getattr(pipe, "vae_scale_factor", 8)
        self.batch_size = batch_size
        self.pipeline_calls = 0

    @classmethod
    def tiny(cls, seed: int = 0, steps: int = 2, **kw) -> "DiffusersFiller":
        return cls(build_tiny_flux_fill(seed), steps=steps, seed=seed, max_sequence_length=32, **kw)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "black-forest-labs/FLUX.1-Fill-dev",
        dtype: str = "bfloat16",
        device: str = "cuda",
        trust_remote_code: bool = False,
        **kw,
    ) -> "DiffusersFiller":
        from diffusers import AutoPipelineForInpainting, FluxFillPipeline

        loader = FluxFillPipeline if "fill" in model.lower() else AutoPipelineForInpainting
        pipe = loader.from_pretrained(
            model, torch_dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        return cls(pipe, device=device, **kw)

    def repaint(self, image: Image.Image, mask: np.ndarray, prompt: str) -> Image.Image:
        """Repaint ``mask`` (bool, H x W) of ``image``; pixels outside it come back unchanged."""
        return self.repaint_many([image], [mask], [prompt])[0]

    def repaint_many(self, images: list[Image.Image], masks: list[np.ndarray], prompts: list[str]) -> list[Image.Image]:
        """Batched repaint: one pipeline call per group of same-size images (up to ``batch_size``)."""
        out: list[Image.Image | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(masks):
            groups.setdefault(m.shape, []).append(i)
        for (h, w), idx in groups.items():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k : k + self.batch_size]
                for i, img in zip(
                    chunk,
                    self._pipeline(
                        [images[i] for i in chunk], [masks[i] for i in chunk], [prompts[i] for i in chunk], h, w
                    ),
                ):
                    out[i] = img
        return out

    @serialized  # the pipeline's scheduler keeps its step index between steps: one call at a time
    def _pipeline(self, images, masks, prompts, h, w) -> list[Image.Image]:
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        arrs = [np.asarray(im.convert("RGB")) for im in images]
        padded = [Image.fromarray(np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")) for a in arrs]
        pmasks = [
            Image.fromarray(np.pad(mk, ((0, ph), (0, pw)), constant_values=True).astype(np.uint8) * 255) for mk in masks
        ]
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        kw = {} if "Fill" not in type(self.pipe).__name__ else {"max_sequence_length": self.max_sequence_length}
        self.pipeline_calls += 1
        res = self.pipe(
            prompt=prompts,
            image=padded,
            mask_image=pmasks,
            height=h + ph,
            width=w + pw,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=gen,
            **kw,
        ).images
        out = []
        for a, mk, r in zip(arrs, masks, res):
            r = np.asarray(r.convert("RGB").resize((w + pw, h + ph)))[:h, :w]
            out.append(Image.fromarray(np.where(mk[..., None], r, a)))
        return out

    @staticmethod
    def _outpaint_inputs(image: Image.Image, canvas_size: tuple[int, int], offset: tuple[int, int]):
        cw, ch = canvas_size
        x, y = offset
        arr = np.asarray(image.convert("RGB"))
        # Start the border from the nearest edge pixels: the model refines a plausible guess.
        canvas = np.pad(arr, ((y, ch - y - arr.shape[0]), (x, cw - x - arr.shape[1]), (0, 0)), mode="edge")
        mask = np.ones((ch, cw), dtype=bool)
        mask[y : y + arr.shape[0], x : x + arr.shape[1]] = False
        return Image.fromarray(canvas), mask

    def outpaint(
        self, image: Image.Image, canvas_size: tuple[int, int], offset: tuple[int, int], context: Context
    ) -> Painted:
        return self.outpaint_many([image], [canvas_size], [offset], [context])[0]

    def outpaint_many(self, images, canvas_sizes, offsets, contexts) -> list[Painted]:
        inputs = [self._outpaint_inputs(i, c, o) for i, c, o in zip(images, canvas_sizes, offsets)]
        done = self.repaint_many([c for c, _ in inputs], [m for _, m in inputs], [OUTPAINT_PROMPT] * len(inputs))
        return [Painted(img, None) for img in done]

    @staticmethod
    def _box_mask(image: Image.Image, box: Box) -> np.ndarray:
        w, h = image.size
        mask = np.zeros((h, w), dtype=bool)
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        mask[y0:y1, x0:x1] = True
        return mask

    def fill(self, image: Image.Image, box: Box, description: str, context: Context) -> Painted:
        return self.fill_many(image, [box], [description], context)[0]

    def fill_many(
        self, image: Image.Image, boxes: list[Box], descriptions: list[str], context: Context
    ) -> list[Painted]:
        done = self.repaint_many([image] * len(boxes), [self._box_mask(image, b) for b in boxes], list(descriptions))
        return [Painted(img, None) for img in done]
