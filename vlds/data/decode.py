"""Decoding: a raw shard sample -> tensors (Preprocess), and one task's samples -> a padded
batch (Collator). Runs in the DataLoader workers during training and evaluation.

Pixels are resized to the tower's input and leave the workers as uint8, a quarter of float32's
shared memory; the tower normalises them on its device (vlds.model.vision.normalise_pixels).
Cached CLIP features (written by python -m vlds.data.prep.extract) are passed on as stored and
laid out as visual tokens by vlds.model.vision, exactly as the tower's own outputs would be.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random

import numpy as np
import torch

from vlds.config import ConfigError, config_check
from vlds.data.shardio import DataError, load_npy
from vlds.data.tasks import CHOICE_TARGETS, CHOICE_TASKS, choice_text, get_task, labelled
from vlds.model.vision import frame_tokens, image_tokens

FEATURE_MODES = ("auto", "true", "false")
RESIZE_MODES = ("squash", "crop")
VQA_TARGETS = ("soft", "majority")
CAPTION_LOSSES = ("token", "sample")


@config_check
def check_feature_mode(cfg) -> None:
    if cfg.data.features not in FEATURE_MODES:
        raise ConfigError(f"data.features={cfg.data.features!r}; valid: {', '.join(FEATURE_MODES)}")


@config_check
def check_decoding(cfg) -> None:
    """data.image_resize, data.vqa_target, data.choice_target, train.caption_loss and the
    token limits."""
    d = cfg.data
    for key, value, valid in (
        ("data.image_resize", d.image_resize, RESIZE_MODES),
        ("data.vqa_target", d.vqa_target, VQA_TARGETS),
        ("data.choice_target", d.choice_target, CHOICE_TARGETS),
        ("train.caption_loss", cfg.train.caption_loss, CAPTION_LOSSES),
    ):
        if value not in valid:
            raise ConfigError(
                f"{key}={value!r}; valid: {', '.join(valid)} (e.g. --{key}={valid[0]})"
            )
    for key, value in (
        ("data.max_text_len", d.max_text_len),
        ("data.max_target_len", d.max_target_len),
    ):
        if value < 0:
            raise ConfigError(
                f"{key}={value} must be >= 0: 0 = each task's reference length, N > 0 = N tokens "
                f"for every task (e.g. --{key}=0)"
            )


_CHECK_RNG = random.Random(0)  # targets drawn only to validate the record


def check_record(rec: dict) -> None:
    """The record has what its task's prompt, target and metric read (else DataError)."""
    try:
        task = get_task(rec["task"])
        str(rec["id"])
        task.encoder_text(rec)
        if labelled(rec):  # an unlabelled test record is only predicted
            task.target(rec, _CHECK_RNG)
            task.references(rec)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        name = rec.get("id", "?")
        raise DataError(f"record {name!r} is missing or has a bad field: {e!r}") from None


