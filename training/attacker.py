"""Attacker training: cold-start flow matching on AOT-SFT pairs, then Flow-GRPO.

A Flow-GRPO step reads as the algorithm does: for each prompt, sample a group of G edits with
the SDE sampler (log-probs kept) -> reward them (in a worker thread while the next group is
sampled) -> group-normalized, clipped advantages -> per-step clipped-ratio update of the LoRA
on the trained steps. Each group is one sampling batch and one training micro-batch with the
same dtypes, so the first ratio of a batch is exactly 1 (METHOD.md's pitfall; tested).

Checkpoints hold the LoRA (safetensors), optimizer, step, RNG and data position; resume
reproduces the next steps exactly.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from config import AttackerTrainConfig
from metrics.ssim import pixel_box
from rl.flow_grpo import flow_grpo_loss, gaussian_kl, group_advantages
from rl.flow_sampler import sample, step_log_prob
from training.attacker_rewards import AttackItem, BatchReward, combine
from training.checkpoint import load_trainer_state, save_checkpoint
from training.defender import DataStream


@dataclass
class EditPair:
    """A cold-start example: clean image + instruction -> the adversarial image."""

    clean: Image.Image
    edited: Image.Image
    instruction: str


def scale_boxes(boxes: list[list[float]], src: tuple[int, int], dst: tuple[int, int]) -> list[list[float]]:
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]


def at_edit_size(editor, item: AttackItem) -> AttackItem:
    """The item as the attacker sees it: image at the edit size, boxes scaled with it."""
    image = editor.resize(item.image)
    mask = item.target_mask
    return dataclasses.replace(
        item,
        image=image,
        target_boxes=scale_boxes(item.target_boxes, item.image.size, image.size),
        target_mask=None if mask is None or mask.size == image.size else mask.resize(image.size, Image.NEAREST),
    )


@dataclasses.dataclass(frozen=True)
class Placement:
    """How an edit made at the editor's size becomes the image the defender is asked about and
    the curriculum keeps — the same in Flow-GRPO's rewards, the curriculum and the aot-attacker
    attack (the attacker config's fields of the same meaning; ``of`` reads them)."""

    keep_targets: bool = False  # attacker.keep_targets: the targets given back from the clean image
    at_source_size: bool = False  # attacker.edits_at_source_size: applied at the image's own size
    from_reconstruction: bool = False  # attacker.change_from_reconstruction
    change_floor: int = 0  # attacker.change_floor: smaller changes (8-bit levels) dropped

    @classmethod
    def of(cls, a) -> "Placement":  # a: the pipeline's attacker config
        return cls(a.keep_targets, a.edits_at_source_size, a.change_from_reconstruction, a.change_floor)


def scored_item(editor, item: AttackItem, at_source_size: bool) -> AttackItem:
    """The item whose image the defender compares an edit against: the item itself when edits are
    applied at the image's own size (``attacker.edits_at_source_size``), else as the editor sees it."""
    return item if at_source_size else at_edit_size(editor, item)


def carry_edit(
    clean: Image.Image,
    seen: Image.Image,
    edited: Image.Image,
    reference: Image.Image | None = None,
    floor: int = 0,
) -> Image.Image:
    """An edit made at the editor's size applied to ``clean`` at its own size: clean plus the
    edit's change (edited - seen, in float) upsampled bilinearly, rounded and clipped to 8 bits.
    Where the editor changed nothing the clean pixels come back (up to the editor's own
    reconstruction error, upsampled), so the image keeps its detail and only what the edit drew is
    new; upsampling the edited image itself would instead blur the whole image to the editor's
    resolution, an attack by resizing that any downscale already makes.

    ``reference`` (``attacker.change_from_reconstruction``): the change is taken against it — the
    editor's own reconstruction of ``seen`` — instead of ``seen``, at any size: what the editor's
    autoencoder loses is then not part of the edit, and pixels the editor left as it would leave
    an unedited image come back exactly clean. ``floor`` (``attacker.change_floor``): a pixel whose
    change is below ``floor`` levels in every channel (at the editor's size) is not changed."""
    if seen.size != edited.size:
        raise ValueError(f"the editor's input and output differ in size: {seen.size} vs {edited.size}")
    if reference is not None and reference.size != edited.size:
        raise ValueError(f"the editor's reconstruction and edit differ in size: {reference.size} vs {edited.size}")
    base = seen if reference is None else reference
    if clean.size == seen.size and reference is None and not floor:
        return edited
    delta = torch.from_numpy(
        np.asarray(edited.convert("RGB"), dtype=np.float32) - np.asarray(base.convert("RGB"), dtype=np.float32)
    )
    if floor:
        delta = delta * (delta.abs().amax(-1, keepdim=True) >= floor)
    if clean.size != seen.size:
        delta = torch.nn.functional.interpolate(
            delta.permute(2, 0, 1)[None], size=(clean.height, clean.width), mode="bilinear", align_corners=False
        )[0].permute(1, 2, 0)
    out = torch.from_numpy(np.asarray(clean.convert("RGB"), dtype=np.float32)) + delta
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())


