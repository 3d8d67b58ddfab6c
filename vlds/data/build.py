"""From a Config to data loaders: the data root, train loaders per epoch, eval loaders."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from vlds.data.stream import (
    Collator,
    DataError,
    EvalStream,
    Preprocess,
    TrainStream,
    load_index,
    reader_split_notes,
    task_batch_sizes,
)
from vlds.data.tasks import majority_answer
from vlds.model.vision import CLIP_MEAN, CLIP_STD

log = logging.getLogger("vlds")


def data_root(cfg, is_main: bool) -> Path:
    """`data.root`, or the embedded shapes world (generated once, by rank 0, into the cache)."""
    import torch.distributed as dist

    if cfg.data.root:
        return Path(cfg.data.root)
    from vlds.data.synthetic import ensure_synthetic

    if is_main:
        root = ensure_synthetic()
    if dist.is_initialized():
        dist.barrier()  # the other ranks find the finished folder
    if not is_main:
        root = ensure_synthetic()
    return root


def check_features(cfg, indexes: dict) -> None:
    """Feature shards must come from the tower the config names (their width is the model's
    input width); data.features=true needs feature shards, false needs pixel shards."""
    m, mode = cfg.model, cfg.data.features
    for idx in indexes.values():
        where = f"{cfg.data.root}/{idx.task}/{idx.split}.index.json"
        feats = idx.features
        if feats is None:
            if mode == "true":
                raise DataError(
                    f"data.features=true but {where} describes pixel shards; write feature "
                    f"shards with python -m vlds.data.extract --shards {cfg.data.root} --tasks "
                    f"{idx.task} --out DIR, or set --data.features=auto"
                )
            continue
        if mode == "false":
            raise DataError(
                f"data.features=false but {where} describes feature shards (no pixels); point "
                f"data.root at the pixel shards or set --data.features=auto"
            )
        want = {"vision": m.vision, "pretrained": m.vision_pretrained}
        if feats.get("kind") == "grid" and feats.get("resnet", True):
            want["grid_pool"] = m.grid_pool
        diffs = [f"{k}={feats.get(k)!r} (config: {v!r})" for k, v in want.items()
                 if feats.get(k) != v]  # fmt: skip
        if diffs:
            fix = " ".join(f"--model.{'vision_' if k == 'pretrained' else ''}{k}={feats.get(k)}"
                           for k in want if feats.get(k) != want[k])  # fmt: skip
            raise DataError(
                f"{where}: features were extracted with {', '.join(diffs)}; train with {fix}, "
                f"or re-extract with the configured tower"
            )


class _Loader:
    """A DataLoader whose DataError from a worker process reaches the user as its own message
    (torch re-raises it wrapped in the worker's traceback)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as e:
                msg = str(e)
                if "Original Traceback" in msg and "DataError: " in msg:
                    msg = msg.rsplit("DataError: ", 1)[1].strip()
                raise DataError(msg) from None
            yield batch


def preprocess_and_collate(cfg, tokenizer, image_size: int) -> tuple[Preprocess, Collator]:
    """Sample decoding and batching exactly as training does them (also used by the evaluator,
    so the two score the same inputs)."""
    d = cfg.data
    preprocess = Preprocess(
        image_size, CLIP_MEAN, CLIP_STD, features=d.features, draft=d.jpeg_draft
    )
    collate = Collator(tokenizer, cfg.task_list, d.max_text_len, d.max_target_len,
                       max_frames=cfg.model.max_frames)  # fmt: skip
    return preprocess, collate


class DataBuilder:
    def __init__(self, cfg, root: Path, tokenizer, image_size: int, info):
        self.cfg, self.root, self.info = cfg, Path(root), info
        tasks = cfg.task_list
        d = cfg.data
        self.train_idx = {t: load_index(root, t, d.train_split) for t in tasks}
        self.val_idx = {t: load_index(root, t, d.val_split) for t in tasks}
        check_features(cfg, {**self.train_idx, **{f"val/{t}": i for t, i in self.val_idx.items()}})
        self.sizes = task_batch_sizes(tasks, d.batch_size, d.task_batch_scale)
        self.preprocess, self.collate = preprocess_and_collate(cfg, tokenizer, image_size)
        if info.is_main:  # once per run, not once per worker
            for note in reader_split_notes(self.train_idx, info.world_size, d.num_workers):
                log.info(note)

    def _stream(self, epoch: int, skip_steps: int = 0) -> TrainStream:
        d = self.cfg.data
        return TrainStream(
            self.train_idx,
            self.sizes,
            self.preprocess,
            self.collate,
            rank=self.info.rank,
            world=self.info.world_size,
            seed=self.cfg.train.seed,
            epoch=epoch,
            shuffle_buffer=d.shuffle_buffer,
            skip_steps=skip_steps,
            split=d.split,
            mixing=d.mixing,
            mixing_weights=d.mixing_weights,
            mixing_temperature=d.mixing_temperature,
            max_bad_fraction=d.max_bad_fraction,
        )

    def steps_per_epoch(self) -> int:
        return len(self._stream(0).schedule)

    def train_loader(self, epoch: int, skip_steps: int = 0):
        nw = self.cfg.data.num_workers
        # An own generator: creating the iterator draws a worker base seed, which must not
        # come from the global RNG (dropout), or a resumed run would draw different masks.
        return _Loader(
            torch.utils.data.DataLoader(
                self._stream(epoch, skip_steps),
                batch_size=None,
                num_workers=nw,
                generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch),
                persistent_workers=False,
                prefetch_factor=4 if nw else None,
            )
        )

    def eval_loaders(self) -> dict:
        cfg = self.cfg
        return {
            t: _Loader(
                torch.utils.data.DataLoader(
                    EvalStream(
                        idx,
                        self.preprocess,
                        self.collate,
                        rank=self.info.rank,
                        world=self.info.world_size,
                        batch_size=cfg.eval.batch_size,
                        max_samples=cfg.eval.max_samples,
                        max_bad_fraction=cfg.data.max_bad_fraction,
                    ),
                    batch_size=None,
                    num_workers=0,
                    generator=torch.Generator(),
                )
            )
            for t, idx in self.val_idx.items()
        }

    def majority_baselines(self) -> dict[str, float]:
        """VQA-style accuracy of always answering the most common training answer (vqa only),
        on the same validation samples the model is scored on."""
        if "vqa" not in self.train_idx:
            return {}
        from vlds.eval.metrics import vqa_accuracy

        common = Counter(majority_answer(r["answers"]) for r in _records(self.train_idx["vqa"]))
        top = common.most_common(1)[0][0]
        val = list(_records(self.val_idx["vqa"], self.cfg.eval.max_samples))
        return {"vqa": vqa_accuracy([top] * len(val), [r["answers"] for r in val])["score"]}


def _records(index, limit: int = 0):
    """The json records of a split, in shard order (no image decoding)."""
    from vlds.data.stream import SkipCounter, _raw_samples

    n = 0
    for path, _ in index.shards:
        for s in _raw_samples(path, SkipCounter()):
            if limit and n >= limit:
                return
            yield json.loads(s["json"])
            n += 1
