"""The CLIP vision tower (open_clip), frozen or partly trained, and how its outputs become
visual tokens.

Images: a ResNet tower gives its layer4 grid before attention pooling (7x7x2048 for RN101 at
224 px), adaptively max-pooled to `grid_pool` x `grid_pool` tokens; a ViT tower gives its
patch tokens (after ln_post). Video: each frame's pooled CLIP embedding (512-d for ViT-B/32),
resampled in time to `max_frames` (max-pool when longer, zero-pad + mask when shorter).

Pixels arrive as uint8 (the data workers hand over a quarter of float32's bytes: shared memory,
pinned host memory, the host-to-device copy) and are normalised here, on the tower's device, as
CLIP expects: `normalise_pixels`. Float pixels are taken as normalised already.

Every visual token carries a 5-d box (x1, y1, x2, y2, area) in [0, 1] for the position code of
the visual embedding: its grid cell for images, its time slice (t/T, 0, (t+1)/T, 1) for frames.
Only model.visual_input="grid" reads them; the reference's input (the default) feeds zero boxes
and derives each token's object order from vis_order (vlds.model.vl.VisualEmbedding).
This module is the one place that layout is written: `image_tokens` and `frame_tokens` turn
tower outputs, or the same outputs cached as features (vlds.data.decode), into the model's
vis_feats / vis_boxes / vis_order / vis_mask inputs.

The tower is frozen by default and runs outside the DeepSpeed engine under no_grad (the paper's
choice). `model.vision_train` (the paper's comparison of a frozen CLIP, a fine-tuned one and
adapters inside it) trains part of it: `train_tower` marks what trains, and the VL model then
holds the tower (vlds.model.vl.VLModel.attach_tower) so that it lives inside the engine, which
optimises, partitions and checkpoints it; the tower computes the visual tokens inside the
model's forward and `visual_inputs` called from outside passes the pixels through.
- full: every weight the visual tokens depend on (not the attention pool of a ResNet or the
  output projection of a ViT for image tasks: grid tokens are read before them);
- ln: the normalisation layers (a ViT's LayerNorms, a ResNet's BatchNorm weights and biases);
- adapter: vlds' adapter (vlds.peft.adapter.Adapter, bottleneck = width / peft.reduction_factor)
  on the output of every ViT block's attention and MLP, and of every ResNet bottleneck's last
  BatchNorm (over channels), before the residual add; the up-projection starts at zero, so
  the tower starts as the pretrained one (vlds' choice: the reference has no CLIP adapters).
BatchNorm statistics stay fixed in every mode (the tower is always in eval mode).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "configs"  # the tiny towers used by tests and the default
# open_clip's OPENAI_DATASET_MEAN / STD: the statistics every tower vlds names was trained with
# (RN101 and ViT-B/32 "openai", the embedded tower: vlds.model.embedded_tower)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_registered = False


def register_embedded_configs() -> None:
    """Make the embedded tiny tower configs (vlds-tiny-rn, vlds-tiny-vit) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def pixel_scale_shift(mean=CLIP_MEAN, std=CLIP_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 `scale`, `shift` with (x / 255 - mean) / std == x * scale - shift."""
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return 1.0 / (255.0 * std_t), mean_t / std_t


def normalise_pixels(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 x * scale - shift, two in-place passes: the
    arithmetic the data workers used before pixels left them as uint8, so the result is the
    same to the bit on the CPU (tests/test_model.py)."""
    return x.float().mul_(scale.to(x.device)).sub_(shift.to(x.device))


def tower_image_size(name: str) -> int:
    """Input resolution of an open_clip model, read from its config (no weights built)."""
    import open_clip

    register_embedded_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip model {name!r}; valid names include RN101, ViT-B-32, "
            f"vlds-tiny-rn (see open_clip.list_models())"
        )
    size = cfg["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def grid_boxes(g: int) -> torch.Tensor:
    """(g*g, 5) boxes of a g x g grid, row-major, as (x1, y1, x2, y2, area)."""
    idx = torch.arange(g, dtype=torch.float32)
    y1, x1 = torch.meshgrid(idx / g, idx / g, indexing="ij")
    x1, y1 = x1.reshape(-1), y1.reshape(-1)
    area = torch.full_like(x1, 1.0 / (g * g))
    return torch.stack([x1, y1, x1 + 1.0 / g, y1 + 1.0 / g, area], dim=-1)


def time_boxes(t: int) -> torch.Tensor:
    """(t, 5) boxes of t time slices: (i/t, 0, (i+1)/t, 1, 1/t)."""
    i = torch.arange(t, dtype=torch.float32)
    return torch.stack(
        [i / t, torch.zeros(t), (i + 1) / t, torch.ones(t), torch.full((t,), 1 / t)], -1
    )


def resample_frames(x: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) -> (B, max_frames, D) and a (B, max_frames) mask: max-pool down, pad up."""
    b, t, d = x.shape
    if t > max_frames:
        # (B, D, T) -> adaptive max over time -> (B, D, max_frames)
        x = F.adaptive_max_pool1d(x.transpose(1, 2), max_frames).transpose(1, 2)
        return x, torch.ones(b, max_frames, dtype=torch.long, device=x.device)
    mask = torch.zeros(b, max_frames, dtype=torch.long, device=x.device)
    mask[:, :t] = 1
    return F.pad(x, (0, 0, 0, max_frames - t)), mask


def image_tokens(feats: torch.Tensor, n_img: int) -> dict:
    """(B, n_img * t, C) tokens of n_img square grids per sample -> the model's visual inputs:
    each token's grid-cell box, image-order ids 0..n_img-1 (NLVR2's two images differ only by
    that id) and a mask of ones."""
    b, nt = feats.shape[:2]
    t = nt // n_img
    g = math.isqrt(t)
    if g * g != t or t * n_img != nt:
        raise ValueError(f"{nt} visual tokens are not {n_img} square grid(s)")
    dev = feats.device
    boxes = grid_boxes(g).to(dev).repeat(n_img, 1).expand(b, -1, -1)  # (B, n_img * t, 5)
    order = torch.arange(n_img, device=dev).repeat_interleave(t).expand(b, -1)
    mask = torch.ones(b, nt, dtype=torch.long, device=dev)
    return {"vis_feats": feats, "vis_boxes": boxes, "vis_order": order, "vis_mask": mask}


def frame_tokens(emb: torch.Tensor | list[torch.Tensor], max_frames: int) -> dict:
    """Frame embeddings, (B, T, D) or a list of (T_i, D), -> the model's visual inputs:
    resampled to max_frames (max-pool down, zero-pad + mask up), time-slice boxes, order 0."""
    if isinstance(emb, torch.Tensor):
        feats, mask = resample_frames(emb, max_frames)  # (B, max_frames, D), (B, max_frames)
    else:
        out = [resample_frames(e[None], max_frames) for e in emb]
        feats, mask = torch.cat([x for x, _ in out]), torch.cat([m for _, m in out])
    b, dev = feats.shape[0], feats.device
    boxes = time_boxes(max_frames).to(dev).expand(b, -1, -1)
    order = torch.zeros(b, max_frames, dtype=torch.long, device=dev)
    return {"vis_feats": feats, "vis_boxes": boxes, "vis_order": order, "vis_mask": mask}


def he_init_resnet(visual: nn.Module) -> None:
    """Re-initialise a random open_clip ResNet so its frozen features see the image.

    open_clip initialises each bottleneck's last BatchNorm weight to zero (the residual branch
    starts closed) and relies on training to set the BatchNorm statistics. Frozen at that init,
    with eval-mode BatchNorm, a block is its 1x1 downsample only and every layer shrinks the
    signal: the tiny tower's layer4 grid is ~1e-4 in size and its pooled output nearly the same
    for every image, so the visual embedding's bias swamps it and a run learns from the text
    alone. He-initialised convolutions (fan_in: the forward signal keeps its scale) and unit
    BatchNorm give features of order 1 that vary with the image, as a real CLIP tower's do.
    Pretrained weights are never touched."""
    for m in visual.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _feature_stats(pretrained: str) -> dict:
    """The output statistics a local checkpoint file carries ({} for hub weights, random towers
    and checkpoints without them)."""
    if not pretrained or not Path(pretrained).is_file() or pretrained.endswith(".safetensors"):
        return {}
    ckpt = torch.load(pretrained, map_location="cpu", weights_only=True)
    stats = ckpt.get("feature_stats", {}) if isinstance(ckpt, dict) else {}
    return {k: v.float() for k, v in stats.items()}


VISION_TRAIN = ("frozen", "full", "ln", "adapter")


class TowerAdapter(nn.Module):
    """An adapter (vlds.peft.adapter.Adapter) at a site inside the tower: over the last
    dimension of a ViT block's (L, N, D) or (N, L, D) output, or over the channels of a ResNet
    block's (N, C, H, W) feature map (`channels_first`).

    Below the first adapter nothing of the tower trains, so that adapter's input needs no
    gradient; it is made to ask for one. Under ZeRO-3 a module's parameters are released once
    the gradient reaches its inputs, and for a module whose inputs need none DeepSpeed's hook
    fires as soon as the gradient reaches its outputs: before the adapter's own weight
    gradients are accumulated (a shape error in AccumulateGrad, seen on CPU with
    ds_configs/zero3.json). The input's gradient costs one small matmul and is dropped."""

    def __init__(self, adapter: nn.Module, channels_first: bool):
        super().__init__()
        self.adapter, self.channels_first = adapter, channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()
        if not self.channels_first:
            return self.adapter(x)
        return self.adapter(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class VisionTower(nn.Module):
    """An open_clip image tower, frozen unless `train_tower` says otherwise. Always in eval
    mode (BatchNorm statistics fixed)."""

    def __init__(self, name: str, pretrained: str = "", grid_pool: int = 6):
        super().__init__()
        import open_clip
        from open_clip.modified_resnet import ModifiedResNet

        register_embedded_configs()
        # pretrained: "" -> random (tests), "openai" -> hub weights, or a local checkpoint file
        clip = open_clip.create_model(name, pretrained=pretrained or None)
        self.visual = clip.visual
        del clip  # the text tower is never used
        self.is_resnet = isinstance(self.visual, ModifiedResNet)
        self.grid_pool = grid_pool
        self.image_size = tower_image_size(name)
        if self.is_resnet:
            self.grid_dim = self.visual.layer4[-1].conv3.out_channels  # 2048 for RN101
        else:
            self.grid_dim = self.visual.transformer.width  # 768 for ViT-B/32
            self.visual.output_tokens = True
        self.pooled_dim = self.visual.output_dim  # 512 for RN101 and ViT-B/32
        if self.is_resnet and not pretrained:
            he_init_resnet(self.visual)
        # Per-channel standardisation of the outputs, when the checkpoint carries statistics
        # (the embedded tower does: vlds.model.embedded_tower); real towers carry none.
        stats = _feature_stats(pretrained)
        for key in ("grid_mean", "grid_std", "pooled_mean", "pooled_std"):
            self.register_buffer(key, stats.get(key), persistent=False)
        # Plain attributes, not buffers: a tower cast to bf16 still normalises in float32.
        self.pixel_scale, self.pixel_shift = pixel_scale_shift(CLIP_MEAN, CLIP_STD)
        self.requires_grad_(False)
        self.eval()
        self.in_model = False  # held by a VL model (VLModel.attach_tower): it computes the tokens

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm and dropout stay in eval mode

    # grid_tokens / frame_embeddings build no graph while the tower is frozen (no parameter
    # requires grad); visual_inputs adds no_grad unless asked for gradients (pretraining).
    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> normalised float32 (on x's device); float pixels pass unchanged."""
        if x.dtype != torch.uint8:
            return x
        if self.pixel_scale.device != x.device:  # once: later calls find them on the device
            self.pixel_scale = self.pixel_scale.to(x.device)
            self.pixel_shift = self.pixel_shift.to(x.device)
        return normalise_pixels(x, self.pixel_scale, self.pixel_shift)

    def grid_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) pixels, uint8 or normalised -> tokens (N, n_tok, grid_dim), boxes
        (n_tok, 5)."""
        images = self.pixels(images)
        v = self.visual
        if self.is_resnet:
            x = v.stem(images.to(v.conv1.weight.dtype))
            x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (N, C, h, w): 7x7 at 224 px
            x = F.adaptive_max_pool2d(x, self.grid_pool)  # (N, C, g, g)
            tokens = x.flatten(2).transpose(1, 2)  # (N, g*g, C)
            return self._standardise(tokens, "grid"), grid_boxes(self.grid_pool).to(tokens.device)
        _, tokens = v(images.to(v.conv1.weight.dtype))  # (N, n_patches, width)
        g = int(round(tokens.shape[1] ** 0.5))
        return self._standardise(tokens, "grid"), grid_boxes(g).to(tokens.device)

    def _standardise(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        mean, std = getattr(self, f"{kind}_mean"), getattr(self, f"{kind}_std")
        if mean is None:
            return x
        return ((x - mean.to(x.dtype)) / std.to(x.dtype)).to(x.dtype)

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) pixels, uint8 or normalised -> (B, T, pooled_dim) pooled CLIP
        embeddings, one per frame."""
        frames = self.pixels(frames)
        b, t = frames.shape[:2]
        out = self.visual(frames.flatten(0, 1).to(self.visual.conv1.weight.dtype))
        pooled = out[0] if isinstance(out, tuple) else out
        return self._standardise(pooled, "pooled").view(b, t, -1)

    def visual_inputs(self, batch: dict, max_frames: int, grad: bool = False) -> dict:
        """Fill vis_feats / vis_boxes / vis_order / vis_mask from the batch's pixels.

        images: (B, n_img, 3, H, W) -> n_img x n_tok tokens per sample, image-order ids 0..n-1
        (NLVR2's two images differ only by that id); frames: (B, T, 3, H, W) -> max_frames tokens.
        Pixels are uint8, normalised here on the batch's device (float: normalised already).
        A batch that already holds `vis_feats` (cached CLIP features) passes through.
        `grad=True` keeps the graph through the tower (its parameters must require grad: the
        backbone pretraining of bench/mini_repro.py); training and evaluation never ask for it.
        A tower held by the VL model (it trains) passes the pixels through: the model's forward
        computes the tokens with the graph (VLModel.encoder_inputs).
        """
        if "vis_feats" in batch or self.in_model:
            return batch
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self._visual_inputs(batch, max_frames)

    def _visual_inputs(self, batch: dict, max_frames: int) -> dict:
        if "images" in batch:
            imgs = batch["images"]
            b, n = imgs.shape[:2]
            tokens, _ = self.grid_tokens(imgs.flatten(0, 1))  # (B*n, t, C)
            return {**batch, **image_tokens(tokens.reshape(b, n * tokens.shape[1], -1), n)}
        emb = self.frame_embeddings(batch["frames"])  # (B, T, D)
        return {**batch, **frame_tokens(emb, max_frames)}


def _tower_sites(visual: nn.Module, is_resnet: bool) -> list[tuple[str, nn.Module, int]]:
    """(key, module whose output an adapter transforms, width) inside the tower."""
    if is_resnet:
        return [
            (f"layer{i}-{j}", block.bn3, block.bn3.num_features)
            for i in range(1, 5)
            for j, block in enumerate(getattr(visual, f"layer{i}"))
        ]
    width = visual.transformer.width
    return [
        (f"block{i}-{part}", getattr(block, part), width)
        for i, block in enumerate(visual.transformer.resblocks)
        for part in ("attn", "mlp")
    ]


def train_tower(
    tower: VisionTower, mode: str, reduction_factor: int, video: bool, fused_kernel: str = "auto"
) -> None:
    """Mark what of `tower` trains for model.vision_train=`mode` (see the module docstring);
    `video`: its pooled output is read (frame embeddings), else its grid tokens."""
    from vlds.config import ConfigError
    from vlds.peft.adapter import Adapter
    from vlds.peft.inject import transform_output

    if mode not in VISION_TRAIN:
        raise ConfigError(f"model.vision_train={mode!r}; valid: {', '.join(VISION_TRAIN)}")
    v = tower.visual
    tower.requires_grad_(False)
    if mode == "full":
        v.requires_grad_(True)
        if not video and tower.is_resnet:
            v.attnpool.requires_grad_(False)
        elif not video and v.proj is not None:
            v.proj.requires_grad_(False)
    elif mode == "ln":
        for m in v.modules():
            if isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
                m.requires_grad_(True)
    elif mode == "adapter":
        tower.adapters = nn.ModuleDict()
        for key, module, width in _tower_sites(v, tower.is_resnet):
            if width % reduction_factor:
                raise ConfigError(
                    f"model.vision_train=adapter: peft.reduction_factor={reduction_factor} "
                    f"does not divide the tower's width {width} at {key}"
                )
            adapter = Adapter(width, width // reduction_factor, fused_kernel=fused_kernel)
            nn.init.zeros_(adapter.up.weight)  # the tower starts as the pretrained one
            nn.init.zeros_(adapter.up.bias)
            tower.adapters[key] = TowerAdapter(adapter, channels_first=tower.is_resnet)
            transform_output(module, tower.adapters[key])