def place_edit(
    scored: AttackItem,
    seen: Image.Image,
    edited: Image.Image,
    placement: Placement = Placement(),
    reference: Image.Image | None = None,
) -> Image.Image:
    """The edited image the defender is asked about and the curriculum keeps: the editor's output
    (made from ``seen``) carried to the scored item's size (`carry_edit`, against ``reference``
    when ``placement.from_reconstruction``), with the targets given back when
    ``placement.keep_targets``."""
    out = carry_edit(scored.image, seen, edited, reference, placement.change_floor)
    if not placement.keep_targets:
        return out
    return restore_targets(scored.image, out, scored.target_boxes, scored.target_mask)


def reconstructions(editor, cond) -> list[Image.Image]:
    """The editor's reconstruction of each condition image (its autoencoder's round trip, as
    ``decode`` turns latents into images): what an edit that changes nothing comes out as."""
    return editor.decode(cond.image_latents, cond)


def restore_targets(
    clean: Image.Image, edited: Image.Image, boxes: list[list[float]], mask: Image.Image | None = None
) -> Image.Image:
    """The edit with every target box given back from the clean image, pixel for pixel (the box
    rounded outwards, as localized SSIM crops it, so each target's SSIM is exactly 1). An attacker
    whose output passes through this can only change what lies around the targets — where the
    implanter's distractors work (RESULTS.md: beside the target) — and never the ground truth the
    integrity gate guards, so Flow-GRPO no longer trades integrity against efficacy. The same
    composite as diffusers' inpainting overlay (``VaeImageProcessor.apply_overlay``), with the
    targets as the kept region."""
    if not boxes:
        return edited
    if clean.size != edited.size:
        raise ValueError(f"clean and edited images differ in size: {clean.size} vs {edited.size}")
    if mask is not None:  # the targets' own pixels (attacker.keep_target_shapes), 1 px wider: a
        # resized image blends each outline with what is beside it, and that blend is the clean one's
        if mask.size != clean.size:
            raise ValueError(f"target mask {mask.size} and image {clean.size} differ in size")
        from scipy import ndimage

        keep = ndimage.binary_dilation(np.asarray(mask) > 0, iterations=1)[..., None]
        a, b = np.asarray(clean.convert("RGB")), np.asarray(edited.convert("RGB"))
        return Image.fromarray(np.where(keep, a, b)).convert(edited.mode)
    out = edited.copy()
    for b in boxes:
        x0, y0, x1, y1 = pixel_box(b, clean.width, clean.height)
        if x1 > x0 and y1 > y0:
            out.paste(clean.crop((x0, y0, x1, y1)).convert(out.mode), (x0, y0))
    return out