class Preprocess:
    """Raw shard sample -> {task, id, rec, visual}: pixels resized to image_size x image_size,
    uint8 (3, S, S) per image, (T, 3, S, S) for frames (normalised by the tower), or the
    cached feature array as stored (`features`: "auto" uses feats.npy when a sample has it,
    "true" requires it, "false" reads pixels only).

    `resize`: "squash" resizes the whole image to image_size x image_size, ignoring its aspect
    ratio (the reference: torchvision Resize((224, 224)), bicubic); "crop" resizes the shorter
    side to image_size and keeps the centre square (CLIP's own preprocessing). Both bicubic.
    JPEGs are decoded in PIL's draft mode when `draft`: the decoder scales by 1/2, 1/4 or 1/8
    in the DCT (the largest factor that keeps both sides >= image_size), about 2-3x faster
    than a full decode, before the same bicubic resize; `draft=False` decodes fully."""

    def __init__(
        self,
        image_size: int,
        *,
        features: str = "auto",
        draft: bool = True,
        resize: str = "squash",
    ):
        if features not in FEATURE_MODES:
            raise DataError(f"data.features={features!r}; valid: {', '.join(FEATURE_MODES)}")
        if resize not in RESIZE_MODES:
            raise DataError(f"data.image_resize={resize!r}; valid: {', '.join(RESIZE_MODES)}")
        self.size, self.features, self.draft, self.resize = image_size, features, draft, resize

    def image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        s = self.size
        if self.draft and img.format == "JPEG":
            img.draft("RGB", (s, s))
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        if (w, h) != (s, s) and self.resize == "squash":
            img = img.resize((s, s), Image.BICUBIC)  # both sides -> s, the aspect ratio lost
        elif (w, h) != (s, s):
            # shorter side -> s (bicubic), centre crop: only the kept region is resampled
            scale = s / min(w, h)
            rw, rh = max(s, round(w * scale)), max(s, round(h * scale))
            left, top = (rw - s) // 2, (rh - s) // 2
            box = (left * w / rw, top * h / rh, (left + s) * w / rw, (top + s) * h / rh)
            img = img.resize((s, s), Image.BICUBIC, box=box)
        # (S, S, 3) -> (3, S, S) uint8; contiguous, so the batch's stack copies whole rows
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

    def frames(self, data: bytes, gzipped: bool = False) -> torch.Tensor:
        if gzipped:
            data = gzip.decompress(data)
        arr = load_npy(data)  # (T, H, W, 3) uint8
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise DataError(f"frames.npy is {arr.dtype} {arr.shape}, expected (T, H, W, 3) uint8")
        x = torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())  # (T, 3, H, W) uint8, writable
        if x.shape[-2:] != (self.size, self.size):
            # Frames are normally written at the tower's size; others are resized here
            # (bicubic) and rounded back to uint8 levels.
            x = torch.nn.functional.interpolate(
                x.float(), size=(self.size, self.size), mode="bicubic", align_corners=False
            )
            return x.clamp_(0, 255).round_().to(torch.uint8)  # (T, 3, S, S)
        return x  # (T, 3, S, S)

    def feats(self, data: bytes, kind: str) -> np.ndarray:
        arr = load_npy(data)  # (n_img * n_tok, C) for images, (T, D) for video
        if arr.ndim != 2 or arr.shape[0] == 0 or (kind == "pair" and arr.shape[0] % 2):
            raise DataError(f"feats.npy has shape {arr.shape}, not (tokens, dim) for a {kind}")
        return arr

    def __call__(self, sample: dict) -> dict:
        rec = json.loads(sample["json"])
        check_record(rec)
        task = get_task(rec["task"])
        use_feats = self.features == "true" or (self.features == "auto" and "feats.npy" in sample)
        if use_feats:
            if "feats.npy" not in sample:
                raise DataError(
                    f"{sample.get('__url__')}: sample {sample['__key__']} has no feats.npy "
                    f"(data.features=true needs shards written by python -m vlds.data.prep.extract)"
                )
            visual = self.feats(sample["feats.npy"], task.kind)
        elif task.kind == "image":
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            if data is None:
                raise DataError(f"sample {sample['__key__']} has no jpg/png")
            visual = self.image(data).unsqueeze(0)  # (1, 3, S, S)
        elif task.kind == "pair":
            imgs = [sample.get(f"img{i}.jpg") or sample.get(f"img{i}.png") for i in (0, 1)]
            if None in imgs:
                raise DataError(f"sample {sample['__key__']} lacks img0/img1")
            visual = torch.stack([self.image(b) for b in imgs])  # (2, 3, S, S)
        else:
            gz = "frames.npy.gz" in sample
            if not gz and "frames.npy" not in sample:
                raise DataError(f"sample {sample['__key__']} has no frames.npy")
            visual = self.frames(sample["frames.npy.gz" if gz else "frames.npy"], gz)
        return {
            "task": task.name,
            "id": str(rec["id"]),
            "rec": rec,
            "visual": visual,
            "feats": use_feats,
            "key": sample["__key__"],
            # the caption this copy of a record trains on (data.caption_samples=sentence)
            "sentence": sample.get("__sentence__"),
        }


