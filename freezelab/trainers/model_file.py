"""The file of a model that freezelab logs to MLflow, and the only code that reads it.

A logged model is MLflow's ``pytorch`` flavor in its pickle format, so that
``mlflow.pytorch.load_model`` hands back the ``nn.Module`` itself: ``.eval()``,
``.train()`` and further fine-tuning work, which they do not on the graph that
``torch.export`` (MLflow's default format) loads as. The pickle stream holds one call,
``rebuild(spec, state_dict)``: ``spec`` is the architecture as plain data (timm name,
class count, head and its norm, input channels and size) and the state dict's tensors are torch's
raw storages, the only copy of the weights. Neither reader can run other code:

- ``mlflow.pytorch.load_model`` unpickles with this module (its name is recorded in the
  model as the pickle module): ``Unpickler`` admits the globals of a state dict and
  ``rebuild``, nothing else, and ``rebuild`` builds the model with timm and freezelab.
- freezelab itself (chained fine-tuning from ``models:/NAME@ALIAS``, the report's CKA)
  reads the state dict with ``torch.load(weights_only=True)``
  (``checkpoint.load_weights_only``), building nothing.

>>> sorted(spec_of("resnet18", 10))
['freezelab', 'head', 'head_norm', 'image_size', 'in_chans', 'labels', 'name', 'num_classes']
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

SPEC_ATTRIBUTE = "freezelab_spec"


def spec_of(
    name: str,
    num_classes: int,
    *,
    head: dict[str, Any] | None = None,
    head_norm: str = "none",
    in_chans: int = 3,
    image_size: int | None = None,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """The architecture of a model as plain data: what ``rebuild`` needs besides weights,
    and the labels its classifier was trained on (``head_init.py``; None: unknown)."""
    from freezelab import __version__

    return {
        "name": name,
        "num_classes": int(num_classes),
        "head": _plain(head),
        "head_norm": head_norm,
        "in_chans": int(in_chans),
        "image_size": image_size,
        "labels": None if labels is None else [str(name) for name in labels],
        "freezelab": __version__,
    }


def attach_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Mark ``model`` as picklable by this module: without a spec it is refused."""
    object.__setattr__(model, SPEC_ATTRIBUTE, spec)
    return model


def rebuild(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model of ``spec`` with ``state_dict``'s weights, in eval mode."""
    from freezelab.trainers.models import build_model

    model = build_model(
        spec["name"],
        spec["num_classes"],
        head=spec.get("head"),
        # Models logged before head_norm existed have none.
        head_norm=spec.get("head_norm", "none"),
        in_chans=spec.get("in_chans", 3),
        image_size=spec.get("image_size"),
    )
    model.load_state_dict(state_dict, strict=True)
    return attach_spec(model.eval(), spec)


class Pickler(pickle.Pickler):
    """Writes a model that carries a spec as ``rebuild(spec, state_dict)``."""

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, nn.Module):
            return NotImplemented
        spec = getattr(obj, SPEC_ATTRIBUTE, None)
        if spec is None:
            raise pickle.PicklingError(
                f"{type(obj).__name__} has no freezelab spec: only models built by freezelab "
                "(attach_spec) are written in freezelab's model format"
            )
        state = OrderedDict((k, v.detach()) for k, v in obj.state_dict().items())
        return rebuild, (spec, state)


# What a state dict's pickle refers to (storages are resolved by torch itself), and
# ``rebuild``. Anything else in a model file is refused before it is imported.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    (__name__, "rebuild"),
}


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"a freezelab model file may refer only to its rebuild function and tensors, "
                f"not to {module}.{name}"
            )
        return super().find_class(module, name)


def dump(obj: Any, file: Any, protocol: int | None = None) -> None:
    Pickler(file, protocol).dump(obj)


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: a spec is JSON-like data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
