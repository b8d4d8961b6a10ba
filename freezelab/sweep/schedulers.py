"""Successive halving within groups of trials: one ASHA per group, one Tune experiment.

Ray Tune's ASHA compares every trial of an experiment with every other. A study that
chooses each policy's learning rate needs the comparison within each (variant,
policy) group: a rate good for ``head_only`` must not stop ``full``'s runs. Running a
Tune experiment per group would run the groups one after another; ``GroupedASHA``
keeps one experiment, so trials of all groups run side by side, and hands each trial's
results to its own group's ``AsyncHyperBandScheduler``.

>>> scheduler = GroupedASHA(GroupOf("group"), max_t=8, grace_period=2, reduction_factor=3)
>>> scheduler.rungs()
[2, 6]

ASHA keeps the first trial to reach a rung (there is nothing to compare it with yet):
the order of a group's trials matters, and so does their timing when more trials of a
group run at once than one after another. ``group_epochs`` caps what a group's trials
train in all (``freezelab advise`` holds its budget so): a trial that reports past it
stops, whatever ASHA says, except the group's most advanced trial while none of the
group has reached ``max_t``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler


@dataclass(frozen=True)
class GroupOf:
    """A trial's group: the value of ``key`` in its ``trial`` entry (picklable, as Tune
    saves the scheduler with the experiment)."""

    key: str

    def __call__(self, config: dict[str, Any]) -> str:
        value = config.get("trial", config)[self.key]
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class GroupedASHA(FIFOScheduler):
    """Asynchronous successive halving within each group of trials (``group_of`` maps
    a trial's config to its group). Trials that reach ``max_t`` end on their own (no
    stop at the last report), so each finishes its run and leaves its results."""

    def __init__(
        self,
        group_of: GroupOf,
        *,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        metric: str | None = None,
        mode: str | None = None,
        group_epochs: int | None = None,
    ):
        super().__init__()
        self._group_of = group_of
        self._asha = {
            "max_t": max_t,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
        }
        self._metric, self._mode = metric, mode
        self._groups: dict[str, AsyncHyperBandScheduler] = {}
        self._group_of_trial: dict[str, str] = {}
        self.stopped: dict[str, int] = {}  # trial id -> the iteration it was stopped at
        self._group_epochs = group_epochs
        self._spent: dict[str, int] = {}  # group -> iterations its trials reported
        self._reached: dict[str, int] = {}  # trial id -> its last iteration
        self._finished_groups: set[str] = set()  # a trial of the group reached max_t
        self._protected: dict[str, str | None] = {}  # group -> the trial the cap spares

    def rungs(self) -> list[int]:
        """The iterations at which a group's trials are compared."""
        grace, rf, max_t = (self._asha[k] for k in ("grace_period", "reduction_factor", "max_t"))
        count = int(math.log(max_t / grace) / math.log(rf) + 1)
        return [int(grace * rf**k) for k in range(count) if grace * rf**k < max_t]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def _scheduler(self, trial) -> AsyncHyperBandScheduler:
        group = self._group_of_trial.setdefault(trial.trial_id, self._group_of(trial.config))
        if group not in self._groups:
            self._groups[group] = AsyncHyperBandScheduler(
                time_attr="training_iteration",
                metric=self._metric,
                mode=self._mode,
                brackets=1,
                stop_last_trials=False,
                **self._asha,
            )
        return self._groups[group]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._scheduler(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        scheduler = self._scheduler(trial)
        if trial.trial_id not in scheduler._trial_info:  # restored: a fresh start
            scheduler.on_trial_add(tune_controller, trial)
        action = scheduler.on_trial_result(tune_controller, trial, result)
        group = self._group_of_trial[trial.trial_id]
        iteration = int(result.get("training_iteration", 0))
        self._spent[group] = self._spent.get(group, 0) + 1
        self._reached[trial.trial_id] = iteration
        if iteration >= self._asha["max_t"]:
            self._finished_groups.add(group)
            return TrialScheduler.CONTINUE  # its last epoch: the run ends on its own
        if self._group_epochs is not None and self._spent[group] >= self._group_epochs:
            if trial.trial_id != self._protected_trial(group):
                action = TrialScheduler.STOP  # the group's epochs are spent, however it scored
        if action == TrialScheduler.STOP:
            self.stopped[trial.trial_id] = iteration
        return action

    def _protected_trial(self, group: str) -> str | None:
        """The trial the spent cap lets go on: while no trial of ``group`` has trained
        every epoch, its most advanced live trial (the first of a tie), chosen once, so
        that trials side by side in step never all stop short of the end. Only one that
        has trained at least the cap over the group's trials, so what it adds is at most
        ``max_t - ceil(group_epochs / trials)`` (``freezelab.advise.search`` charges it)."""
        if group in self._finished_groups:
            return None
        if group not in self._protected:
            members = [t for t, g in self._group_of_trial.items() if g == group]
            live = [t for t in members if t not in self.stopped and t in self._reached]
            chosen = None
            if live:
                best = max(live, key=lambda t: (self._reached[t], -members.index(t)))
                if self._reached[best] >= math.ceil(self._group_epochs / len(members)):
                    chosen = best
            self._protected[group] = chosen
        return self._protected[group]

    def on_trial_complete(self, tune_controller, trial, result: dict[str, Any]) -> None:
        scheduler = self._scheduler(trial)
        if trial.trial_id in scheduler._trial_info:
            scheduler.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        scheduler = self._scheduler(trial)
        scheduler._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return f"Using successive halving within {len(self._groups)} group(s): {self._asha}"