# Record fields the metrics and the submission formats need besides "id" (VQA breakdowns, NLVR2
# consistency groups, official ids); eval batches carry them as "meta", one dict per sample.
META_FIELDS = ("answer_type", "question_type", "identifier", "image_id", "qid", "vid_name")


def stack(items: list) -> torch.Tensor:
    """Stack same-shaped arrays or tensors into one tensor. In a DataLoader worker the result
    is allocated in shared memory, as torch's default_collate does, so handing the batch to
    the main process does not copy it again (a 64-sample RN101 feature batch is 9 MB)."""
    first = items[0]
    dtype = first.dtype if torch.is_tensor(first) else torch.from_numpy(first[:0].copy()).dtype
    shape = (len(items), *first.shape)
    if torch.utils.data.get_worker_info() is not None:
        proto = torch.empty(0, dtype=dtype)
        out = proto.new(proto._typed_storage()._new_shared(math.prod(shape))).resize_(shape)
    else:
        out = torch.empty(shape, dtype=dtype)
    if torch.is_tensor(first):
        return torch.stack(items, out=out)
    np.stack(items, out=out.numpy())
    return out


class _LazyRandom:
    """random.Random(seed) created on first use: most targets never draw (string seeding
    costs ~10 us a sample), captions draw exactly what Random(seed) would."""

    def __init__(self, seed: str):
        self._seed, self._rng = seed, None

    def __getattr__(self, name):  # only for what the instance lacks: the Random's methods
        if name.startswith("_"):
            raise AttributeError(name)
        if self._rng is None:
            self._rng = random.Random(self._seed)
        return getattr(self._rng, name)


def feature_inputs(feats: list[np.ndarray], kind: str, max_frames: int) -> dict:
    """Cached features of one task's samples -> the same visual inputs VisionTower.visual_inputs
    computes from pixels (it passes them through), laid out by vlds.model.vision."""
    if kind == "video":
        return frame_tokens([torch.from_numpy(f.astype(np.float32)) for f in feats], max_frames)
    if len({f.shape for f in feats}) != 1:
        raise DataError(f"feature shapes differ within a batch: {sorted({f.shape for f in feats})}")
    try:  # (B, n_img * t, C), as stored (float16 / 32)
        return image_tokens(stack(feats), 2 if kind == "pair" else 1)
    except ValueError as e:
        raise DataError(f"cached features: {e}") from None


