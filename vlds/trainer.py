"""The training loop around one DeepSpeed engine: steps, evaluation, checkpoints, resume,
preemption and non-finite guards. Built by vlds/train.py, which owns argument parsing and
construction; this module owns the run's state (step, epoch, position in the epoch).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import closing
from pathlib import Path

import torch
import torch.distributed as dist

from vlds import faults
from vlds.checkpoint import (
    check_compatible,
    check_loaded_keys,
    checkpoint_bytes,
    mark_eval_pending,
    resolve_resume,
    save_adapter,
    save_checkpoint,
    set_rng_state,
    verify_everywhere,
)
from vlds.data.stream import CURSOR
from vlds.eval.grounding import blank_visual
from vlds.guard import Agreed, NonFiniteGuard, Preempted, Preemption, step_sync
from vlds.kernels import report as adapter_kernel_report

log = logging.getLogger("vlds")


def to_device(batch: dict, device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


class RunLog:
    """metrics.jsonl and the experiment trackers of `train.report_to` (vlds/trackers.py) on
    rank 0; nothing elsewhere. The trackers open when training starts (`open`), so that a run
    resumed from a checkpoint continues its tracker runs."""

    def __init__(self, out_dir: Path, enabled: bool, cfg_dict: dict):
        self.enabled, self.out_dir, self.cfg_dict = enabled, out_dir, cfg_dict
        self.path = out_dir / "metrics.jsonl"
        self.trackers = None

    def open(self, resumed: bool) -> None:
        if self.enabled and self.trackers is None:
            from vlds.trackers import open_trackers

            report_to = self.cfg_dict["train"]["report_to"]
            self.trackers = open_trackers(report_to, self.out_dir, self.cfg_dict, resumed)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.open(resumed=False)  # no-op once open
        scalars = {f"{kind}/{k}": v for k, v in values.items() if _is_number(v)}
        for t in self.trackers:
            t.log(scalars, step)

    def final(self, step: int, result: dict) -> None:
        """The finished run's metrics.json, flattened: "final/vqa/score", "final/step_time_s"."""
        if not self.enabled:
            return
        from vlds.trackers import flatten

        self.open(resumed=False)
        lifted = {**{k: v for k, v in result.items() if k != "metrics"}, **result["metrics"]}
        flat = {f"final/{k}": v for k, v in flatten(lifted, "/").items() if _is_number(v)}
        for t in self.trackers:
            t.log_final(flat, step)

    def close(self, status: str = "FINISHED") -> None:
        for t in self.trackers or []:
            t.close(status)
        self.trackers = []  # closed: later writes go to metrics.jsonl only


def eval_line(metrics: dict, priors: dict) -> str:
    """ "vqa 61.2 (shuffled 40.1, text prior 27.5), ..., average 55.0 (shuffled 38.2)"."""
    parts = []
    for t, m in metrics.items():
        if not isinstance(m, dict):
            continue
        extra = [f"shuffled {m['shuffled_score']:.1f}"] if "shuffled_score" in m else []
        extra += [f"text prior {priors[t]:.1f}"] if t in priors else []
        parts.append(f"{t} {m['score']:.1f}" + (f" ({', '.join(extra)})" if extra else ""))
    avg = f"average {metrics['average']:.1f}"
    if "shuffled_average" in metrics:
        avg += f" (shuffled {metrics['shuffled_average']:.1f})"
    if metrics.get("loss") is not None:
        avg += f", validation loss {metrics['loss']:.4f}"
    return ", ".join(parts + [avg])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def find_resume(cfg, world_size: int, is_main: bool) -> tuple[Path, str] | None:
    """The checkpoint `train.resume` names, checked for compatibility and safety before the
    run touches its folder (a refused resume leaves everything on disk as it was). Every rank
    calls it: each verifies its own files (verify_everywhere)."""
    out_dir = Path(cfg.train.out_dir)
    found = resolve_resume(cfg.train.resume, out_dir)
    if found is None:
        if cfg.train.resume == "latest" and is_main:
            log.info(
                "train.resume=latest: no checkpoint in %s yet, starting fresh",
                out_dir / "checkpoints",
            )
        return None
    root, tag = found
    state = json.loads((root / tag / "trainer_state.json").read_text())
    changed = check_compatible(state, cfg, world_size)
    if changed and is_main:
        log.info("resuming with changed settings: %s", "; ".join(changed))
    verify_everywhere(root / tag)
    return found


