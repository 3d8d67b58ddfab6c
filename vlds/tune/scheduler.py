"""The search's schedulers on Ray Tune's public scheduler interface: SuccessiveHalving (the
default: synchronous, one bracket of HyperBand; its docstring below) and StrictASHA.

Written here rather than taken from Ray: Ray's HyperBandScheduler derives its brackets from
max_t (no single bracket with a chosen first rung), cuts with ceil(n / eta) and breaks ties by
arrival order; its ASHAScheduler promotes ties (below). Both classes keep Ray's hooks and
decision semantics otherwise (StrictASHA is tested against ASHAScheduler).

Strict ASHA: asynchronous successive halving (Li et al., https://arxiv.org/abs/1810.05934) with
one bracket, training steps as its time axis (the reported `step`):

- rungs at grace, grace * eta, grace * eta^2, ... strictly below max_steps (`space.rungs`);
- when a trial first reports at or past a rung (the highest rung its step has reached) its
  score is compared with the rung's cutoff, the (1 - 1/eta) quantile (linear interpolation,
  NaNs ignored) of the scores recorded there so far, and then recorded there;
- it goes on only if its score is strictly above the cutoff; the first trial at a rung (no
  cutoff yet) always goes on; its later reports below the next rung go on (the decision is
  made once per rung), and so does its final report at max_steps (no rung there: a trial that
  gets there finishes its run: metrics.json, adapter).

This decides exactly as Ray's ASHAScheduler(max_t=max_steps - 1, grace_period=grace,
reduction_factor=eta, brackets=1, stop_last_trials=False) except for ties: Ray promotes a score
equal to the cutoff. Early in a search many trials tie (on the tiny preset every model still
answers at chance at the first rung, and NLVR2's constant answer gives one of two averages);
Ray's rule sent 7 of 16 trials on instead of 4. Here a score equal to the cutoff stops.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .space import rungs

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
SIGN = {"max": 1.0, "min": -1.0}  # a mode's sign: values compare as "higher is better"


class StrictASHA(FIFOScheduler):
    """Asynchronous successive halving where a score equal to a rung's cutoff stops.

    Trials are started in submission order (FIFOScheduler); `on_trial_result` returns CONTINUE
    or STOP. metric and mode come from tune.TuneConfig (or are given here, not both).
    """

    def __init__(
        self,
        max_steps: int,
        grace: int,
        eta: int,
        time_attr: str = "step",
        metric: str | None = None,
        mode: str | None = None,
        rung_metric: str | None = None,
        rung_mode: str = "max",
    ):
        super().__init__()
        if not (0 < grace < max_steps and eta > 1):
            raise ValueError(
                f"ASHA needs 0 < grace ({grace}) < max_steps ({max_steps}) and eta ({eta}) > 1"
            )
        self.eta, self.milestones = eta, rungs(grace, eta, max_steps)[:-1]
        self._recorded: dict[int, dict[str, float]] = {t: {} for t in self.milestones}
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        # the rungs compare rung_metric (e.g. the validation loss, mode min) when given, else
        # Tune's metric (the score the search reports its best by)
        self._rung_metric, self._rung_mode = rung_metric, rung_mode
        self._num_stopped = 0

    @property
    def _sign(self) -> float | None:  # scores are compared as "higher is better"
        return SIGN.get(self._mode)

    def _rung_value(self, result: dict) -> float | None:
        """The value the rungs compare, higher = better; None when the result has no step."""
        if self._time_attr not in result:
            return None
        if self._rung_metric is None:
            return self._sign * result[self._metric] if self._metric in result else None
        if self._rung_metric not in result:
            raise ValueError(
                f"a trial reported {sorted(result)} without the rungs' metric "
                f"{self._rung_metric!r}; turn it on (the validation loss: eval.loss=true) or "
                f"choose another with --rung-metric"
            )
        return SIGN[self._rung_mode] * result[self._rung_metric]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False  # given twice: Tune reports the conflict
        self._metric, self._mode = metric or self._metric, mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    def cutoff(self, milestone: int) -> float | None:
        """The (1 - 1/eta) quantile of the scores recorded at a rung; None while it has none."""
        recorded = self._recorded[milestone]
        if not recorded:
            return None
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.eta) * 100))

    def decide(self, trial_id: str, step: float, score: float) -> str:
        """CONTINUE or STOP for a trial's result at `step` (score: higher is better); records
        the score at the highest rung `step` has reached, once per trial and rung."""
        reached = [t for t in self.milestones if t <= step]
        if not reached or trial_id in self._recorded[reached[-1]]:
            return CONTINUE
        cutoff = self.cutoff(reached[-1])
        self._recorded[reached[-1]][trial_id] = score
        # stop at or below the cutoff (as `score < nextafter(cutoff, inf)`: a NaN goes on)
        return STOP if cutoff is not None and score < np.nextafter(cutoff, np.inf) else CONTINUE

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._metric or not self._sign:
            raise ValueError(
                f"{type(self).__name__} has no valid `metric` ({self._metric}) or `mode` "
                f"({self._mode}); pass them to tune.TuneConfig() or to the scheduler"
            )

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        value = self._rung_value(result)
        if value is None:
            return CONTINUE
        action = self.decide(trial.trial_id, result[self._time_attr], value)
        self._num_stopped += action == STOP
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        """A final result counts at its rung like any other (the decision no longer matters)."""
        value = self._rung_value(result) if result else None
        if value is not None:
            self.decide(trial.trial_id, result[self._time_attr], value)

    def debug_string(self) -> str:
        rungs_text = " | ".join(
            f"step {t}: cutoff {self.cutoff(t)} ({len(self._recorded[t])} recorded)"
            for t in self.milestones
        )
        return f"Using strict ASHA: num_stopped={self._num_stopped}\nRungs: {rungs_text}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


PAUSE = TrialScheduler.PAUSE


class SuccessiveHalving(StrictASHA):
    """Synchronous successive halving: one bracket of HyperBand (Li et al., JMLR 2018;
    Jamieson & Talwalkar, AISTATS 2016), with training steps as its time axis.

    Every trial trains to the first rung and waits there (PAUSE: Tune releases its resources; its
    vlds checkpoint at the rung stays, and a trial started again resumes from it). When every
    trial of a rung has reported there, the best max(1, n // eta) of them go on to the next rung
    and the rest stop; the last rung's survivors train to max_steps. Unlike ASHA, no trial goes
    on because it arrived first, and the cost is known in advance (`halving_cost`).

    A rung ranks trials by `rung_metric` (higher is better after `rung_mode`), then by
    `tie_metric`, each averaged over the trial's last `window` evaluations (the one at the rung
    and those before it: less evaluation noise); trials still equal on both at the cut
    (identical predictions) go on together: nothing is decided by arrival order. A trial's first
    report at or past a rung is its value there. `n_trials` (the size of the search) tells the
    first rung when everyone has arrived. The window's history is not saved: after a resume it
    starts again from the trial's next evaluation.

    Its state (each trial's rung, the values recorded, the trials out) is written to
    `state_file` after every change and read back when the search is resumed (Tune re-adds the
    trials to the scheduler it pickled at the start). Keep that file out of the experiment
    folder's top level: Tune copies every .json there to its staging folder on restore and back
    on every save, which would put the old state back.
    """

    _supports_buffered_results = False  # each result is a decision (as Ray's HyperBand)

    def __init__(
        self,
        max_steps: int,
        grace: int,
        eta: int,
        n_trials: int,
        time_attr: str = "step",
        metric: str | None = None,
        mode: str | None = None,
        rung_metric: str | None = None,
        rung_mode: str = "max",
        tie_metric: str | None = None,
        tie_mode: str = "max",
        window: int = 1,
        state_file: str | None = None,
    ):
        super().__init__(max_steps, grace, eta, time_attr, metric, mode, rung_metric, rung_mode)
        if n_trials < 1:
            raise ValueError(f"successive halving needs n_trials >= 1, got {n_trials}")
        if window < 1:
            raise ValueError(f"the rung window needs >= 1 evaluation, got {window}")
        self.n_trials, self._tie_metric, self._tie_mode = n_trials, tie_metric, tie_mode
        self.window, self._recent = window, {}  # trial id -> its last `window` [value, tie]
        self._state_file = state_file
        self._order: list[str] = []  # trial ids as added
        self._level: dict[str, int] = {}  # the index of the next rung the trial must pass
        self._values: dict[int, dict[str, list[float]]] = {t: {} for t in self.milestones}
        self._decided: dict[int, list[str]] = {}  # rung -> the trials that went on
        self._out: set[str] = set()  # stopped at a rung, finished, errored or removed
        self._num_stopped = 0
        if state_file and os.path.isfile(state_file):
            self._load()

    # ---- state -----------------------------------------------------------------------------
    def _save(self) -> None:
        if not self._state_file:
            return
        state = {
            "order": self._order,
            "level": self._level,
            "values": {str(t): v for t, v in self._values.items()},
            "decided": {str(t): v for t, v in self._decided.items()},
            "out": sorted(self._out),
            "num_stopped": self._num_stopped,
        }
        os.makedirs(os.path.dirname(self._state_file) or ".", exist_ok=True)
        tmp = f"{self._state_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self._state_file)

    def _load(self) -> None:
        with open(self._state_file) as f:
            state = json.load(f)
        if [str(t) for t in self.milestones] != sorted(state["values"], key=int):
            raise ValueError(
                f"{self._state_file} holds rungs {sorted(state['values'], key=int)}, this "
                f"search has {self.milestones}: resume with the same arguments"
            )
        self._order, self._level = state["order"], state["level"]
        self._values = {int(t): v for t, v in state["values"].items()}
        self._decided = {int(t): v for t, v in state["decided"].items()}
        self._out, self._num_stopped = set(state["out"]), state["num_stopped"]

    def __setstate__(self, state: dict) -> None:
        """Unpickled by Tune when a search is resumed (tuner.pkl holds the scheduler as it was
        created): the state written during the search takes over."""
        self.__dict__.update(state)
        if self._state_file and os.path.isfile(self._state_file):
            self._load()

    # ---- ranking ---------------------------------------------------------------------------
    def _key(self, trial_id: str, result: dict) -> list[float] | None:
        """[rung value, tie value], both higher = better, each the mean over the trial's last
        `window` results (this one included; fewer when it has fewer); None without a step."""
        value = self._rung_value(result)
        if value is None:
            return None
        tie = 0.0
        if self._tie_metric is not None and result.get(self._tie_metric) is not None:
            tie = SIGN[self._tie_mode] * result[self._tie_metric]
        recent = self._recent.setdefault(trial_id, [])
        recent[:] = [*recent, [value, tie]][-self.window :]
        return [sum(x[i] for x in recent) / len(recent) for i in (0, 1)]

    def waiting_at(self, trial_id: str) -> int | None:
        """The rung a trial has reported at and waits on (undecided), else None."""
        k = self._level.get(trial_id, 0)
        if k < len(self.milestones) and trial_id in self._values[self.milestones[k]]:
            return self.milestones[k]
        return None

    def _complete(self, k: int) -> bool:
        """Rung k can be decided: the rung before it is, and every trial still in at its level
        has reported there (the first rung: all n_trials have been added)."""
        t = self.milestones[k]
        if t in self._decided or (k > 0 and self.milestones[k - 1] not in self._decided):
            return False
        if k == 0 and len(self._order) < self.n_trials:
            return False
        members = self._members(k)
        return bool(members) and all(i in self._values[t] for i in members)

    def _members(self, k: int) -> list[str]:
        """The trials still in whose next rung is rung k, as added."""
        return [i for i in self._order if self._level.get(i) == k and i not in self._out]

    def decide_rung(self, k: int) -> tuple[list[str], list[str]]:
        """(go on, stop) at rung k: the best max(1, n // eta) by [value, tie] and every trial
        equal to the last of them."""
        t = self.milestones[k]
        ranked = sorted(self._members(k), key=lambda i: self._values[t][i], reverse=True)
        keep = max(1, len(ranked) // self.eta)
        last = self._values[t][ranked[keep - 1]]
        go = [i for i in ranked if self._values[t][i] >= last]
        return go, [i for i in ranked if i not in go]

    # ---- Tune's hooks ----------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        tid = trial.trial_id
        if tid not in self._level:  # a restored search re-adds the trials it knows
            self._order.append(tid)
            self._level[tid] = 0
            self._save()

    def _trial(self, tune_controller, trial_id: str):
        for t in tune_controller.get_trials():
            if t.trial_id == trial_id:
                return t
        return None

    def _decide_ready(self, tune_controller, current=None) -> str | None:
        """Decide every rung that is complete; stop the losers that are not running, mark the
        winners to start again. Returns CONTINUE or STOP for `current` when it was decided."""
        from ray.tune.experiment import Trial

        action = None
        for k in range(len(self.milestones)):
            if not self._complete(k):
                continue
            go, stop = self.decide_rung(k)
            self._decided[self.milestones[k]] = go
            for i in go:
                self._level[i] = k + 1
            self._out.update(stop)
            self._num_stopped += len(stop)
            self._save()
            for i in stop:
                if current is not None and i == current.trial_id:
                    action = STOP
                    continue
                t = self._trial(tune_controller, i)
                if t is not None and (t.status in (Trial.PAUSED, Trial.PENDING) or t.is_saving):
                    tune_controller.stop_trial(t)
            if current is not None and current.trial_id in go:
                action = CONTINUE
        return action

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        tid = trial.trial_id
        if tid in self._out:  # stopped at a rung, yet running: Tune restarts restored trials
            return STOP
        key = self._key(tid, result)
        if key is None:
            return CONTINUE
        k = self._level.get(tid, 0)
        if k >= len(self.milestones) or result[self._time_attr] < self.milestones[k]:
            return CONTINUE
        self._values[self.milestones[k]].setdefault(tid, key)
        self._save()
        action = self._decide_ready(tune_controller, current=trial)
        return action if action is not None else PAUSE

    def _leave(self, tune_controller, trial) -> None:
        if trial.trial_id not in self._out:
            self._out.add(trial.trial_id)
            self._save()
        self._decide_ready(tune_controller)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._leave(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._leave(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        """A pending or paused trial that is not waiting at an undecided rung and not out: the
        lowest rung first (the first rung fills before anyone goes further), then as added."""
        from ray.tune.experiment import Trial

        for t in tune_controller.get_trials():
            # Tune's saved state keeps a trial stopped while paused as PAUSED, so a resumed
            # search re-adds it paused: stop it again (once, then it is TERMINATED)
            if t.trial_id in self._out and t.status in (Trial.PAUSED, Trial.PENDING):
                tune_controller.stop_trial(t)
        ready = [
            t
            for t in tune_controller.get_trials()
            if t.status in (Trial.PENDING, Trial.PAUSED)
            and t.trial_id not in self._out
            and self.waiting_at(t.trial_id) is None
        ]
        order = {tid: n for n, tid in enumerate(self._order)}
        ready.sort(key=lambda t: (self._level.get(t.trial_id, 0), order.get(t.trial_id, 1e9)))
        return ready[0] if ready else None

    def debug_string(self) -> str:
        parts = []
        for k, t in enumerate(self.milestones):
            n = sum(1 for i in self._order if self._level.get(i, 0) >= k)
            state = f"{len(self._decided[t])} went on" if t in self._decided else "waiting"
            parts.append(f"step {t}: {len(self._values[t])} of {n} reported, {state}")
        return f"Using successive halving: num_stopped={self._num_stopped}\nRungs: " + " | ".join(
            parts
        )


def halving_cost(n: int, grace: int, eta: int, max_steps: int) -> int:
    """Trial-steps synchronous successive halving spends on n configurations (no ties at a
    cut): n trials to the first rung, max(1, n // eta) of them on to the next, and so on, the
    last rung's survivors to max_steps."""
    steps, last = 0, 0
    for t in rungs(grace, eta, max_steps):
        steps += n * (t - last)
        last, n = t, max(1, n // eta)
    return steps
