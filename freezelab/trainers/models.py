"""Build a backbone with a fresh classifier: VGG16 or any timm model.

>>> model = build_model("test_resnet", num_classes=3)
>>> model.get_classifier().out_features
3

The classic Keras recipe (VGG16 without its top, then Flatten, Dense(256, relu),
Dense(num_classes)) is ``build_model("vgg16", 2, head={"pool": "flatten",
"hidden": [256]})``.

``head_norm="batchnorm"`` normalizes the features the head reads (``HeadNorm``):

>>> build_model("test_resnet", 3, head_norm="batchnorm").get_classifier()
Sequential(
  (0): HeadNorm(96, eps=1e-05, momentum=0.1, affine=False, bias=False, track_running_stats=True)
  (1): Linear(in_features=96, out_features=3, bias=True)
)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from freezelab.trainers.checkpoint import load_weights_and_spec, safetensors_metadata
from freezelab.trainers.config import HeadConfig, TrainConfig
from freezelab.trainers.head_init import (
    HeadInit,
    decide,
    labels_from,
    nothing_to_keep,
    pretrained_classes,
    pretrained_decision,
)

log = logging.getLogger(__name__)


# VGG16's own classifier has 124M parameters; a head 8x larger is a typo.
MAX_HEAD_PARAMS = 1_000_000_000


class HeadNorm(nn.BatchNorm1d):
    """An affine-free BatchNorm on the features a classifier reads (``model.head_norm:
    batchnorm``): MAE's linear probe, which calibrates the features' magnitude so that
    one learning rate fits any backbone (a frozen backbone's features on shifted images
    can be large enough to make a linear head diverge).

    It belongs to the head (``get_classifier()`` returns it with the classifier) and
    has no parameters: its running statistics are buffers, which DDP broadcasts and
    ``ddp.average_buffers`` averages like any BatchNorm's. In training it normalizes
    by the batch, in evaluation by its running statistics, whatever the backbone does.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            # A batch of one (an epoch's last, at some dataset sizes) has no variance.
            return F.batch_norm(x, self.running_mean, self.running_var, eps=self.eps)
        return super().forward(x)


HEAD_NORMS = ("none", "batchnorm")


class FineTuneModel(nn.Module):
    """A timm backbone without its classifier, and a custom ``head``.

    Groups, policies and checkpoints see ``backbone.*`` and ``head.*`` parameters.
    With ``head_norm="batchnorm"`` the head starts with a ``HeadNorm`` of the
    backbone's features.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_config: HeadConfig,
        num_classes: int,
        input_size,
        head_norm: str = "none",
    ):
        super().__init__()
        self.backbone = backbone
        self.pool = head_config.pool
        if self.pool != "default":
            _drop_modules_after_features(backbone)
        with torch.no_grad():
            was_training = backbone.training
            backbone.eval()
            features = self.features(torch.zeros(1, *input_size))
            backbone.train(was_training)
        width = features.shape[1]
        layers: list[nn.Module] = [HeadNorm(width)] if head_norm == "batchnorm" else []
        sizes = [width, *head_config.hidden, num_classes]
        weights = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
        if weights > MAX_HEAD_PARAMS:
            raise ValueError(
                f"head: {' -> '.join(map(str, sizes))} would have {weights:,} parameters "
                f"({weights * 4 / 2**30:.1f} GiB in float32), more than the limit of "
                f"{MAX_HEAD_PARAMS:,}; use pool avg or max, or smaller hidden sizes"
            )
        for size in head_config.hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if head_config.dropout:
                layers.append(nn.Dropout(head_config.dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output as a (batch, features) matrix."""
        x = self.backbone.forward_features(x)
        if self.pool == "default":
            return self.backbone.forward_head(x, pre_logits=True)
        if x.ndim == 3:  # tokens (ViT): pool over the sequence
            x = x.transpose(1, 2).unsqueeze(-1)
        if self.pool == "flatten":
            return torch.flatten(x, 1)
        if self.pool == "avg":
            return x.mean(dim=(2, 3))
        return x.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


