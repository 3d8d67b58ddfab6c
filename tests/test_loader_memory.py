"""Loader memory: uint8 pixels from the workers, normalised by the tower bitwise as the workers
did; the shared-memory need per rank and the start-up check against /dev/shm; pinned batches
on CUDA.

    pytest tests/test_loader_memory.py
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import byte_tokenizer
from vlds.config import build_config
from vlds.data.build import DataBuilder
from vlds.data.decode import Preprocess
from vlds.data.shardio import DataError
from vlds.data.shm import check_shm, loader_shm_need
from vlds.data.synthetic import SyntheticSpec, write_task_split
from vlds.distributed import local_world_size
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


def test_shm_need_by_hand():
    # 3 workers x prefetch 2 x (the largest training batch + the largest evaluation batch)
    train = {"vqa": 32 * 3 * 96 * 96, "nlvr": 16 * 2 * 3 * 96 * 96}
    evals = {"vqa": 64 * 3 * 96 * 96, "nlvr": 64 * 2 * 3 * 96 * 96}
    assert loader_shm_need(3, 2, train, evals) == 3 * 2 * (32 + 128) * 3 * 96 * 96
    assert loader_shm_need(0, 2, train, evals) == 0  # no workers: batches stay in the process


def test_a_small_dev_shm_fails_naming_the_fix():
    batches = {"gqa": 10**8}, {"nlvr": 10**8}
    # 2 workers x prefetch 2 x 0.2 GB = 0.8 GB per rank, x 4 ranks = 3.2 GB > 1 GB free
    with pytest.raises(DataError) as e:
        check_shm(2, 2, *batches, local_ranks=4, free=10**9)
    msg = str(e.value)
    assert "= 0.80 GB per rank; /dev/shm has 1.00 GB free for 4 rank(s)" in msg
    for fix in ("--data.num_workers", "--data.prefetch_factor", "--data.batch_size"):
        assert fix in msg
    assert "--shm-size=4g" in msg  # 1.25 x 3.2 GB, in GiB, rounded up
    line = check_shm(2, 2, *batches, local_ranks=4, free=4 * 10**9)
    assert line.startswith("loader shared memory: 2 workers x prefetch 2 x (training batch ")
    assert "no /dev/shm here" in check_shm(2, 2, *batches, local_ranks=4, free=None)


def test_local_world_size_from_the_launchers(monkeypatch):
    assert local_world_size() == 1
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2),2")
    assert local_world_size() == 4
    monkeypatch.setenv("LOCAL_SIZE", "3")  # the deepspeed launcher's
    assert local_world_size() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's
    assert local_world_size() == 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("shm")
    for task in ("vqa", "nlvr"):
        for split in ("train", "val"):
            write_task_split(r, task, split, 8, SyntheticSpec(samples_per_shard=8))
    return r


def builder(root, device=None, **overrides):
    cfg = build_config(
        "tiny",
        {
            "data.root": str(root),
            "data.tasks": "vqa,nlvr",
            "data.batch_size": "4",
            "eval.batch_size": "6",
            "data.num_workers": "2",
            "data.prefetch_factor": "3",
            **overrides,
        },
    )
    info = SimpleNamespace(rank=0, world_size=1, is_main=True)
    return DataBuilder(cfg, root, byte_tokenizer(), 96, info, device=device)


def test_data_builder_sizes_batches_as_handed_over_and_checks(root):
    data = builder(root)
    train, evals = data.shared_memory_batches()
    px = 3 * 96 * 96  # one uint8 image
    # pixels exactly, plus each sample's token tensors (int64, ByT5: one token a byte)
    for got, want in ((train["vqa"], 4 * px), (train["nlvr"], 4 * 2 * px)):
        assert want < got < want + 4 * 3000
    assert 6 * 2 * px < evals["nlvr"] < 6 * 2 * px + 6 * 3000
    line = data.check_shared_memory(free=lambda: 10**12)
    need = 2 * 3 * (train["nlvr"] + evals["nlvr"])
    assert f"= {need / 1e9:.2f} GB per rank" in line
    with pytest.raises(DataError, match="--shm-size="):
        data.check_shared_memory(free=lambda: need - 1)
    assert builder(root, **{"data.num_workers": "0"}).check_shared_memory() is None


def test_loaders_pin_batches_on_cuda_only(root):
    for device, pinned in ((None, False), ("cpu", False), (torch.device("cuda", 0), True)):
        data = builder(root, device)
        assert data.train_loader(0).loader.pin_memory is pinned
        assert all(x.loader.pin_memory is pinned for x in data.eval_loaders().values())
        assert data.train_loader(0).loader.prefetch_factor == 3