def edit_weights(edited: torch.Tensor, clean: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Per-token loss weights (B, L) of a cold-start batch: 1 + weight x the token's change
    |edited - clean| (mean over channels) over the pair's largest change. None when weight is 0
    (plain flow matching). The change is read in latent space, where the velocity is learned."""
    if not weight:
        return None
    if edited.shape != clean.shape:
        raise ValueError(
            f"cold_start.edit_weight needs condition latents shaped like the target's ({tuple(clean.shape)} vs "
            f"{tuple(edited.shape)}): this editor conditions differently; set edit_weight to 0"
        )
    d = (edited.float() - clean.float()).abs().mean(-1)
    return 1 + weight * d / d.amax(dim=1, keepdim=True).clamp_min(1e-8)


def _weighted_mse(v: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Each pair's squared error averaged over tokens and channels, tokens weighted by ``w``."""
    per_token = ((v - target) ** 2).mean(-1)
    return per_token.mean(1) if w is None else (per_token * w).sum(1) / w.sum(1)


class AttackerTrainer:
    def __init__(
        self,
        editor,
        cfg: AttackerTrainConfig,
        items: list[AttackItem] | None = None,
        pairs: list[EditPair] | None = None,
        rewards: dict[str, BatchReward] | None = None,
        weights: dict[str, float] | None = None,
        resume_from: str | Path | None = None,
        placement: Placement = Placement(),
    ):
        self.editor, self.cfg, self.placement = editor, cfg, placement
        if cfg.mode == "grpo" and not (items and rewards):
            raise ValueError("Flow-GRPO needs items to attack and at least one reward callable")
        if cfg.mode == "sft" and not pairs:
            raise ValueError(
                "the cold start needs AOT-SFT pairs (clean, adversarial, instruction); the dataset has none"
            )
        self.items = [at_edit_size(editor, it) for it in items or []]
        # what each edit is scored against: the item at its own size or as the editor sees it
        self.scored = list(items or []) if placement.at_source_size else self.items
        self.pairs = pairs or []
        self.rewards, self.weights = rewards or {}, weights or {}
        if not editor.lora_parameters():
            editor.add_lora(cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        for p in editor.lora_parameters():  # trainable weights and Adam moments in float32 (mixed precision)
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            editor.enable_gradient_checkpointing(cfg.checkpoint_keep_blocks)
        if cfg.compile:
            editor.transformer.compile_repeated_blocks()
        self.opt = torch.optim.AdamW(editor.lora_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step, self.metrics, self.samples = 0, [], []
        self.stream = DataStream(len(self.items) if cfg.mode == "grpo" else len(self.pairs), cfg.seed)
        if resume_from is not None:
            self.load(resume_from)

    def _generator(self, *keys: int) -> torch.Generator:
        return torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + self.step * 1009 + sum(k * 101 ** (i + 1) for i, k in enumerate(keys))
        )

    # ------------------------------------------------------------------ Flow-GRPO
    def _score(self, clean: Image.Image, edited: list[Image.Image], item: AttackItem) -> list[dict]:
        return combine(self.rewards, self.weights, [clean] * len(edited), edited, [item] * len(edited))

    def grpo_step(self) -> dict:
        ed, cfg, fg = self.editor, self.cfg, self.cfg.flow_grpo
        G = fg.group_size
        picked = self.stream.take(cfg.groups_per_step)
        items, scored_items = [self.items[i] for i in picked], [self.scored[i] for i in picked]
        t0 = time.perf_counter()
        groups, pending = [], []
        pool = ThreadPoolExecutor(1) if cfg.async_rewards else None
        mb = cfg.micro_batch or G
        chunks = [slice(i, min(G, i + mb)) for i in range(0, G, mb)]
        try:
            for k, (item, target) in enumerate(
                zip(items, scored_items)
            ):  # sampling (rewards of group k run while group k + 1 samples)
                cond = ed.condition([item.image], [item.instruction])
                parts, edited = [], []
                for j, sl in enumerate(chunks):
                    c = cond.repeat(sl.stop - sl.start)
                    traj = sample(
                        ed,
                        c,
                        fg.sampling_steps,
                        fg.noise_level,
                        sigma_cap=fg.sigma_cap,
                        window=fg.train_window,
                        generator=self._generator(k, j),
                    )
                    edited += ed.decode(traj.final, c)
                    parts.append((sl, c, traj))
                # what the reward sees is what the curriculum would keep
                ref = reconstructions(ed, cond)[0] if self.placement.from_reconstruction else None
                edited = [place_edit(target, item.image, e, self.placement, ref) for e in edited]
                groups.append(parts)
                pending.append(
                    pool.submit(self._score, target.image, edited, target)
                    if pool
                    else self._score(target.image, edited, target)
                )
            t_sample = time.perf_counter() - t0
            scored = [p.result() if pool else p for p in pending]  # reward
        finally:
            if pool:
                pool.shutdown()
        t_reward = time.perf_counter() - t0 - t_sample
        rewards = torch.tensor([[r["reward"] for r in rows] for rows in scored], dtype=torch.float32)
        adv = group_advantages(rewards.view(-1), G, fg.adv_eps, fg.adv_clip, fg.adv_std).view(
            len(items), G
        )  # advantages
        t1 = time.perf_counter()
        stats = []
        n_terms = sum(len(traj.sde_steps) for parts in groups for _, _, traj in parts)
        for parts, a in zip(groups, adv):  # update: the micro-batches exactly as sampled
            for sl, cond, traj in parts:
                a_mb = a[sl].to(ed.device)
                for i in traj.sde_steps:
                    out = step_log_prob(ed, traj, i, cond, fg.noise_level, fg.sigma_cap)
                    kl = None
                    if fg.kl_beta:
                        with torch.no_grad(), ed.reference():
                            ref = step_log_prob(ed, traj, i, cond, fg.noise_level, fg.sigma_cap)
                        kl = gaussian_kl(out.mean, ref.mean, out.std.expand_as(out.mean))
                    loss, st = flow_grpo_loss(out.log_prob, traj.log_probs[:, i].to(out.log_prob.device), a_mb, fg, kl)
                    # mean over groups, over a group's edits (chunk share m / G), over trained steps
                    (loss * (sl.stop - sl.start) / G / len(groups) / len(traj.sde_steps)).backward()
                    stats.append(st)
        gnorm = torch.nn.utils.clip_grad_norm_(ed.lora_parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for item, rows in zip(items, scored):  # every component, per sample
            self.samples += [{"step": self.step + 1, "item": item.id, **r} for r in rows]
        scored_rewards = rewards[~rewards.isnan()]
        row = {
            "reward": float(rewards.nanmean()),  # NaN: a broken edit under invalid_score 'skip'
            "reward_std": float(scored_rewards.std()) if scored_rewards.numel() > 1 else 0.0,
            "sample_seconds": t_sample,
            "reward_seconds": t_reward,
            "update_seconds": time.perf_counter() - t1,
            "grad_norm": float(gnorm),
            "trained_steps": n_terms,
        }
        for key in ("policy_loss", "kl", "ratio_mean", "ratio_max", "clip_fraction"):
            row[key] = sum(s[key] for s in stats) / max(1, len(stats))
        parts = {
            k for rows in scored for r in rows for k, v in r.items() if k != "reward" and isinstance(v, (int, float))
        }
        for k in sorted(parts):
            vals = [r[k] for rows in scored for r in rows if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
            row[k] = sum(vals) / len(vals) if vals else float("nan")
        return row

    # ------------------------------------------------------------------ cold start
    def sft_step(self) -> dict:
        """Flow matching on (clean -> adversarial | instruction): x_s = (1 - s) x0 + s eps, target
        v = eps - x0, s ~ U(0, 1) per pair; the conditional branch only (no CFG). Pairs of one edit
        size share a forward (``micro_batch`` at most; 0 = all of them): one pair per forward left a
        GPU idle, ~1 s per step of 16 tiny pairs. Noise and s are drawn per pair in batch order,
        so the split does not change the loss."""
        ed, cfg = self.editor, self.cfg
        batch = [self.pairs[i] for i in self.stream.take(cfg.sft_batch)]
        g = self._generator()
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, pair in enumerate(batch):
            by_size.setdefault(ed.resize(pair.clean).size, []).append(j)
        mb = cfg.micro_batch or len(batch)
        chunks = [(size, idx[i : i + mb]) for size, idx in by_size.items() for i in range(0, len(idx), mb)]
        with torch.no_grad():  # the frozen VAE's latents of the targets, then each pair's draws in order
            x0 = {}
            for size, chunk in chunks:
                lat = ed.latents_of([batch[j].edited.convert("RGB").resize(size, Image.BICUBIC) for j in chunk])
                x0.update(zip(chunk, lat.split(1)))
            eps = {j: torch.randn(x0[j].shape, generator=g) for j in range(len(batch))}
            s = {j: torch.rand(1, generator=g) for j in range(len(batch))}
        total = 0.0
        for _, chunk in chunks:
            cond = ed.condition([batch[j].clean for j in chunk], [batch[j].instruction for j in chunk])
            x = torch.cat([x0[j] for j in chunk])
            e = torch.cat([eps[j] for j in chunk]).to(x.device, x.dtype)
            t = torch.cat([s[j] for j in chunk]).to(x.device, x.dtype)
            xs = (1 - t.view(-1, 1, 1)) * x + t.view(-1, 1, 1) * e
            v = ed.velocity(xs, t * 1000, cond, guidance=False)
            per_pair = _weighted_mse(v.float(), (e - x).float(), edit_weights(x, cond.image_latents, cfg.edit_weight))
            loss = per_pair.sum() / len(batch)
            loss.backward()
            total += float(loss.detach())
        gnorm = torch.nn.utils.clip_grad_norm_(ed.lora_parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": float(gnorm), "pairs": len(batch)}

    # ------------------------------------------------------------------ loop and checkpoints
    def train(self, steps: int | None = None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
        until = self.cfg.steps if steps is None else min(self.cfg.steps, self.step + steps)
        while self.step < until:
            t0 = time.perf_counter()
            row = self.grpo_step() if self.cfg.mode == "grpo" else self.sft_step()
            self.step += 1
            row = {"step": self.step, "lr": self.cfg.lr, "seconds": time.perf_counter() - t0, **row}
            self.metrics.append(row)
            if on_step:
                on_step(row)
        return self.metrics

    def save(self, folder: str | Path) -> Path:
        return save_checkpoint(
            folder,
            self.editor,
            self.opt,
            {
                "step": self.step,
                "data_position": self.stream.position(),
                "metrics": self.metrics,
                "config": dataclasses.asdict(self.cfg),
                # a reward with state (the integrity price of invalid_score 'dual') resumes with it
                "rewards": {k: fn.state_dict() for k, fn in self.rewards.items() if hasattr(fn, "state_dict")},
            },
        )

    def load(self, folder: str | Path) -> None:
        self.editor.load_lora(folder)
        state = load_trainer_state(folder, self.opt)
        self.step, self.metrics = state["step"], state["metrics"]
        for k, st in state.get("rewards", {}).items():
            self.rewards[k].load_state_dict(st)
        self.stream = DataStream(self.stream.n, self.cfg.seed, **state["data_position"])