def _drop_modules_after_features(backbone: nn.Module) -> None:
    # With pool flatten/avg/max the head reads forward_features() directly: the
    # backbone's own pre-logits and classifier would hold parameters that get no
    # gradient (DDP raises on those), so they go.
    backbone.reset_classifier(0)
    for name in ("pre_logits", "fc_norm", "head"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            setattr(backbone, name, nn.Identity())


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    head: HeadConfig | dict | None = None,
    head_norm: str = "none",
    in_chans: int = 3,
    image_size: int | None = None,
    head_init: str = "auto",
    labels: Sequence[str] | None = None,
) -> nn.Module:
    """A backbone with a fresh classifier for ``num_classes``.

    ``pretrained=True`` downloads the weights through timm (the Hugging Face Hub);
    ``weights=PATH`` loads a local safetensors or state-dict file instead. Whether their
    classifier is kept is ``head_init`` (``head_init.decide``) given ``labels``, the
    names of this model's classes (None: unknown); one that does not fit is dropped
    with a log line. ``image_size`` is the side of the images the model will see
    (default: the backbone's own): a ``pool: flatten`` head's width depends on it.
    ``head_norm="batchnorm"`` puts a ``HeadNorm`` before the classifier (weights saved
    without it load all the same: the classifier behind it is a new head, see
    ``with_head_norm``).
    """
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if head_norm not in HEAD_NORMS:
        raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {head_norm!r}")
    if pretrained and weights:
        raise ValueError("set either pretrained or weights, not both")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}: not a timm model name{hint}")
    head_config = HeadConfig.model_validate(head) if isinstance(head, dict) else head
    classes = 0 if head_config else num_classes
    try:
        backbone = timm.create_model(
            name, pretrained=pretrained, num_classes=classes, in_chans=in_chans
        )
    except Exception as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not download the pretrained weights of {name!r} ({type(err).__name__}: {err}). "
            "Without internet access, point model.weights at a local safetensors or "
            "state-dict file instead."
        ) from err
    if pretrained:
        decision = pretrained_decision(name, num_classes, head_config, head_init)
        if head_config is None and not decision.kept and pretrained_classes(name) == num_classes:
            backbone.reset_classifier(num_classes)  # timm kept it: the class counts agree
        log.info("classifier: %s", decision)
    if head_config is None:
        model = with_head_norm(backbone) if head_norm == "batchnorm" else backbone
    else:
        size = timm.data.resolve_data_config({}, model=backbone)["input_size"][1:]
        input_size = (in_chans, *((image_size, image_size) if image_size else size))
        model = FineTuneModel(backbone, head_config, num_classes, input_size, head_norm)
    if weights:
        load_weights(model, weights, head_init=head_init, labels=labels)
    return model


