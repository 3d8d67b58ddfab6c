"""Loader memory: uint8 pixels from the workers, normalised by the tower bitwise as the workers
did.

    pytest tests/test_loader_memory.py
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from vlds.data.decode import Preprocess
from vlds.model.vision import CLIP_MEAN, CLIP_STD, VisionTower

S = 24  # the tower's input here; 96 in the tiny presets


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def workers_formula(x: torch.Tensor) -> torch.Tensor:
    """The normalisation the data workers applied before pixels left them as uint8."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return x.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


def test_preprocess_hands_over_uint8_pixels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    x = Preprocess(S).image(buf.getvalue())
    assert x.dtype == torch.uint8 and x.shape == (3, S, S) and x.is_contiguous()
    frames = rng.integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    f = Preprocess(S).frames(npy(frames))
    assert f.dtype == torch.uint8 and torch.equal(f, torch.from_numpy(frames).permute(0, 3, 1, 2))
    g = Preprocess(16).frames(npy(frames))  # frames of another size: resized, rounded back
    assert g.dtype == torch.uint8 and g.shape == (4, 3, 16, 16)


def test_the_tower_normalises_uint8_pixels_bitwise_as_the_workers_did():
    torch.manual_seed(0)
    tower = VisionTower("vlds-tiny-rn")
    pixels = torch.randint(0, 256, (2, 2, 3, 96, 96), dtype=torch.uint8)  # (B, n_img, 3, S, S)
    old = workers_formula(pixels)
    assert torch.equal(tower.pixels(pixels), old)
    assert torch.equal(tower.pixels(old), old)  # float pixels: taken as normalised
    for key in ("images", "frames"):
        a = tower.visual_inputs({key: pixels}, max_frames=4)["vis_feats"]
        b = tower.visual_inputs({key: old}, max_frames=4)["vis_feats"]
        assert torch.equal(a, b), key
