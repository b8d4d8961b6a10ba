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
