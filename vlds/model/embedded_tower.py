"""The embedded default's vision tower: the tiny open_clip tower pretrained on the shapes world.

A real run's CLIP tower arrives pretrained; the embedded default has no download, and a frozen
*random* tower gives tokens that are mostly one shared vector (measured on the old default:
~8 % of their variance image-specific, shape barely linearly decodable), so the models it fed
learned from the text alone. This module is the stand-in for CLIP's pretraining: on first use
the tiny tower (`vlds-tiny-rn` or `vlds-tiny-vit`) learns to name, for each cell of the 3x3
grid, the colour, shape and size of the object there (from its grid token) and the whole
layout (from its pooled embedding, which the video tasks read), on freshly rendered scenes and
clip frames. Supervised labels rather than CLIP's contrastive captions: the same information
in a fraction of the steps; either way the downstream model meets a frozen tower that sees.

The result is cached beside the embedded data, in ``$VLDS_CACHE/towers/<name>-v<N>.pt``
(default ~/.cache/vlds), an open_clip checkpoint (``{"state_dict": ...}``, so
``--model.vision_pretrained=FILE`` loads it like any other) plus ``feature_stats``: the
per-channel mean and std of its grid tokens and pooled embeddings over 1,024 fresh images.
`VisionTower` standardises its outputs with them (real towers carry none and are left as the
reference feeds them): without it the shared part of every token dominates the visual
embedding's Linear -> norm and the image-specific part is lost (see docs/model.md).

Written here because no library pretrains a 20k-parameter open_clip tower on a procedural
world; it is a plain torch loop of a few hundred Adam steps (~1 minute on 2 cores).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("vlds")

# Part of the cache name: bump when the same call would produce a different tower.
TOWER_VERSION = 1
GRID = 3  # the world's grid; the tiny towers' 96 px input gives a 3x3 token map
STEPS, BATCH, LR = 600, 64, 2e-3


def _classes():
    from vlds.data.synthetic.world import COLORS, SHAPES, SIZES

    # index 0 = empty cell
    return list(COLORS), list(SHAPES), list(SIZES)


def _cell_labels(objects) -> torch.Tensor:
    """(9, 3) long: per grid cell (row-major) its colour, shape and size class, 0 = empty."""
    colors, shapes, sizes = _classes()
    lab = torch.zeros(GRID * GRID, 3, dtype=torch.long)
    for o in objects:
        r, c = o.cell
        lab[r * GRID + c] = torch.tensor(
            [colors.index(o.color) + 1, shapes.index(o.kind) + 1, sizes.index(o.size) + 1]
        )
    return lab


def render_batch(rng: random.Random, n: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """n images (uint8 (n, size, size, 3)) with their cell labels (n, 9, 3): three in four are
    scenes as the image tasks draw them, one in four a frame of a moving clip."""
    from vlds.data.synthetic.world import Scene, random_clip, random_scene, render_scene

    images, labels = [], []
    for _ in range(n):
        if rng.random() < 0.75:
            scene = random_scene(rng, lo=1 if rng.random() < 0.9 else 0)
        else:
            clip = random_clip(rng)
            t = rng.random()
            scene = Scene(tuple(m.at(t) for m in clip.movers), clip.background, rng.getrandbits(32))
        images.append(np.asarray(render_scene(scene, size)))
        labels.append(_cell_labels(scene.objects))
    return np.stack(images), torch.stack(labels)


def _normalise(images: np.ndarray) -> torch.Tensor:
    from vlds.model.vision import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _Heads(nn.Module):
    """Per-token (cell) and pooled (whole-layout) classifiers, dropped after pretraining."""

    def __init__(self, grid_dim: int, pooled_dim: int):
        super().__init__()
        colors, shapes, sizes = _classes()
        self.sizes = (len(colors) + 1, len(shapes) + 1, len(sizes) + 1)
        k = sum(self.sizes)
        self.cell = nn.Linear(grid_dim, k)
        self.layout = nn.Linear(pooled_dim, GRID * GRID * k)

    def loss(self, tokens, pooled, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over cells and attributes, and the cell head's accuracy."""
        cell = self.cell(tokens).split(self.sizes, dim=-1)  # 3 x (N, 9, classes)
        layout = self.layout(pooled).view(labels.shape[0], GRID * GRID, -1)
        total = 0.0
        for logits in (cell, layout.split(self.sizes, dim=-1)):
            for j, part in enumerate(logits):
                total = total + F.cross_entropy(part.flatten(0, 1), labels[..., j].flatten())
        with torch.no_grad():
            correct = sum(
                (p.argmax(-1) == labels[..., j]).float().mean() for j, p in enumerate(cell)
            )
        return total / 6, correct / 3


