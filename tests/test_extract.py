"""Cached CLIP features (python -m vlds.data.prep.extract): layout, parity with pixels, resume, the
config checks, and a training run on feature shards.

    pytest tests/test_extract.py
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import tiny, train_run
from vlds.config import build_config
from vlds.data.build import check_features
from vlds.data.decode import Collator, Preprocess
from vlds.data.prep.extract import main as extract_main
from vlds.data.shardio import DataError, load_index
from vlds.data.stream import TrainStream
from vlds.data.synthetic import SyntheticSpec, write_task_split

REPO = Path(__file__).resolve().parent.parent
SPEC = SyntheticSpec(samples_per_shard=8, num_frames=4)
SIZES = {"vqa": (20, 8), "nlvr": (12, 8), "tvqa": (8, 4)}  # train, val


@pytest.fixture(scope="module")
def pixel_root(tmp_path_factory, shapes_root):
    root = tmp_path_factory.mktemp("pixels")
    for task, (n_train, n_val) in SIZES.items():
        write_task_split(root, task, "train", n_train, SPEC)
        write_task_split(root, task, "val", n_val, SPEC)
    shutil.copytree(shapes_root / "tokenizer", root / "tokenizer")
    return root


def extract(pixel_root, out, *extra) -> dict:
    argv = [
        "--shards",
        pixel_root,
        "--tasks",
        "vqa,nlvr,tvqa",
        "--out",
        out,
        "--vision",
        "vlds-tiny-rn",
        "--vision-pretrained",
        "",
        "--grid-pool",
        3,
        "--batch-size",
        16,
        "--workers",
        0,
        "--quiet",
        *extra,
    ]
    return extract_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def feats32(pixel_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("feats32")
    extract(pixel_root, out, "--dtype", "float32")
    return out


def members(path) -> dict[str, dict[str, bytes]]:
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_feature_shards_keep_the_layout(pixel_root, feats32):
    shapes = {"vqa": (9, 256), "nlvr": (18, 256), "tvqa": (4, 64)}  # 3x3 grid, 2 images, T=4
    for task, shape in shapes.items():
        for split in ("train", "val"):
            src = json.loads((pixel_root / task / f"{split}.index.json").read_text())
            dst = json.loads((feats32 / task / f"{split}.index.json").read_text())
            assert dst["shards"] == src["shards"] and dst["total"] == src["total"]
            assert dst["features"]["dim"] == shape[1] and dst["features"]["seed"] == 0
            assert dst["features"]["kind"] == ("frames" if task == "tvqa" else "grid")
            for s in src["shards"]:
                a, b = members(pixel_root / task / s["url"]), members(feats32 / task / s["url"])
                assert list(a) == list(b)  # same keys, same order
                for key in a:
                    assert b[key]["json"] == a[key]["json"] and set(b[key]) == {"json", "feats.npy"}
                    arr = np.load(io.BytesIO(b[key]["feats.npy"]))
                    assert arr.shape == shape and arr.dtype == np.float32
    assert (feats32 / "tokenizer" / "spiece.model").is_file()


def batches(root, task, tok, n=3):
    stream = TrainStream(
        {task: load_index(root, task, "train")},
        {task: 4},
        Preprocess(96),
        Collator(tok, [task], 96, 20, 8),
        rank=0,
        world=1,
        seed=0,
        epoch=0,
        shuffle_buffer=8,
    )
    return list(stream)[:n]


@pytest.mark.parametrize("task", ["vqa", "nlvr", "tvqa"])
def test_pixels_and_features_give_the_same_loss(pixel_root, feats32, tmp_path, task):
    tasks = "tvqa,how2qa,tvc,yc2c" if task == "tvqa" else "vqa,gqa,nlvr,caption"
    # seed 0: the same random tower as extract --seed 0 (both seed right before building it)
    cfg, tok, tower, model = tiny(**{"data.tasks": tasks})
    model.eval()
    for pix, fea in zip(batches(pixel_root, task, tok), batches(feats32, task, tok), strict=True):
        assert pix["ids"] == fea["ids"] and "vis_feats" in fea
        a, b = tower.visual_inputs(pix, 8), tower.visual_inputs(fea, 8)
        # (float32 rounding of batched vs per-chunk convolutions: ~1e-5 on features of ~10)
        for k in ("vis_feats", "vis_boxes", "vis_order", "vis_mask"):
            assert a[k].shape == b[k].shape, k
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-4), k
        with torch.no_grad():
            assert torch.allclose(model(a), model(b), rtol=1e-5, atol=1e-6)


def test_float16_storage_is_within_its_rounding(pixel_root, tmp_path):
    """fp16 keeps 11 significant bits (relative error <= 2^-11 ~ 5e-4 per feature); through
    Linear + RMSNorm the loss moves by about that much, so 5e-3 relative is a 10x margin."""
    out = tmp_path / "f16"
    extract(pixel_root, out, "--dtype", "float16")
    cfg, tok, tower, model = tiny()
    model.eval()
    for pix, fea in zip(batches(pixel_root, "vqa", tok), batches(out, "vqa", tok), strict=True):
        assert fea["vis_feats"].dtype == torch.float16
        with torch.no_grad():
            a, b = model(tower.visual_inputs(pix, 8)), model(tower.visual_inputs(fea, 8))
        assert abs(a - b) <= 5e-3 * abs(a), (a, b)


def test_rerun_skips_finished_shards_and_refuses_another_tower(pixel_root, feats32, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in feats32.rglob("*.tar")}
    again = extract(pixel_root, feats32, "--dtype", "float32")
    assert all(r["resumed_shards"] == r["shards"] for r in again.values())
    assert {p: p.stat().st_mtime_ns for p in feats32.rglob("*.tar")} == stamps
    with pytest.raises(SystemExit) as e:
        extract(pixel_root, feats32, "--dtype", "float32", "--grid-pool", 2)
    assert e.value.code == 2 and "features.grid_pool: 3 -> 2" in capsys.readouterr().err


def test_config_checks_feature_shards(pixel_root, feats32):
    def check(root, **overrides):
        # the fixture's features come from the random tower (--vision-pretrained "")
        base = {"data.root": str(root), "data.tasks": "vqa,nlvr", "model.vision_pretrained": ""}
        cfg = build_config("tiny", {**base, **overrides})
        check_features(cfg, {t: load_index(root, t, "train") for t in ("vqa", "nlvr")})

    check(feats32)  # auto: the tower matches
    check(feats32, **{"data.features": "true"})
    check(pixel_root, **{"data.features": "false"})
    with pytest.raises(DataError, match="data.features=true but .* pixel shards"):
        check(pixel_root, **{"data.features": "true"})
    with pytest.raises(DataError, match="data.features=false but .* feature shards"):
        check(feats32, **{"data.features": "false"})
    with pytest.raises(DataError, match="--model.vision=vlds-tiny-rn"):
        check(feats32, **{"model.vision": "vlds-tiny-vit"})
    with pytest.raises(DataError, match="grid_pool=3 .config: 6"):
        check(feats32, **{"model.grid_pool": "6"})
    check(pixel_root, **{"model.vision_train": "adapter"})  # a tower that trains reads pixels
    with pytest.raises(DataError, match="vision_train=adapter trains the CLIP tower, which needs"):
        check(feats32, **{"model.vision_train": "adapter"})


def test_training_on_extracted_features(feats32, tmp_path):
    run = tmp_path / "run"
    args = [
        f"--data.root={feats32}",
        f"--train.out_dir={run}",
        "--data.tasks=vqa,nlvr",
        "--data.features=true",
        "--model.vision_pretrained=",  # the random tower the fixture's features come from
        "--model.lm=random",  # no pretraining of the embedded model in this folder
        "--data.batch_size=4",
        "--data.num_workers=1",
        "--train.max_steps=2",
        "--eval.max_samples=4",
        "--eval.batch_size=4",
        "--train.log_every=1",
    ]
    train_run(args, timeout=300)
    result = json.loads((run / "metrics.json").read_text())
    assert result["step"] == 2 and result["metrics"]["vqa"]["n"] == 4
