"""From a Config to data loaders: the data root, train loaders per epoch, eval loaders.

The one place loaders are built: training (vlds/train.py) and the standalone evaluator
(vlds/evaluate.py, `train=False`) decode and batch the same way, so both score the same inputs.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path

import torch

from vlds.config import global_batch
from vlds.data import remote
from vlds.data.decode import Collator, Preprocess
from vlds.data.mixing import run_batch_sizes
from vlds.data.shardio import DataError, load_index, read_records
from vlds.data.shm import check_shm, sample_bytes, shm_free
from vlds.data.stream import EvalStream, TrainStream, reader_split_notes
from vlds.data.tasks import uses_task_prompts
from vlds.distributed import local_world_size
from vlds.guard import quiet_worker, signals_blocked

log = logging.getLogger("vlds")


def data_root(cfg, is_main: bool) -> Path | str:
    """`data.root` (a folder, or a URL: vlds.data.remote), or the embedded shapes world
    (generated once, by rank 0, into the cache)."""
    import torch.distributed as dist

    if cfg.data.root:
        return remote.location(cfg.data.root)
    from vlds.data.synthetic import ensure_synthetic

    if is_main:
        root = ensure_synthetic()
    if dist.is_initialized():
        dist.barrier()  # the other ranks find the finished folder
    if not is_main:
        root = ensure_synthetic()
    return root


def local_side(cfg, root, local_main: bool) -> Path:
    """The local folder for what a run keeps beside its shards: the shapes world's tokenizer
    (`model.tokenizer=synthetic`) and the embedded language model pretrained for it
    (`model.lm=synthetic`, vlds.model.embedded_lm). The root itself when local; for a URL a
    cache folder (vlds.data.remote.cache_dir), into which each node's local rank 0
    (`local_main`) copies those folders from the root once (a language model the root lacks
    is pretrained there, as for a local root)."""
    import torch.distributed as dist

    from vlds.model.embedded_lm import lm_dir

    if not remote.is_url(root):
        return Path(root)
    local = remote.cache_dir(root)
    tok = remote.join(root, "tokenizer")
    if (
        local_main
        and cfg.model.tokenizer == "synthetic"
        and not remote.fetch_dir(tok, local / "tokenizer")
    ):
        raise DataError(
            f"model.tokenizer=synthetic reads the tokenizer/ folder beside the shards, and "
            f"{remote.redact(root)} has none; copy it there, or pass --model.tokenizer=DIR"
        )
    if local_main and cfg.model.lm == "synthetic":
        rel = lm_dir(cfg, local).relative_to(local).as_posix()
        remote.fetch_dir(remote.join(root, rel), local / rel)
    if dist.is_initialized():
        dist.barrier()
    return local


def check_features(cfg, indexes: dict) -> None:
    """Feature shards must come from the tower the config names (their width is the model's
    input width) and, for images, the resize mode it names (data.image_resize);
    data.features=true needs feature shards, false needs pixel shards."""
    m, mode = cfg.model, cfg.data.features
    for idx in indexes.values():
        where = f"{cfg.data.root}/{idx.task}/{idx.split}.index.json"
        feats = idx.features
        if feats is None:
            if mode == "true":
                raise DataError(
                    f"data.features=true but {where} describes pixel shards; write feature "
                    f"shards with python -m vlds.data.prep.extract --shards {cfg.data.root} "
                    f"--tasks {idx.task} --out DIR, or set --data.features=auto"
                )
            continue
        if mode == "false":
            raise DataError(
                f"data.features=false but {where} describes feature shards (no pixels); point "
                f"data.root at the pixel shards or set --data.features=auto"
            )
        if m.vision_train != "frozen":
            raise DataError(
                f"model.vision_train={m.vision_train} trains the CLIP tower, which needs "
                f"pixels, but {where} describes cached features (computed once by a frozen "
                f"tower); point data.root at the pixel shards, or keep "
                f"--model.vision_train=frozen"
            )
        want = {"vision": m.vision, "pretrained": m.vision_pretrained}
        if feats.get("kind") == "grid" and feats.get("resnet", True):
            want["grid_pool"] = m.grid_pool
        diffs = [
            f"{k}={feats.get(k)!r} (config: {v!r})" for k, v in want.items() if feats.get(k) != v
        ]
        if diffs:
            fix = " ".join(
                f"--model.{'vision_' if k == 'pretrained' else ''}{k}={feats.get(k)}"
                for k in want
                if feats.get(k) != want[k]
            )
            raise DataError(
                f"{where}: features were extracted with {', '.join(diffs)}; train with {fix}, "
                f"or re-extract with the configured tower"
            )
        # Image features saw the images resized one way; an index written before the mode was
        # recorded was cropped. (Video frames are resized when they are written, not here.)
        resized = feats.get("resize", "crop")
        if feats.get("kind") == "grid" and resized != cfg.data.image_resize:
            raise DataError(
                f"{where}: features were extracted from images resized with {resized!r} "
                f"(config: data.image_resize={cfg.data.image_resize!r}); train with "
                f"--data.image_resize={resized}, or re-extract with python -m "
                f"vlds.data.prep.extract --resize {cfg.data.image_resize}"
            )


def _quiet_then(init, worker_id: int) -> None:
    quiet_worker(worker_id)
    init(worker_id)


class _Loader:
    """A DataLoader whose DataError from a worker process reaches the user as its own message
    (torch re-raises it wrapped in the worker's traceback), and whose workers leave the
    preemption signals to the main process (vlds.guard.quiet_worker; blocked while they fork).
    The two go together: a worker forked with the signals blocked and without quiet_worker
    would block its parent's SIGTERM for good, so `_Loader` puts quiet_worker before the
    loader's own worker_init_fn, whatever that is."""

    def __init__(self, loader, stream: TrainStream | None = None):
        self.loader, self.stream = loader, stream
        if loader.worker_init_fn not in (quiet_worker, None):
            loader.worker_init_fn = functools.partial(_quiet_then, loader.worker_init_fn)
        elif loader.worker_init_fn is None:
            loader.worker_init_fn = quiet_worker

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        with signals_blocked():
            it = iter(self.loader)  # starts the worker processes
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
    """Sample decoding and batching as training does them."""
    d = cfg.data
    preprocess = Preprocess(
        image_size,
        features=d.features,
        draft=d.jpeg_draft,
        resize=d.image_resize,
    )
    collate = Collator(
        tokenizer,
        cfg.task_list,
        d.max_text_len,
        d.max_target_len,
        max_frames=cfg.model.max_frames,
        prompts=uses_task_prompts(cfg),
        vqa_target=d.vqa_target,
        caption_loss=cfg.train.caption_loss,
        choice_target=d.choice_target,
    )
    return preprocess, collate


def refuse_unlabelled(indexes) -> None:
    """Training and its validation need labels; a test split written without them fails here,
    before any model is built."""
    for idx in indexes:
        if not idx.labelled:
            raise DataError(
                f"{idx.task}/{idx.split} has no labels (written from unlabelled release files, "
                f"e.g. a test split); train and validate on labelled splits (--data.train_split, "
                f"--data.val_split), and write this split's submission file with python -m "
                f"vlds.evaluate --checkpoint RUN --shards ROOT --split {idx.split}"
            )


class DataBuilder:
    """The loaders of a run. `train=False` (the evaluator) reads only the validation split of
    `eval_tasks` (default: every task); task ids still follow cfg.data.tasks, so per-task
    modules route as in training. On a CUDA `device` the loaders pin their batches (the
    trainer's copy to the device is then asynchronous). At start-up the loaders' shared-memory
    need is logged and checked against /dev/shm (`check_shared_memory`)."""

    def __init__(
        self,
        cfg,
        root: Path | str,
        tokenizer,
        image_size: int,
        info,
        *,
        train=True,
        eval_tasks=None,
        device=None,
    ):
        self.cfg, self.root, self.info = cfg, remote.location(root), info
        self.pin = device is not None and torch.device(device).type == "cuda"
        tasks = cfg.task_list
        d = cfg.data
        self.train_idx = {t: load_index(root, t, d.train_split) for t in tasks} if train else {}
        self.val_idx = {t: load_index(root, t, d.val_split) for t in eval_tasks or tasks}
        if train:  # the evaluator alone may read an unlabelled split: it writes predictions
            refuse_unlabelled([*self.train_idx.values(), *self.val_idx.values()])
        check_features(cfg, {**self.train_idx, **{f"val/{t}": i for t, i in self.val_idx.items()}})
        self.sizes = run_batch_sizes(cfg, info.world_size)  # each task's micro-batch
        self.preprocess, self.collate = preprocess_and_collate(cfg, tokenizer, image_size)
        if info.is_main:  # once per run, not once per worker
            for note in reader_split_notes(self.train_idx, info.world_size, d.num_workers):
                log.info(note)
        self.check_shared_memory()

    def shared_memory_batches(self) -> tuple[dict[str, int], dict[str, int]]:
        """({task: bytes of one training batch}, {task: bytes of one evaluation batch}) as the
        workers hand them over, from one probed sample per task (vlds.data.shm.sample_bytes)."""
        train, evals = {}, {}
        for t in {**self.val_idx, **self.train_idx}:
            one = sample_bytes(
                self.train_idx.get(t) or self.val_idx[t], self.preprocess, self.collate
            )
            if one is None:
                continue
            if t in self.train_idx:
                train[t] = one * self.sizes[t]
            if t in self.val_idx:
                evals[t] = one * min(self.cfg.eval.batch_size, self.val_idx[t].total)
        return train, evals

    def check_shared_memory(self, free=shm_free) -> str | None:
        """Log (rank 0) the loaders' shared-memory need per rank and the free space of
        /dev/shm; DataError with the fix when it cannot hold the need of every rank on this
        node. `free()`: the free bytes (None: no /dev/shm, not checked). Nothing to check
        without worker processes."""
        d = self.cfg.data
        if not d.num_workers:
            return None
        train, evals = self.shared_memory_batches()
        line = check_shm(
            d.num_workers,
            d.prefetch_factor,
            train,
            evals,
            local_world_size(),
            free(),
        )
        if self.info.is_main:
            log.info(line)
        return line

    def _stream(self, epoch: int, skip_steps: int = 0) -> TrainStream:
        d = self.cfg.data
        collate = self.collate
        if self.cfg.train.stage == "pretrain":  # training batches only: evaluation as usual
            collate = copy.copy(collate)
            collate.pretrain = True
        return TrainStream(
            self.train_idx,
            self.sizes,
            self.preprocess,
            collate,
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
            caption_samples=d.caption_samples,
        )

    def batch_plan(self) -> dict:
        """What an epoch trains on: the effective global batch (micro x accumulation x world),
        each task's micro-batch and its share of the epoch's steps. Logged at start-up and
        stored in metrics.json; `python -m vlds.recipe` prints the same for the real releases."""
        train_batch, accum, micro = global_batch(self.cfg, self.info.world_size)
        schedule = self._stream(0).schedule
        steps = {t: schedule.count(t) for t in self.sizes}
        return {
            "global_batch": train_batch,
            "global_batch_asked": self.cfg.train.global_batch_size or train_batch,
            "micro_batch": micro,
            "accumulation": accum,
            "world": self.info.world_size,
            "task_batch": dict(self.sizes),
            "steps_per_epoch": len(schedule),
            "task_steps": steps,
            "task_share_pct": {t: round(100.0 * n / len(schedule), 2) for t, n in steps.items()},
        }

    def train_loader(self, epoch: int, skip_steps: int = 0, resume: dict | None = None):
        """Epoch `epoch` from step `skip_steps`: from the cursors of `resume` (a stream state
        the trainer saved) when they fit, otherwise by replay (vlds.data.stream)."""
        nw = self.cfg.data.num_workers
        stream = self._stream(epoch, skip_steps)
        stream.resume_from(resume, nw)
        # An own generator: creating the iterator draws a worker base seed, which must not
        # come from the global RNG (dropout), or a resumed run would draw different masks.
        return _Loader(
            torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=nw,
                generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch),
                persistent_workers=False,
                prefetch_factor=self.cfg.data.prefetch_factor if nw else None,
                pin_memory=self.pin,
            ),
            stream,
        )

    def eval_loaders(self) -> dict:
        """One loader per validation split, read by `data.num_workers` worker processes (each
        reads its own range of this rank's share)."""
        cfg = self.cfg
        nw = cfg.data.num_workers
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
                    num_workers=nw,
                    generator=torch.Generator(),
                    prefetch_factor=cfg.data.prefetch_factor if nw else None,
                    pin_memory=self.pin,
                )
            )
            for t, idx in self.val_idx.items()
        }

    def baselines(self) -> dict[str, dict[str, float]]:
        """{"text_prior": {task: score}, "majority_baseline": {"vqa": score}} on the validation
        samples the model is scored on (vlds.eval.grounding), from one read of each task's
        training records; computed on rank 0 and sent to the others. Tasks without training
        records here (an evaluation-only builder) are left out; the majority-answer baseline
        (always the most common training answer) is reported for VQA."""
        from vlds.eval.grounding import text_prior_and_majority
        from vlds.eval.loop import from_rank0
        from vlds.eval.metrics import task_metric

        out = {"text_prior": {}, "majority_baseline": {}}
        if self.info.rank == 0:
            for t, val_idx in self.val_idx.items():
                if t in self.train_idx:
                    train = read_records(self.train_idx[t])
                    val = read_records(val_idx, self.cfg.eval.max_samples)
                    metric = task_metric(t, self.cfg.eval.java_metrics)
                    prior, majority = text_prior_and_majority(t, train, val, metric)
                    out["text_prior"][t] = prior
                    if t == "vqa":
                        out["majority_baseline"][t] = majority
        return from_rank0(out)
