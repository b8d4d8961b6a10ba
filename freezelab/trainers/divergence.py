"""Whether a run diverged: a pure function of its epoch history.

A run has *diverged* when its training loss

- is not finite (NaN or infinite) at any epoch, or
- ends a phase far above the chance loss: at the last epoch of each phase (lp_ft's
  probe, each step of gradual) and at the run's last epoch, the epoch's mean
  training loss is above ``threshold(C) = 2 ln C``, twice the cross-entropy of the
  uniform prediction over C classes (``chance_loss``): on its own training data the
  model then gives the true class 1/C² of the probability on average, far worse than
  predicting nothing. A run between ln C and 2 ln C has learned little, not diverged:
  it stays in the ranking, where its accuracy says so.

Only the ends of phases are judged: a phase may start above chance (a fresh head, or
a backbone just unfrozen) and still converge. The answer depends on the history
alone, which every checkpoint keeps, so a resumed run reaches the same verdict as the
uninterrupted one.

>>> history = [
...     {"epoch": 0, "phase": "probe", "train_loss": 97.3},
...     {"epoch": 1, "phase": "fine-tune", "train_loss": 0.4},
... ]
>>> divergence_of(history, num_classes=5)
"phase 'probe' ended at train_loss 97.3 > 2 ln(5) = 3.22 (epoch 1)"
>>> divergence_of([{"epoch": 0, "phase": "main", "train_loss": 0.9}], num_classes=5) is None
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def chance_loss(num_classes: int) -> float:
    """The training loss of a uniform prediction over ``num_classes``: ln C.

    >>> round(chance_loss(5), 3)
    1.609
    """
    return math.log(num_classes)


def threshold(num_classes: int) -> float:
    """The training loss above which a phase's end counts as diverged: 2 ln C."""
    return 2 * chance_loss(num_classes)


def divergence_of(
    history: Sequence[dict[str, Any]], num_classes: int, *, finished: bool = True
) -> str | None:
    """Why the run of ``history`` (the loop's epoch metrics, in order) diverged, or
    None when it did not. The earliest reason is given; epochs are counted from 1, as
    on the console.

    ``finished``: the last entry is the run's last epoch (and so ends its phase). A
    run in progress passes False: its last epoch ends a phase only once the next
    epoch shows another one.
    """
    limit = threshold(num_classes)
    epochs = sorted(history, key=lambda m: int(m["epoch"]))
    for index, metrics in enumerate(epochs):
        loss = float(metrics["train_loss"])
        shown = int(metrics["epoch"]) + 1
        if not math.isfinite(loss):
            return f"train_loss {loss} at epoch {shown}"
        following = epochs[index + 1] if index + 1 < len(epochs) else None
        ends_phase = (
            finished if following is None else following.get("phase") != metrics.get("phase")
        )
        if ends_phase and loss > limit:
            return (
                f"phase {metrics.get('phase')!r} ended at train_loss {loss:.4g} > "
                f"2 ln({num_classes}) = {limit:.2f} (epoch {shown})"
            )
    return None
