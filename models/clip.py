"""CLIP scorer through open_clip (open-clip-torch): the cheap text-image prefilter of Stage 1.

``tiny``: the real open_clip model class from a small config (``configs/tiny-clip.json``) with
random weights under a seed; its tokenizer's BPE vocabulary ships inside the package, so nothing
is downloaded. ``full``: a named architecture with a pretrained tag (e.g. ``ViT-B-32`` /
``laion2b_s34b_b79k``) or a local checkpoint, loaded by open_clip.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

CONFIG_DIR = Path(__file__).parent / "configs"


class OpenClipScorer:
    def __init__(self, model: str = "tiny-clip", pretrained: str | None = None, seed: int = 0, device: str = "cpu"):
        import open_clip
        import torch

        if model == "tiny-clip":
            open_clip.add_model_config(CONFIG_DIR / "tiny-clip.json")
        torch.manual_seed(seed)  # random init of the tiny model is reproducible
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self._torch = torch

    def score(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        torch = self._torch
        if not images:
            return []
        with torch.no_grad():
            pix = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            tok = self.tokenizer(texts).to(self.device)
            img_f = self.model.encode_image(pix)
            txt_f = self.model.encode_text(tok)
            img_f = img_f / img_f.norm(dim=-1, keepdim=True)
            txt_f = txt_f / txt_f.norm(dim=-1, keepdim=True)
            return [float(v) for v in (img_f * txt_f).sum(-1)]