def _outputs(visual: nn.Module, x: torch.Tensor, is_resnet: bool):
    """(tokens (N, 9, C), pooled (N, P)) of an open_clip visual module in its current mode."""
    if is_resnet:
        h = visual.stem(x)
        h = visual.layer4(visual.layer3(visual.layer2(visual.layer1(h))))  # (N, C, 3, 3)
        tokens = F.adaptive_max_pool2d(h, GRID).flatten(2).transpose(1, 2)
        return tokens, visual.attnpool(h)
    pooled, tokens = visual(x)
    return tokens, pooled


def pretrain(name: str, image_size: int, seed: int = 0, steps: int = STEPS) -> dict:
    """Pretrain the open_clip model `name` (a tiny tower) on the shapes world; returns the
    checkpoint dict: {"state_dict", "feature_stats", "pretraining"}."""
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet
    from tqdm import tqdm

    from vlds.model.vision import he_init_resnet, register_embedded_configs

    register_embedded_configs()
    torch.manual_seed(seed)
    clip = open_clip.create_model(name)
    visual = clip.visual
    is_resnet = isinstance(visual, ModifiedResNet)
    if is_resnet:
        he_init_resnet(visual)
    else:
        visual.output_tokens = True
    with torch.no_grad():
        tokens, pooled = _outputs(visual, torch.zeros(1, 3, image_size, image_size), is_resnet)
    if tokens.shape[1] != GRID * GRID:
        raise ValueError(
            f"{name} gives {tokens.shape[1]} grid tokens at {image_size} px; the shapes-world "
            f"pretraining needs a {GRID}x{GRID} map (the embedded vlds-tiny-rn / vlds-tiny-vit)"
        )
    heads = _Heads(tokens.shape[-1], pooled.shape[-1])
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    visual.train()
    bar = tqdm(
        range(steps),
        desc=f"pretraining {name} on the shapes world",
        dynamic_ncols=True,
        mininterval=2,
    )
    for _ in bar:
        images, labels = render_batch(rng, BATCH, image_size)
        tokens, pooled = _outputs(visual, _normalise(images), is_resnet)
        loss, acc = heads.loss(tokens, pooled, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", cell_acc=f"{acc.item():.2f}", refresh=False)
    visual.eval()
    with torch.no_grad():  # statistics and held-out accuracy on 1,024 fresh images
        toks, pools, accs = [], [], []
        for _ in range(16):
            images, labels = render_batch(rng, 64, image_size)
            t, p = _outputs(visual, _normalise(images), is_resnet)
            toks.append(t.flatten(0, 1))
            pools.append(p)
            accs.append(heads.loss(t, p, labels)[1])
        toks, pools = torch.cat(toks), torch.cat(pools)
    stats = {
        "grid_mean": toks.mean(0),
        "grid_std": toks.std(0).clamp(min=1e-4),
        "pooled_mean": pools.mean(0),
        "pooled_std": pools.std(0).clamp(min=1e-4),
    }
    acc = float(torch.stack(accs).mean())
    log.info("pretrained %s: held-out cell accuracy %.3f (colour, shape, size)", name, acc)
    return {
        "state_dict": clip.state_dict(),
        "feature_stats": stats,
        "pretraining": {
            "steps": steps,
            "seed": seed,
            "cell_accuracy": acc,
            "version": TOWER_VERSION,
        },
    }


def ensure_tower(name: str, root: Path | None = None) -> Path:
    """``<cache>/towers/<name>-v<version>.pt``, pretrained first if missing. Once per host:
    other processes wait on a lock, and the file appears by an atomic rename, whole or not at
    all. It depends only on the tower and this module (the images are rendered here), not on
    the data set, so every shapes-world folder and test shares it."""
    from vlds.data.synthetic.package import build_once, cache_root
    from vlds.model.vision import tower_image_size

    path = Path(root or cache_root()) / "towers" / f"{name}-v{TOWER_VERSION}.pt"
    return build_once(
        path, Path.is_file, lambda tmp: torch.save(pretrain(name, tower_image_size(name)), tmp)
    )