class Trainer:
    def __init__(
        self,
        cfg,
        engine,
        tower,
        data,
        tokenizer,
        info,
        device,
        total_steps,
        zero3=False,
        on_eval=None,
        preemption=None,
    ):
        self.cfg, self.engine, self.tower, self.data = cfg, engine, tower, data
        self.tokenizer, self.info, self.device = tokenizer, info, device
        self.total_steps, self.zero3, self.on_eval = total_steps, zero3, on_eval
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.cfg_dict = cfg.to_dict()
        self.step = self.epoch = self.step_in_epoch = 0
        self.runlog = RunLog(self.out_dir, info.is_main, self.cfg_dict)
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps)
        # train.py installs the handlers before building anything (a signal during set-up is
        # acted on at the first step); the tests and benchmarks that build a Trainer get theirs
        signals = Preemption.SIGNALS if cfg.train.handle_signals else ()
        self.preemption = preemption or Preemption(signals)
        self._saved_at = -1
        self._saved_time = time.monotonic()  # train.save_every_minutes counts from here
        self._evaluated = None  # (step, metrics, predictions)
        self._eval_cut = False  # a preemption stopped this step's evaluation
        self._eval_pending = False  # resumed from such a step: evaluate it first
        self._saved_tag = None  # the checkpoint folder of step _saved_at
        self._notified = -1  # the step on_eval last heard about
        self._baselines = None  # DataBuilder.baselines(), computed at the first evaluation
        self.step_times: list[float] = []  # wall seconds of each train_step (no data wait)
        # The training stream's cursors (vlds.data.stream): the last consumed batch's of each
        # worker this epoch, saved per rank with the checkpoint; loaded ones resume the stream.
        self._cursors: dict[int, dict] = {}
        self._fingerprint = None
        self._resume_stream = None

    # ---- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.info.world_size,
            "zero_stage": self.engine.zero_optimization_stage(),
            "bad_steps_total": self.guard.total,
            "eval_pending": self._eval_cut,
            "config": self.cfg_dict,
        }

    def stream_state(self) -> dict:
        """This rank's stream position: where each data worker's next batch starts."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "fingerprint": self._fingerprint,
            "cursors": list(self._cursors.values()) if self.step_in_epoch else [],
        }

    def checkpoint(self, poll: bool = True) -> None:
        """Save this step (once); then poll the preemption flag: a signal that arrived during
        the save stops the run now, its checkpoint already written."""
        if self._saved_at == self.step:
            return
        tag = f"step{self.step}"
        self._saved_at, self._saved_tag = self.step, tag
        path = save_checkpoint(
            self.engine,
            self.ckpt_dir,
            tag,
            self.state(),
            self.cfg_dict,
            self.info.is_main,
            self.cfg.train.keep_last,
            rank_state={"stream": self.stream_state()},
        )
        if self.info.is_main:
            n = sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)
            size = checkpoint_bytes(path)
            self.runlog.write(
                self.step,
                "checkpoint",
                {"bytes": size, "trainable_params": n, "bytes_per_param": size / max(1, n)},
            )
        self._saved_time = time.monotonic()
        if poll:
            self.preemption.poll(self.device)

    def load(self, found: tuple[Path, str] | None) -> None:
        """Continue from a checkpoint found (and checked) by `find_resume`."""
        if found is None:
            return
        root, tag = found
        engine, load_module = self.engine, self.engine.load_module_state_dict

        def checked_load(checkpoint, *args, **kwargs):  # the saved keys = the trainable set
            check_loaded_keys(list(checkpoint["module"]), engine.module, root / tag)
            return load_module(checkpoint, *args, **kwargs)

        engine.load_module_state_dict = checked_load
        try:  # not strict: the frozen weights are (rightly) absent; checked_load checks the rest
            _, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
        finally:
            del engine.load_module_state_dict  # back to the class's method
        self.step, self.epoch = client["step"], client["epoch"]
        self.step_in_epoch = client["step_in_epoch"]
        if root.resolve() == self.ckpt_dir.resolve():
            self._saved_at, self._saved_tag = self.step, tag  # this step's checkpoint: loaded
        state = json.loads((root / tag / "trainer_state.json").read_text())
        self._eval_pending = state.get("eval_pending", False)
        self.guard.total = client.get("bad_steps_total", 0)
        rng_file = root / tag / f"rng_rank{self.info.rank}.pt"
        if rng_file.is_file():
            rank_state = torch.load(rng_file, weights_only=True)
            set_rng_state(rank_state)
            self._resume_stream = rank_state.get("stream")
        if self.info.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d, step %d of it)",
                root / tag,
                self.step,
                self.epoch,
                self.step_in_epoch,
            )

    # ---- evaluation -----------------------------------------------------------------------
    def run_eval(self):
        from vlds.eval.loop import evaluate_tasks

        if self._evaluated is not None and self._evaluated[0] == self.step:
            return self._evaluated[1], self._evaluated[2]
        try:
            metrics, preds = evaluate_tasks(
                self.engine.module,
                self.tower,
                self.data.eval_loaders(),
                self.tokenizer,
                self.cfg,
                self.device,
                self.zero3,
                preemption=self.preemption,
            )
        except Preempted:
            self._eval_cut = True  # the resumed run evaluates this step first
            raise
        priors = self.baselines()["text_prior"]
        row = {}
        for t, m in metrics.items():
            if not isinstance(m, dict):  # average, shuffled_average
                row[t] = m
                continue
            row[f"{t}/score"] = m["score"]
            if "loss" in m:
                row[f"{t}/loss"] = m["loss"]
            if "shuffled_score" in m:
                row[f"{t}/shuffled"] = m["shuffled_score"]
            if t in priors:
                row[f"{t}/text_prior"] = priors[t]
        self.runlog.write(self.step, "eval", row)
        if self.info.is_main:
            log.info("step %d eval: %s", self.step, eval_line(metrics, priors))
        self._evaluated = (self.step, metrics, preds)
        return metrics, preds

    def notify(self) -> None:
        """on_eval(step, metrics, cfg) with this step's evaluation, once per step, called after
        the step's checkpoint (if one is due) is written: a search that pauses or stops a trial
        on what it reports finds the trial's checkpoint at that step (vlds.tune)."""
        if self.on_eval is None or self._evaluated is None or self._evaluated[0] != self.step:
            return
        if self._notified != self.step:
            self._notified = self.step
            self.on_eval(self.step, self._evaluated[1], self.cfg)

    def baselines(self) -> dict[str, dict[str, float]]:
        """The text prior per task and VQA's majority-answer baseline on the validation samples
        the model is scored on, computed once (DataBuilder.baselines)."""
        if self._baselines is None:
            self._baselines = self.data.baselines()
        return self._baselines

    # ---- steps ----------------------------------------------------------------------------
    def train_step(self, batch: dict) -> Agreed:
        """One micro-step and its bookkeeping: one all-reduce and one host read (vlds.guard.
        step_sync) tell every rank the mean loss, whether any rank's loss is not finite (then
        no backward and no optimizer step anywhere), and whether any rank was signalled or
        rank 0's clock asks for a checkpoint. `applied` is False when the step was skipped."""
        engine = self.engine
        faults.set_step(self.step + 1)
        faults.maybe_kill("step")
        faults.hold(lambda: self.preemption.local)
        b = self.tower.visual_inputs(to_device(batch, self.device), self.cfg.model.max_frames)
        if self.cfg.data.blind:
            b = blank_visual(b)
        loss = faults.corrupt_loss(engine(b))
        agreed = step_sync(loss, self.preemption.local, self._time_to_save(), self.device)
        if not agreed.finite:
            # no backward, no optimizer step: the weights and Adam moments stay as they were
            self.guard.record(False, self.step + 1, "non-finite loss")
            agreed.applied = False
            return agreed
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        agreed.applied = not boundary or engine.was_step_applied()
        self.guard.record(agreed.applied, self.step + 1, "non-finite gradient, update discarded")
        return agreed

    def _time_to_save(self) -> bool:
        minutes = self.cfg.train.save_every_minutes
        return bool(minutes) and time.monotonic() - self._saved_time >= 60 * minutes

    def fit(self) -> dict:
        """Train to the end (or to a preemption); tracker runs end FAILED if training raises."""
        try:
            return self._fit()
        except BaseException:
            self.runlog.close("FAILED")
            raise

    def _fit(self) -> dict:
        t0 = time.time()
        try:
            self.preemption.poll(self.device)  # a signal during set-up: stop before training
            self._train(t0)
            return self.finish(time.time() - t0)
        except Preempted:
            pass
        # every rank stopped at the same point, between steps: save the last finished step
        # (nothing when it is saved already), then exit 0 for the scheduler to requeue
        if self._saved_at == self.step and self._eval_cut and self.info.is_main:
            mark_eval_pending(self.ckpt_dir / self._saved_tag)  # saved before its evaluation
        self.checkpoint(poll=False)
        self.runlog.close("KILLED")
        if self.info.is_main:
            log.info("preempted: saved step %d; resume with --train.resume=latest", self._saved_at)
        return {"step": self.step, "preempted": True}

    def _train(self, t0: float) -> None:
        """Steps until train.max_steps / the last epoch. Order at a step (and at an epoch's
        end): checkpoint when due, then evaluation, then on_eval: a preemption during an
        evaluation finds the step saved, and the search finds the checkpoint of what it hears."""
        from tqdm import tqdm

        cfg = self.cfg
        self.runlog.open(resumed=self.step > 0)  # a resumed run continues its tracker runs
        self.engine.train()
        if self._eval_pending:  # the evaluation a preemption cut short, before any new step
            self.run_eval()
            self.notify()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.info.is_main,
            desc="train",
            dynamic_ncols=True,
        )
        try:
            while self.step < self.total_steps:
                # closing() shuts the workers down as soon as the loop is left, also by Preempted
                loader = self.data.train_loader(
                    self.epoch, skip_steps=self.step_in_epoch, resume=self._resume_stream
                )
                self._resume_stream = None
                self._cursors = dict(loader.stream.cursors)
                self._fingerprint = loader.stream.fingerprint(cfg.data.num_workers)
                with closing(iter(loader)) as it:
                    for batch in it:
                        cursor = batch.pop(CURSOR)
                        self._cursors[cursor["worker"]] = cursor
                        t_step = time.perf_counter()
                        agreed = self.train_step(batch)
                        self.step_times.append(time.perf_counter() - t_step)
                        self.step += 1
                        self.step_in_epoch += 1
                        bar.update(1)
                        if agreed.applied and (
                            self.step % cfg.train.log_every == 0 or self.step == self.total_steps
                        ):
                            self._log_step(agreed.loss, batch["task"], t0, bar)
                        if agreed.stop:
                            raise Preempted
                        if agreed.save or (
                            cfg.train.save_every and self.step % cfg.train.save_every == 0
                        ):
                            self.checkpoint()
                        if cfg.eval.every and self.step % cfg.eval.every == 0:
                            self.run_eval()
                        self.notify()
                        if self.step >= self.total_steps:
                            break
                    else:  # the epoch ran to its end
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        if not cfg.train.save_every:
                            self.checkpoint()
                        if not cfg.eval.every:
                            self.run_eval()
                        self.notify()
        finally:
            bar.close()

    def _log_step(self, loss: float, task: str, t0: float, bar) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", task=task)
        self.runlog.write(
            self.step,
            "train",
            {
                "loss": loss,
                f"loss/{task}": loss,
                "lr": self.engine.get_lr()[0],
                "elapsed_s": time.time() - t0,
                "bad_steps_total": self.guard.total,
            },
        )

    def cost(self, adapter_dir: Path) -> dict:
        """What the run cost: parameters updated, median step time, peak memory, export bytes."""
        from vlds.peft import count_parameters

        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        else:
            import resource  # Linux reports ru_maxrss in KiB

            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
        times = sorted(self.step_times[1:] or self.step_times)  # the first step warms up
        files = [f for f in adapter_dir.rglob("*") if f.is_file()] if adapter_dir.is_dir() else []
        return {
            "params": count_parameters(self.engine.module),
            "step_time_s": times[len(times) // 2] if times else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "adapter_bytes": sum(f.stat().st_size for f in files),
        }

    def finish(self, train_time: float) -> dict:
        self.checkpoint()  # before the (long) final evaluation, which a preemption may cut
        metrics, preds = self.run_eval()
        self.notify()
        save_adapter(self.engine.module, self.cfg_dict, self.out_dir / "adapter", self.info.is_main)
        result = {
            "step": self.step,
            "train_time_s": round(train_time, 1),
            "metrics": metrics,
            "bad_steps_total": self.guard.total,
            "batch_plan": self.data.batch_plan(),
            "majority_baseline": self.baselines()["majority_baseline"],
            "text_prior": self.baselines()["text_prior"],
            **self.cost(self.out_dir / "adapter"),
            "adapter_kernel": adapter_kernel_report(),  # which path each adapter shape ran
        }
        if self.info.is_main:
            (self.out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            self.runlog.final(self.step, result)
            from vlds.eval.submission import write_predictions

            for t, rows in preds.items():  # the official submission formats
                write_predictions(t, rows, self.out_dir)
            from vlds.curves import plot_run

            plot_run(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
            for t, base in result["majority_baseline"].items():
                log.info(
                    "%s: score %.1f vs majority-answer baseline %.1f", t, metrics[t]["score"], base
                )
            log.info("final: %s", eval_line(metrics, result["text_prior"]))
            log.info("done: %d steps in %.0f s; outputs in %s", self.step, train_time, self.out_dir)
        self.runlog.close()
        if dist.is_initialized():
            dist.barrier()
        return result
