"""The progress of a group of trials (a sweep, a study) on the driver, from the results
that Tune already receives: a bar per running trial and the count of finished ones on a
terminal, a line per trial epoch elsewhere. Tune's own trial tables come back with
``-v``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from freezelab.progress import Progress


class TrialProgress(tune.Callback):
    """A Tune callback (it runs on the driver) that shows each trial's epochs.

    Tune saves its callbacks with the group's state, so the display itself is made on
    first use and never pickled: a resumed group shows its trials the same way.
    """

    def __init__(
        self,
        group: str,
        trials: int | None,
        epochs: int,
        label: Callable[[dict[str, Any]], str],
        error_line: Callable[[str], str],
    ):
        """``group`` names the group on the console (``sweep 'grid'``), ``label`` a trial
        from its config; ``error_line`` says in one line what went wrong in an error's
        text."""
        self.group = group
        self.trials = trials
        self.epochs = epochs
        self.label = label
        self.error_line = error_line
        self._progress: Progress | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_progress": None}

    def progress(self, trials: list) -> Progress:
        """The display, made at the first event: trials that a resumed group finished
        before it was stopped count as finished."""
        if self._progress is None:
            self._progress = Progress()
            done = sum(1 for t in trials if t.status == "TERMINATED")
            self._progress.expect(self.group, self.trials, done=done)
        return self._progress

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress(trials).start(trial.trial_id, self.label(trial.config), self.epochs)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if trial.trial_id not in self.progress(trials):  # a trial restored mid-way
            self.on_trial_start(iteration, trials, trial)
        self.progress(trials).update(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ran = int(trial.last_result.get("training_iteration") or 0)
        stopped = f"stopped after {ran} of {self.epochs} epoch(s)" if ran < self.epochs else None
        self.progress(trials).finish(trial.trial_id, stopped)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error() or "no error text saved"
        line = f"failed: {self.error_line(error)}"
        self.progress(trials).finish(trial.trial_id, line, failed=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._progress is not None:
            self._progress.close()
