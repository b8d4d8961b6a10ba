"""Checkpoints: a directory with the model as safetensors (its metadata records the
labels, ``head_init.LABELS_KEY``), the optimizer state keyed by parameter name, and
``state.json`` (epoch, step, the resolved config and the policy).

No RNG state is stored: every epoch reseeds from (seed, epoch, rank), so a resumed
run draws the same random numbers as an uninterrupted one.

>>> import tempfile, timm
>>> model = timm.create_model("test_resnet", num_classes=2)
>>> with tempfile.TemporaryDirectory() as d:
...     _ = save_checkpoint(d, model, {}, {"epoch": 0})
...     read_state(d)["epoch"]
0
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from freezelab import objectstore
from freezelab.redact import redact_uri

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
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the checkpoint; ``metadata`` goes into the model file's safetensors header."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory; a copy breaks the sharing.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.untyped_storage().data_ptr() in seen:
            tensors[key] = tensor.clone()
        seen.add(tensors[key].untyped_storage().data_ptr())
    save_file(tensors, str(directory / MODEL_FILE), metadata=metadata)
    torch.save(_to_cpu(optimizer_state), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``state.json``, from a local directory or a URI."""
    if objectstore.is_uri(str(directory)):
        return json.loads(objectstore.read_text(objectstore.join(str(directory), STATE_FILE)))
    return json.loads((Path(directory) / STATE_FILE).read_text())


def local_copy(directory: str | Path) -> Path:
    """A local directory holding the checkpoint's model and state: ``directory``
    itself when it is local; for a URI, a copy downloaded into this machine's temporary
    folder (once: a copy whose state matches the stored one is reused). The optimizer
    state, needed only to resume (which Ray Train downloads itself), stays where it is.
    """
    if not objectstore.is_uri(str(directory)):
        return Path(directory)
    uri = str(directory).rstrip("/")
    digest = hashlib.sha1(redact_uri(uri).encode()).hexdigest()[:16]
    copy = Path(tempfile.gettempdir()) / f"freezelab-{os.getuid()}" / "checkpoints" / digest
    state = objectstore.read_text(objectstore.join(uri, STATE_FILE))
    if (copy / STATE_FILE).is_file() and (copy / STATE_FILE).read_text() == state:
        return copy
    import pyarrow.fs

    partial = copy.with_name(f".{digest}.{uuid.uuid4().hex}")
    partial.mkdir(parents=True)
    try:
        for name in (MODEL_FILE, STATE_FILE):  # the state last: it marks a complete copy
            fs, path = objectstore.filesystem(objectstore.join(uri, name))
            pyarrow.fs.copy_files(path, str(partial / name), source_filesystem=fs)
        shutil.rmtree(copy, ignore_errors=True)
        try:
            partial.rename(copy)
        except OSError:  # another process made the copy in between
            if not (copy / STATE_FILE).is_file() or (copy / STATE_FILE).read_text() != state:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return copy


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
    return load_weights_and_spec(path)[0]


def load_weights_and_spec(path: str | Path) -> tuple[Any, dict[str, Any] | None]:
    """What ``load_weights_only`` reads, and the spec of a logged model's file (None for
    any other file): one read of the file."""
    specs: list[dict[str, Any]] = []

    def state_only(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict:
        specs.append(spec)
        return state_dict

    with torch.serialization.safe_globals([(state_only, LOGGED_MODEL_REBUILD)]):
        loaded = torch.load(Path(path), map_location="cpu", weights_only=True)
    return loaded, (specs[0] if specs and isinstance(specs[0], dict) else None)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return dict(file.metadata() or {})
