"""From a Config to data loaders: the data root, train loaders per epoch, eval loaders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from vlds.data.stream import (
    Collator,
    EvalStream,
    Preprocess,
    TrainStream,
    load_index,
    task_batch_sizes,
)
from vlds.data.tasks import majority_answer
from vlds.model.vision import CLIP_MEAN, CLIP_STD


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


class DataBuilder:
    def __init__(self, cfg, root: Path, tokenizer, image_size: int, info):
        self.cfg, self.root, self.info = cfg, Path(root), info
        tasks = cfg.task_list
        self.train_idx = {t: load_index(root, t, cfg.data.train_split) for t in tasks}
        self.val_idx = {t: load_index(root, t, cfg.data.val_split) for t in tasks}
        self.sizes = task_batch_sizes(tasks, cfg.data.batch_size, cfg.data.task_batch_scale)
        self.preprocess = Preprocess(image_size, CLIP_MEAN, CLIP_STD)
        self.collate = Collator(tokenizer, tasks, cfg.data.max_text_len, cfg.data.max_target_len)

    def _stream(self, epoch: int, skip_steps: int = 0) -> TrainStream:
        return TrainStream(
            self.train_idx,
            self.sizes,
            self.preprocess,
            self.collate,
            rank=self.info.rank,
            world=self.info.world_size,
            seed=self.cfg.train.seed,
            epoch=epoch,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            skip_steps=skip_steps,
            split=self.cfg.data.split,
        )

    def steps_per_epoch(self) -> int:
        return len(self._stream(0).schedule)

    def train_loader(self, epoch: int, skip_steps: int = 0):
        nw = self.cfg.data.num_workers
        # An own generator: creating the iterator draws a worker base seed, which must not
        # come from the global RNG (dropout), or a resumed run would draw different masks.
        return torch.utils.data.DataLoader(
            self._stream(epoch, skip_steps),
            batch_size=None,
            num_workers=nw,
            generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch),
            persistent_workers=False,
            prefetch_factor=4 if nw else None,
        )

    def eval_loaders(self) -> dict:
        cfg = self.cfg
        return {
            t: torch.utils.data.DataLoader(
                EvalStream(
                    idx,
                    self.preprocess,
                    self.collate,
                    rank=self.info.rank,
                    world=self.info.world_size,
                    batch_size=cfg.eval.batch_size,
                    max_samples=cfg.eval.max_samples,
                ),
                batch_size=None,
                num_workers=0,
                generator=torch.Generator(),
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