def with_head_norm(model: nn.Module) -> nn.Module:
    """``model`` (a timm model) with its classifier ``Linear`` replaced by
    ``Sequential(HeadNorm, Linear)``, where ``get_classifier()`` finds it.

    The classifier's keys move (``fc.weight`` becomes ``fc.1.weight``): weights saved
    without the norm leave the classifier as built, a new head, which is right, since a
    classifier fitted to raw features does not fit normalized ones.
    """
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"model.head_norm: batchnorm needs a Linear classifier from get_classifier(); "
            f"{type(model).__name__} has {type(classifier).__name__}: use a custom model.head"
        )
    path = next(name for name, module in model.named_modules() if module is classifier)
    parent, _, attribute = path.rpartition(".")
    normed = nn.Sequential(HeadNorm(classifier.in_features), classifier)
    setattr(model.get_submodule(parent), attribute, normed)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a state dict saved with ``torch.save``.

    Pickled files are read with ``weights_only=True``: a weights file never runs code.
    """
    return read_weights(path)[0]


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The tensors of ``read_state_dict``, and the labels the file records (its
    safetensors metadata, or a logged model's spec); None where it records none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), labels_from(safetensors_metadata(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"weights file {str(path)!r} is not valid safetensors ({err})"
            ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols
            state, spec = load_weights_and_spec(path)
    except Exception as err:  # not a zip or pickle, or a pickle that would run code
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if reason.startswith("Weights only load failed"):
            reason = "it holds objects other than tensors, which would need running its code"
        raise ValueError(
            f"weights file {str(path)!r} is neither safetensors nor a state dict that loads "
            f"safely ({reason})"
        ) from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    return state, labels_from(spec)


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    head_init: str = "auto",
    labels: Sequence[str] | None = None,
) -> HeadInit:
    """Load a weights file into ``model``; its classifier only where ``head_init``
    keeps it for the model's ``labels`` (``head_init.decide``). Returns the decision.

    Keys may carry DDP's ``module.`` prefix; weights of a plain timm model load into
    the backbone of a model with a custom head.
    """
    state, decision = weights_for(model, path, head_init=head_init, labels=labels)
    model.load_state_dict(state, strict=False)
    log.info("classifier: %s", decision)
    return decision


def weights_for(
    model: nn.Module,
    path: str | Path,
    *,
    head_init: str = "auto",
    labels: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], HeadInit]:
    """The tensors of ``path`` that ``load_weights`` loads into ``model``, and what
    becomes of the classifier; a file that does not fit the backbone raises."""
    tensors, recorded = read_weights(path)
    state = {k.removeprefix("module."): v for k, v in tensors.items()}
    target = model.state_dict()
    if isinstance(model, FineTuneModel) and not any(k.startswith("backbone.") for k in state):
        state = {"backbone." + k: v for k, v in state.items()}
    head_keys = _head_state_keys(model)
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    for key in mismatched:
        if key not in head_keys:
            raise ValueError(
                f"weights file {str(path)!r}: {key} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(target[key].shape)}"
            )
    absent = sorted(k for k in head_keys if k not in state)
    if mismatched:
        key = mismatched[0]
        why_not = (
            f"{key} has shape {tuple(state[key].shape)}, the model's "
            f"{tuple(target[key].shape)} (another class count)"
        )
    elif absent:
        why_not = f"the file has no {absent[0]} (a classifier of another architecture)"
    else:
        why_not = "the model has no classifier"
    decision = decide(
        head_init,
        recorded=recorded,
        target=labels,
        fits=bool(head_keys) and not mismatched and not absent,
        why_not=why_not,
        source=f"weights file {str(path)!r}",
    )
    if mismatched:
        log.info("dropped classifier weights of another class count: %s", ", ".join(mismatched))
    if not decision.kept:
        state = {k: v for k, v in state.items() if k not in head_keys}
    unexpected = [k for k in state if k not in target]
    for key in unexpected:
        del state[key]
    if unexpected:
        log.info(
            "ignored %d weights the model does not have: %s",
            len(unexpected),
            ", ".join(unexpected[:5]),
        )
    missing = [k for k in target if k not in state and k not in head_keys]
    if missing:
        raise ValueError(
            f"weights file {str(path)!r} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}: "
            "is it the weights of another architecture?"
        )
    return state, decision


def _head_state_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in (*head.parameters(), *head.buffers())}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def build_for_config(
    config: TrainConfig, *, with_weights: bool = True, num_classes: int | None = None
) -> nn.Module:
    """The model of ``config``: built the same way on the driver and on every worker.

    ``model.weights`` may be a local file or an MLflow model URI (``models:/NAME@ALIAS``
    or ``runs:/RUN_ID/model``) of a model that freezelab logged: chained fine-tuning.
    The fresh layers are initialized from ``config.seed``, so every rank, a resumed run
    and the driver build the same starting weights (the reference of the drift metric);
    so is a classifier that ``model.head_init`` does not keep (``head_init_decision``).
    ``num_classes`` stands in for the data's class count where the data is not at hand
    (its labels are then unknown).
    """
    from freezelab.trainers.artifacts import download_weights, is_model_uri

    section = config.model
    labels = _labels(config, num_classes)
    weights = section.weights if with_weights else None
    if with_weights and not weights and not section.pretrained and section.head_init == "keep":
        nothing_to_keep()
    if is_model_uri(weights):
        weights = download_weights(weights, config.mlflow.tracking_uri)
    torch.manual_seed(config.seed)
    return build_model(
        section.name,
        num_classes or len(labels),
        pretrained=section.pretrained and with_weights,
        weights=weights,
        head=section.head,
        head_norm=section.head_norm,
        in_chans=section.in_chans,
        image_size=config.data.input_size,
        head_init=section.head_init,
        labels=labels,
    )


def head_init_decision(
    config: TrainConfig, *, model: nn.Module | None = None, num_classes: int | None = None
) -> HeadInit:
    """What becomes of the classifier of the weights that ``config`` starts from:
    the decision that ``build_for_config`` applies on every rank, without training or
    allocating anything (the driver's record of the run, and its check before the run).

    ``model``: the config's model already built without weights (e.g. on the meta
    device); built here otherwise. A weights file is read (an MLflow model URI
    downloaded); ``keep`` with a classifier that cannot be kept raises ConfigError.

    >>> from freezelab.trainers.config import validate_config
    >>> data = {"kind": "synthetic", "num_samples": 16, "num_classes": 2}
    >>> model, policy = {"name": "test_resnet"}, {"type": "full"}
    >>> config = validate_config({"name": "x", "model": model, "data": data, "policy": policy, "epochs": 1})
    >>> head_init_decision(config)
    HeadInit(action='reset', reason='no pretrained weights: a fresh model')
    """
    from freezelab.trainers.artifacts import download_weights, is_model_uri
    from freezelab.trainers.data import num_classes_of

    section = config.model
    if section.pretrained:
        classes = num_classes or num_classes_of(config.data)
        return pretrained_decision(section.name, classes, section.head, section.head_init)
    if not section.weights:
        if section.head_init == "keep":
            nothing_to_keep()
        return HeadInit("reset", "no pretrained weights: a fresh model")
    labels = _labels(config, num_classes)
    weights = section.weights
    if is_model_uri(weights):
        weights = download_weights(weights, config.mlflow.tracking_uri)
    if model is None:
        model = build_unallocated(config, num_classes)
    return weights_for(model, weights, head_init=section.head_init, labels=labels)[1]


def build_unallocated(config: TrainConfig, num_classes: int | None = None) -> nn.Module:
    """The model with its tensors on the meta device: every shape, and no memory or
    initialization (vgg16: 0.04 s instead of 1 s). Loading weights into it checks their
    shapes and copies nothing. A model whose construction needs real values is built on
    the CPU instead."""
    try:
        with torch.device("meta"):
            return build_for_config(config, with_weights=False, num_classes=num_classes)
    except (NotImplementedError, RuntimeError):
        return build_for_config(config, with_weights=False, num_classes=num_classes)


def _labels(config: TrainConfig, num_classes: int | None) -> list[str] | None:
    from freezelab.trainers.data import label_names_of

    return label_names_of(config.data) if num_classes is None else None
