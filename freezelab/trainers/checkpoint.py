"""Checkpoints: a directory with the model as safetensors, the optimizer state keyed by
parameter name, and ``state.json`` (epoch, step, the resolved config and the policy).

No RNG state is stored: every epoch reseeds from (seed, epoch, rank), so a resumed
run draws the same random numbers as an uninterrupted one.

>>> import tempfile, timm
>>> model = timm.create_model("test_resnet", num_classes=2)
>>> with tempfile.TemporaryDirectory() as d:
...     save_checkpoint(d, model, {}, {"epoch": 0})
...     read_state(d)["epoch"]
0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
# A model that freezelab logged to MLflow (``model_file.py``): its pickle, under data/,
# and the one global in it besides tensors.
LOGGED_MODEL_FILE = "model.pth"
LOGGED_MODEL_REBUILD = "freezelab.trainers.model_file.rebuild"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer_state: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory; a copy breaks the sharing.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.untyped_storage().data_ptr() in seen:
            tensors[key] = tensor.clone()
        seen.add(tensors[key].untyped_storage().data_ptr())
    save_file(tensors, str(directory / MODEL_FILE))
    torch.save(_to_cpu(optimizer_state), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_model_weights(directory: str | Path, model: nn.Module) -> None:
    state = load_file(str(Path(directory) / MODEL_FILE))
    model.load_state_dict(state, strict=True)


def load_optimizer_state(directory: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    path = Path(directory) / OPTIMIZER_FILE
    if not path.exists():
        return {}
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for name, entry in state.items()
    }


def load_weights_only(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``, which also reads a logged model's file
    (``model_file.py``) as its state dict: no model is built and no code but torch's
    tensor rebuilding runs."""
    with torch.serialization.safe_globals([(_state_only, LOGGED_MODEL_REBUILD)]):
        return torch.load(Path(path), map_location="cpu", weights_only=True)


def _state_only(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict:
    return state_dict
