"""Detector and segmenter through transformers.

- Detector: ``GroundingDinoForObjectDetection`` (full: ``IDEA-Research/grounding-dino-base``). The
  design card's ``grounding-dino-py`` does not exist on PyPI and ``groundingdino-py`` breaks under
  transformers 5 (shared/notes/dependencies.md §5); transformers' own class has neither problem.
- Segmenter: transformers' ``SamModel`` (full: ``facebook/sam-vit-base``), chosen over the
  ``segment-anything`` package: it is maintained with the rest of transformers, loads
  safetensors by hub id or folder (segment-anything loads pickled ``.pth`` checkpoints with
  ``torch.load``), and shares the processor conventions of the detector.

``tiny``: the same classes from small configs with random weights; the Grounding DINO text
tokenizer is a BERT vocabulary built locally whose [CLS], [SEP], "." and "?" ids match
bert-base-uncased (101, 102, 1012, 1029), which the model hard-codes (notes §4.0).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from metrics import clip_box
from models.roles import Box, Context, Detection

WORDS = (
    "a an the of red green blue yellow purple orange black white grey brown pink circle square triangle "
    "diamond ball cup book lamp box sign phone bottle chair person car dog cat tree table"
).split()


def tiny_bert_tokenizer():
    from transformers import BertTokenizerFast

    vocab = {f"[unused{i}]": i for i in range(1031)}
    for tok, i in (
        ("[PAD]", 0),
        ("[UNK]", 100),
        ("[CLS]", 101),
        ("[SEP]", 102),
        ("[MASK]", 103),
        (".", 1012),
        ("?", 1029),
    ):
        vocab.pop(next(k for k, v in vocab.items() if v == i))
        vocab[tok] = i
    free = [i for i in range(104, 1031) if i not in (1012, 1029)]
    for word, i in zip(WORDS, free):
        vocab.pop(next(k for k, v in vocab.items() if v == i))
        vocab[word] = i
    # The vocabulary itself, not a file: a vocab_file argument is silently ignored (notes §4.0).
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def build_tiny_grounding_dino(seed: int = 0):
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    cfg = GroundingDinoConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
        disable_custom_kernels=True,
        backbone_config=SwinConfig(
            window_size=7,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            image_size=96,
            out_indices=[2, 3, 4],
        ),
        text_config=dict(
            model_type="bert",
            vocab_size=1031,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=64,
        ),
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(cfg)
    # Large enough that the coarsest of the 4 feature levels keeps >= 2x2 cells (GroupNorm refuses 1x1).
    proc = GroundingDinoProcessor(
        GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}), tiny_bert_tokenizer()
    )
    return model, proc


class GroundingDinoDetector:
    def __init__(
        self, model, processor, box_threshold: float = 0.35, text_threshold: float = 0.25, device: str = "cpu"
    ):
        self.model = model.to(device).eval()
        self.processor = processor
        self.box_threshold, self.text_threshold, self.device = box_threshold, text_threshold, device

    @classmethod
    def tiny(cls, seed: int = 0, **kw) -> "GroundingDinoDetector":
        model, proc = build_tiny_grounding_dino(seed)
        return cls(model, proc, **kw)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "IDEA-Research/grounding-dino-base",
        device: str = "cuda",
        trust_remote_code: bool = False,
        **kw,
    ) -> "GroundingDinoDetector":
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        return cls(
            AutoModelForZeroShotObjectDetection.from_pretrained(
                model, trust_remote_code=trust_remote_code, use_safetensors=True
            ),
            AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code),
            device=device,
            **kw,
        )

    @torch.no_grad()
    def detect(self, image: Image.Image, phrase: str, context: Context) -> list[Detection]:
        text = phrase.strip().lower().rstrip(".") + "."  # Grounding DINO wants lower-case phrases ending in "."
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        res = self.processor.post_process_grounded_object_detection(
            out,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        labels = res.get("text_labels", res.get("labels", []))
        # Predicted centre +- size can reach past the border: clip to the image, as the role promises.
        return [
            Detection(clip_box([float(v) for v in box.tolist()], image.width, image.height), float(s), str(lbl))
            for box, s, lbl in zip(res["boxes"], res["scores"], labels)
        ]


def build_tiny_sam(seed: int = 0):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            output_channels=16,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
        ),
    )
    torch.manual_seed(seed)
    return SamModel(cfg), SamProcessor(
        SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    )


class SamSegmenter:
    def __init__(self, model, processor, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @classmethod
    def tiny(cls, seed: int = 0, **kw) -> "SamSegmenter":
        model, proc = build_tiny_sam(seed)
        return cls(model, proc, **kw)

    @classmethod
    def from_pretrained(
        cls, model: str = "facebook/sam-vit-base", device: str = "cuda", trust_remote_code: bool = False, **kw
    ) -> "SamSegmenter":
        from transformers import SamModel, SamProcessor

        return cls(
            SamModel.from_pretrained(model, use_safetensors=True, trust_remote_code=trust_remote_code),
            SamProcessor.from_pretrained(model, trust_remote_code=trust_remote_code),
            device=device,
        )

    @torch.no_grad()
    def segment(self, image: Image.Image, box: Box, context: Context) -> np.ndarray:
        inputs = self.processor(images=image, input_boxes=[[[float(v) for v in box]]], return_tensors="pt").to(
            self.device
        )
        out = self.model(**inputs, multimask_output=True)
        masks = self.processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]  # (boxes, masks, H, W)
        best = int(out.iou_scores[0, 0].argmax())
        return masks[0, best].numpy().astype(bool)
