"""Strict ASHA: asynchronous successive halving on Ray Tune's public scheduler interface.

Asynchronous successive halving (Li et al., https://arxiv.org/abs/1810.05934) with one bracket,
training steps as its time axis (the reported `step`):

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

import pickle

import numpy as np
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .space import rungs

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


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
    ):
        super().__init__()
        if not (0 < grace < max_steps and eta > 1):
            raise ValueError(
                f"ASHA needs 0 < grace ({grace}) < max_steps ({max_steps}) and eta ({eta}) > 1"
            )
        self.eta, self.milestones = eta, rungs(grace, eta, max_steps)[:-1]
        self._recorded: dict[int, dict[str, float]] = {t: {} for t in self.milestones}
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._num_stopped = 0

    @property
    def _sign(self) -> float | None:  # scores are compared as "higher is better"
        return {"max": 1.0, "min": -1.0}.get(self._mode)

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
        if self._time_attr not in result or self._metric not in result:
            return CONTINUE
        action = self.decide(
            trial.trial_id, result[self._time_attr], self._sign * result[self._metric]
        )
        self._num_stopped += action == STOP
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        """A final result counts at its rung like any other (the decision no longer matters)."""
        if result and self._time_attr in result and self._metric in result:
            self.decide(trial.trial_id, result[self._time_attr], self._sign * result[self._metric])

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
