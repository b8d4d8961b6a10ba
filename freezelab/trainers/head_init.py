"""Whether a run keeps the classifier of the weights it starts from: ``model.head_init``.

A classifier's outputs mean the labels it was trained on. The study pretrains on digits
0-4 and fine-tunes on digits 5-9: both have 5 classes, so the source's head fits, but
through it label 0 (digit 5) would start as the source's digit 0. A new task gets a new
head. To tell a new task from the same one, every weights file that freezelab writes
records its labels: the class names in label order (``data.label_names_of``), as JSON
under ``LABELS_KEY`` in a checkpoint's safetensors metadata and as ``labels`` in the
spec of a model it logs to MLflow.

``decide`` is the whole rule, a function of the mode, the recorded and the target labels,
and whether the file's classifier fits the model; ``models.load_weights`` applies it,
and ``models.head_init_decision`` gives it for a config without training (the driver's
record of the run).

>>> decide("auto", recorded=["0", "1"], target=["5", "6"], fits=True)
HeadInit(action='reset', reason='labels differ: [5, 6] vs [0, 1]')
>>> decide("auto", recorded=["0", "1"], target=["0", "1"], fits=True).action
'kept'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from freezelab.errors import ConfigError

LABELS_KEY = "freezelab.labels"
# A label list longer than this is shown by its ends and its length.
_SHOWN = 6


@dataclass(frozen=True)
class HeadInit:
    """What happened to the classifier: ``kept`` (loaded from the weights) or ``reset``
    (freshly initialized from the run's seed), and why, in a few words."""

    action: Literal["kept", "reset"]
    reason: str

    @property
    def kept(self) -> bool:
        return self.action == "kept"

    def __str__(self) -> str:
        return f"{self.action} ({self.reason})"


def decide(
    mode: str,
    *,
    recorded: Sequence[str] | None,
    target: Sequence[str] | None,
    fits: bool,
    why_not: str = "its shape differs from the model's",
    source: str = "the weights",
) -> HeadInit:
    """The classifier's fate under ``mode`` (``auto``, ``keep`` or ``reset``).

    ``recorded``: the labels the weights were trained on (None: not recorded);
    ``target``: this run's labels; ``fits``: whether the weights hold a classifier the
    model can load (``why_not`` says why they do not). ``keep`` with a classifier that
    does not fit raises ConfigError.
    """
    if mode not in ("auto", "keep", "reset"):
        raise ValueError(f"model.head_init must be auto, keep or reset, got {mode!r}")
    if not fits and mode == "keep":
        raise ConfigError(
            f"model.head_init keep: the classifier of {source} cannot be kept: {why_not} "
            "(head_init auto or reset starts from a fresh head)"
        )
    if mode == "reset":
        return HeadInit("reset", "head_init reset")
    same = recorded is not None and target is not None and list(recorded) == list(target)
    if mode == "auto" and recorded is not None and not same:
        # The reason that matters first: another task, whatever the file's head looks like.
        shown = show_labels(target) if target is not None else "unknown"
        return HeadInit("reset", f"labels differ: {shown} vs {show_labels(recorded)}")
    if not fits:
        return HeadInit("reset", f"classifier not loadable: {why_not}")
    if mode == "keep":
        return HeadInit("kept", "head_init keep")
    if recorded is None:
        return HeadInit("reset", "labels unknown: the weights do not record theirs")
    return HeadInit("kept", f"same labels {show_labels(target)}")


def show_labels(labels: Sequence[str]) -> str:
    """A label list in a line: ``[5, 6, 7]``, or its ends and its length.

    >>> show_labels([str(i) for i in range(100)])
    '[0, 1, 2, ..., 99] (100)'
    """
    names = [str(name) for name in labels]
    if len(names) <= _SHOWN:
        return "[" + ", ".join(names) + "]"
    return "[" + ", ".join(names[:3]) + f", ..., {names[-1]}] ({len(names)})"


def labels_metadata(labels: Sequence[str]) -> dict[str, str]:
    """Safetensors metadata (string to string) that records ``labels``."""
    return {LABELS_KEY: json.dumps([str(name) for name in labels])}


def labels_from(record: Mapping[str, object] | None) -> list[str] | None:
    """The labels recorded in safetensors metadata or a logged model's spec; None
    where there is no record, or one that is not a list of names (a file from
    elsewhere that happens to use the key counts as not recording any)."""
    if not record:
        return None
    value = record.get(LABELS_KEY, record.get("labels"))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        return None
    return value


def pretrained_classes(name: str) -> int | None:
    """The class count of timm's pretrained classifier for ``name`` (no download)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return getattr(cfg, "num_classes", None) if cfg is not None else None


def pretrained_decision(
    name: str,
    num_classes: int,
    head: object | None,
    head_init: str,
) -> HeadInit:
    # timm's pretrained weights record no labels: ``auto`` resets their classifier.
    classes = pretrained_classes(name)
    if head is not None:
        why_not = "a custom head (model.head) is always new"
    else:
        why_not = f"it has {classes} classes, the model {num_classes}"
    fits = head is None and classes == num_classes
    return decide(
        head_init,
        recorded=None,
        target=None,
        fits=fits,
        why_not=why_not,
        source=f"timm's pretrained {name}",
    )


def nothing_to_keep() -> None:
    raise ConfigError(
        "model.head_init keep: there is no classifier to keep (set model.weights or "
        "model.pretrained, or head_init auto)"
    )
