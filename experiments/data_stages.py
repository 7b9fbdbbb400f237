"""Data-stage models on the GPU: our role code against a bare library loop, same inputs, one run.

Full-size architectures with random weights (no weights can be downloaded here):
- outpainting 768x768 -> 1024x1024 with FluxFillPipeline at FLUX.1-Fill-dev's dimensions
  (12 B transformer, T5-XXL, CLIP-L, FLUX VAE): ``DiffusersFiller.outpaint`` vs ``pipe(...)``;
- judge checks with Qwen2.5-VL-7B dimensions on a 1024x1024 image: ``MLLMJudge.check_realism``
  vs processor + ``model.generate``, 16 new tokens each;
- Grounding DINO (Swin-B backbone) + SAM ViT-B on a 1024x1024 image: ``detect`` + ``segment``
  vs the processors and models called directly.
Overhead = ours / bare - 1 (goal <= 5%). Writes ``$OUT/data_stages.json``; ``--tiny`` is a CPU
smoke run with tiny configs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import device as current_device  # noqa: E402
from experiments.common import environment, parser, write_results  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, reps):
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def flux_fill(tiny: bool, device, dtype):
    from models.diffusion_fill import DiffusersFiller, build_tiny_flux_fill, tiny_clip_tokenizer, tiny_t5_tokenizer

    if tiny:
        return DiffusersFiller(build_tiny_flux_fill(), steps=2, device=device, max_sequence_length=32)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.set_default_dtype(dtype)
    with torch.device(device):
        tr = FluxTransformer2DModel(
            patch_size=1,
            in_channels=384,
            out_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=[16, 56, 56],
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                vocab_size=49408,
                projection_dim=768,
                max_position_embeddings=77,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
                is_gated_act=True,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            shift_factor=0.1159,
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    torch.set_default_dtype(torch.float32)
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=tr,
    )
    return DiffusersFiller(pipe, steps=8, device=device, max_sequence_length=64)


def extend_stage(filler, img: Image.Image, canvas: int, n: int, shard_index: int = 0):
    """A call of the extend stage function (``extend_scenes``) on one shard of ``n`` imported rows
    of ``img``, outpainted to ``canvas`` px by the already-built ``filler``; asserts every row came out."""
    from config import load_config
    from stages import rows as R
    from stages.base import ShardContext
    from stages.extend import extend_scenes
    from storage import image_cell

    side = img.width
    cfg = load_config("synthetic", {"extend": {"canvas_scale": canvas / side}})
    shard = R.frame(
        [
            {
                "id": f"s{shard_index}-{i}",
                "source": "import",
                "image": image_cell(img),
                "width": side,
                "height": side,
                "question_type": "mcq",
                "question": "q?",
                "options": ["a", "b"],
                "answer": "A",
                "target_names": ["cup"],
                "target_boxes": [[10.0, 10.0, 50.0, 50.0]],
                "scene": None,
            }
            for i in range(n)
        ],
        R.SOURCE,
    )
    ctx = ShardContext("extend", cfg, shard_index)
    ctx.model = lambda role: filler  # the already-built pipeline, as the registry would return it

    def stage():
        out, rej = extend_scenes(shard, ctx)
        assert out.height == n and rej.height == 0

    return stage


def bench_outpaint(tiny, device, dtype, reps):
    filler = flux_fill(tiny, device, dtype)
    side, canvas = (48, 64) if tiny else (768, 1024)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    off = ((canvas - side) // 2,) * 2
    from models.diffusion_fill import OUTPAINT_PROMPT

    arr = np.asarray(img)
    start = np.pad(arr, ((off[1], canvas - off[1] - side), (off[0], canvas - off[0] - side), (0, 0)), mode="edge")
    mask = np.ones((canvas, canvas), dtype=np.uint8) * 255
    mask[off[1] : off[1] + side, off[0] : off[0] + side] = 0

    def ours():
        filler.outpaint(img, (canvas, canvas), off, None)

    def bare():
        filler.pipe(
            prompt=OUTPAINT_PROMPT,
            image=Image.fromarray(start),
            mask_image=Image.fromarray(mask),
            height=canvas,
            width=canvas,
            num_inference_steps=filler.steps,
            guidance_scale=filler.guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=filler.max_sequence_length,
        )

    # Through the stage function itself: decoding, geometry, box transforms, PNG encoding, rows.
    n = 3
    stage = extend_stage(filler, img, canvas, n)

    def bare_n():
        for _ in range(n):
            bare()

    b, o = timeit(bare, reps), timeit(ours, reps)
    bs, st = timeit(bare_n, 2), timeit(stage, 2)
    steps = 8 if not tiny else 2
    return [
        {
            "what": f"outpaint {side}->{canvas} px, {steps} steps (role)",
            "unit": "images/s",
            "bare": 1 / b,
            "ours": 1 / o,
            "overhead": o / b - 1,
        },
        {
            "what": f"outpaint {side}->{canvas} px, {steps} steps (extend stage, {n} rows)",
            "unit": "images/s",
            "bare": n / bs,
            "ours": n / st,
            "overhead": st / bs - 1,
        },
    ]


def bench_judge(tiny, device, dtype, reps):
    from models.mcq import YES_NO_PROMPT
    from models.mllm_judge import MLLMJudge
    from models.qwen_vl import QwenVLPolicy

    if tiny:
        policy = QwenVLPolicy.tiny()
    else:
        from experiments.defender_dapo import build  # same full-size Qwen2.5-VL builder

        model, proc = build("7b", device, dtype)
        policy = QwenVLPolicy(model, proc, device=device, dtype=dtype)
        px = 1024 * 1024
        policy.processor.image_processor.min_pixels = policy.processor.image_processor.max_pixels = px
        policy.processor.image_processor.size = {"shortest_edge": px, "longest_edge": px}
    judge = MLLMJudge(policy, unparsed="pass", max_new_tokens=16)
    side = 64 if tiny else 1024
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))
    prompt = f"Does this image show visible seams, artefacts or distorted objects? {YES_NO_PROMPT}"

    def ours():
        judge.check_realism(img, None)

    def bare():
        enc = policy.processor(text=[policy.chat(prompt)], images=[img], return_tensors="pt").to(device)
        with torch.no_grad():
            policy.model.generate(**enc, max_new_tokens=16, do_sample=False, min_new_tokens=16)

    def ours_fixed():  # same token count as bare: random weights could stop early
        with torch.no_grad():
            judge.mllm.model.generation_config.min_new_tokens = 16
            ours()

    b, o = timeit(bare, reps), timeit(ours_fixed, reps)
    return {
        "what": f"judge realism check, {side}x{side} image, 16 tokens",
        "unit": "checks/s",
        "bare": 1 / b,
        "ours": 1 / o,
        "overhead": o / b - 1,
    }


def bench_ground(tiny, device, dtype, reps):
    from models.grounding import (
        GroundingDinoDetector,
        SamSegmenter,
        build_tiny_grounding_dino,
        build_tiny_sam,
        tiny_bert_tokenizer,
    )

    if tiny:
        dm, dp = build_tiny_grounding_dino()
        sm, sp = build_tiny_sam()
    else:
        from transformers import (
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
            SamConfig,
            SamImageProcessor,
            SamModel,
            SamProcessor,
            SwinConfig,
        )

        with torch.device(device):
            dm = GroundingDinoForObjectDetection(
                GroundingDinoConfig(
                    backbone_config=SwinConfig(
                        embed_dim=128,
                        depths=[2, 2, 18, 2],
                        num_heads=[4, 8, 16, 32],
                        window_size=12,
                        image_size=384,
                        out_indices=[2, 3, 4],
                    )
                )
            )
            sm = SamModel(SamConfig())
        dp = GroundingDinoProcessor(GroundingDinoImageProcessor(), tiny_bert_tokenizer())
        sp = SamProcessor(SamImageProcessor())
    det, seg = GroundingDinoDetector(dm, dp, 0.0, 0.0, device), SamSegmenter(sm, sp, device)
    side = 96 if tiny else 1024
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (side, side, 3), dtype=np.uint8))
    box = [side * 0.2, side * 0.2, side * 0.5, side * 0.6]

    def ours():
        dets = det.detect(img, "a red ball", None)
        seg.segment(img, dets[0].box if dets else box, None)

    def bare():
        with torch.no_grad():
            inp = dp(images=img, text="a red ball.", return_tensors="pt").to(device)
            out = dm(**inp)
            res = dp.post_process_grounded_object_detection(
                out, inp["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(side, side)]
            )[0]
            b = res["boxes"][0].tolist() if len(res["boxes"]) else box
            si = sp(images=img, input_boxes=[[b]], return_tensors="pt").to(device)
            so = sm(**si, multimask_output=True)
            sp.post_process_masks(so.pred_masks.cpu(), si["original_sizes"].cpu(), si["reshaped_input_sizes"].cpu())

    b, o = timeit(bare, reps), timeit(ours, reps)
    return {
        "what": f"Grounding DINO (Swin-B) + SAM ViT-B, {side}x{side} image",
        "unit": "images/s",
        "bare": 1 / b,
        "ours": 1 / o,
        "overhead": o / b - 1,
    }


def main():
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="outpaint,judge,ground")
    a = ap.parse_args()
    device = current_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    info = environment(reps=a.reps)
    print(json.dumps(info), flush=True)
    rows = []
    for name, fn in (("outpaint", bench_outpaint), ("judge", bench_judge), ("ground", bench_ground)):
        if name in a.only:
            r = fn(a.tiny, device, dtype, a.reps)
            gc.collect()  # the stage's models go out of scope with its function: free them before the next
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for item in r if isinstance(r, list) else [r]:
                rows.append(item)
                print(json.dumps(item), flush=True)
            write_results(a.out, "data_stages", info, rows)
    print(f"\n{'stage model':<62}{'unit':>10}{'bare':>9}{'ours':>9}{'overhead':>10}")
    for r in rows:
        print(f"{r['what']:<62}{r['unit']:>10}{r['bare']:>9.3f}{r['ours']:>9.3f}{r['overhead']:>10.1%}")


if __name__ == "__main__":
    main()