class Collator:
    """Decoded samples of one task -> a padded batch of tensors. `prompts`: the encoder texts
    start with the task prompt (vlds.data.tasks.uses_task_prompts).

    Token limits: `max_text_len` / `max_target_len` > 0 hold for every task, 0 = each task's
    reference length (Task.max_text_len / max_target_len; None there = untruncated). The batch
    carries "loss_weight" (B,) (with vqa_target="soft" a VQA sample's drawn answer's soft
    score, else 1.0) and "loss_reduction": "token" for a task the reference averages over
    tokens (Task.token_mean_loss) when caption_loss="token", else "sample"; VLModel.forward
    applies both."""

    def __init__(
        self,
        tokenizer,
        tasks: list[str],
        max_text_len: int,
        max_target_len: int,
        max_frames=64,
        prompts: bool = True,
        *,
        vqa_target: str = "soft",
        caption_loss: str = "token",
        choice_target: str = "tag",
    ):
        if vqa_target not in VQA_TARGETS:
            raise DataError(f"data.vqa_target={vqa_target!r}; valid: {', '.join(VQA_TARGETS)}")
        if choice_target not in CHOICE_TARGETS:
            raise DataError(
                f"data.choice_target={choice_target!r}; valid: {', '.join(CHOICE_TARGETS)}"
            )
        if caption_loss not in CAPTION_LOSSES:
            raise DataError(
                f"train.caption_loss={caption_loss!r}; valid: {', '.join(CAPTION_LOSSES)}"
            )
        self.tok, self.prompts = tokenizer, prompts
        self.task_ids = {t: i for i, t in enumerate(tasks)}
        self.max_text, self.max_target = max_text_len, max_target_len
        self.max_frames = max_frames
        self.vqa_target, self.caption_loss = vqa_target, caption_loss
        self.choice_target = choice_target
        # train.stage=pretrain: training batches of image captions take the pretraining
        # objectives (vlds.pretrain); set on the training stream's copy by DataBuilder
        self.pretrain = False

    def _target(self, task, sample: dict, epoch: int) -> tuple[str, float]:
        """(training target, loss weight) of one labelled sample at this epoch's visit."""
        rng = _LazyRandom(f"{sample['key']}-{epoch}")
        if self.vqa_target == "soft" and task.soft_target is not None:
            return task.soft_target(sample["rec"], rng)
        if self.choice_target == "text" and task.name in CHOICE_TASKS:
            return choice_text(sample["rec"]), 1.0
        return task.train_target(sample["rec"], rng, sample.get("sentence")), 1.0

    def _pretrain_pairs(self, samples, texts, drawn, epoch):
        """Each caption visit's pretraining pair (vlds.pretrain.caption_objective), drawn
        from the sample and the epoch (a resumed run draws the same)."""
        from vlds.pretrain import caption_objective, sentinel

        pairs = [
            caption_objective(
                target,
                random.Random(f"pretrain-{s['key']}-{epoch}"),
                text,
                lambda k: sentinel(self.tok, k),
            )
            for s, text, (target, _) in zip(samples, texts, drawn, strict=True)
        ]
        return [a for a, _ in pairs], [(b, w) for (_, b), (_, w) in zip(pairs, drawn, strict=True)]

    def _tokenize(self, texts: list[str], limit: int, task_limit: int | None):
        n = limit if limit > 0 else task_limit  # None: untruncated, as the reference
        return self.tok(
            texts, max_length=n, truncation=n is not None, padding=True, return_tensors="pt"
        )

    def __call__(self, samples: list[dict], epoch: int = 0) -> dict:
        task = get_task(samples[0]["task"])
        texts = [task.encoder_text(s["rec"], self.prompts) for s in samples]
        # A per-sentence caption sample trains on its sentence; one per image draws its
        # reference per (sample, epoch): reproducible on resume. Unlabelled test records
        # (predicted only: DataBuilder never trains on them) have none.
        # A VQA sample with data.vqa_target=soft draws its answer and loss weight the same way.
        drawn = [self._target(task, s, epoch) if labelled(s["rec"]) else ("", 1.0) for s in samples]
        if self.pretrain and task.generative_caption and task.kind == "image":
            texts, drawn = self._pretrain_pairs(samples, texts, drawn, epoch)
        targets = [t for t, _ in drawn]
        enc = self._tokenize(texts, self.max_text, task.max_text_len)
        lab = self._tokenize(targets, self.max_target, task.max_target_len)
        token_mean = self.caption_loss == "token" and task.token_mean_loss
        labels = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
        if all(s.get("feats") for s in samples):
            visual = feature_inputs([s["visual"] for s in samples], task.kind, self.max_frames)
        elif any(s.get("feats") for s in samples):
            raise DataError(f"a {task.name} batch mixes cached features and pixels")
        else:  # uint8 images (B, n_img, 3, S, S) | frames (B, T, 3, S, S)
            key = "frames" if task.kind == "video" else "images"
            visual = {key: stack([s["visual"] for s in samples])}
        return {
            "task": task.name,
            "task_ids": torch.full((len(samples),), self.task_ids[task.name], dtype=torch.long),
            "task_id": self.task_ids[task.name],  # the batch's one task, known on the host
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "labels": labels,
            "loss_weight": torch.tensor([w for _, w in drawn], dtype=torch.float32),  # (B,)
            "loss_reduction": "token" if token_mean else "sample",
            **visual,
            "ids": [s["id"] for s in samples],
            "refs": [task.references(s["rec"]) if labelled(s["rec"]) else [] for s in samples],
            "meta": [{k: s["rec"][k] for k in META_FIELDS if k in s["rec"]} for s in samples],
            # a multiple-choice sample's choices: data.choice_target=text maps generated words
            # back to a tag (vlds.data.tasks.tag_of_text)
            "choices": [s["rec"].get("choices") for s in samples],
        }
