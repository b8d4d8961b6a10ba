"""The transfer study: a self-contained answer to "what if I don't freeze?".

Pretrain a small backbone on a source task (digits 0-4), then fine-tune it on a
different target task (digits 5-9, few labels per class) under several freeze
policies, and print each policy's accuracy, time and trainable share. No download:
the digits ship with scikit-learn.

    freezelab demo                      # the built-in study below
    freezelab demo --config study.yaml  # your own (same keys)
"""

from __future__ import annotations

import copy
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from freezelab.api import train
from freezelab.config_io import ConfigModel, read_mapping
from freezelab.console import Column, format_table
from freezelab.errors import ConfigError, describe_validation_error
from freezelab.policies import from_dict
from freezelab.trainers.config import TrainConfig, apply_override, deep_merge, validate_config

DEFAULT_STUDY: dict[str, Any] = {
    "name": "transfer-study",
    "base": {
        "model": {"name": "resnet18"},
        "data": {"kind": "digits", "input_size": 32, "val_fraction": 0.3},
        "batch_size": 16,
        "scaling": {"num_workers": 2},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001},
        "schedule": {"name": "cosine"},
        "seed": 0,
    },
    "pretrain": {
        "epochs": 4,
        "data": {"classes": [0, 1, 2, 3, 4]},
        "policy": {"type": "full"},
    },
    "finetune": {
        "epochs": 8,
        "data": {"classes": [5, 6, 7, 8, 9], "train_per_class": 20},
        "optimizer": {"lr": 0.02},
    },
    "policies": [
        {"type": "full"},
        {"type": "head_only"},
        {"type": "last_n", "n": 1},
        {"type": "bitfit"},
        {"type": "gradual", "every": 2},
        {"type": "lp_ft", "probe_epochs": 3, "ft_lr_factor": 0.5},
    ],
}


class StudyConfig(ConfigModel):
    """A base train config, the overrides of each stage, and the policies to compare."""

    name: str = "transfer-study"
    base: dict[str, Any]
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    policies: list[dict[str, Any]] = Field(min_length=1)


def load_study(source: str | Path | None, overrides: list[str] | None = None) -> StudyConfig:
    data = copy.deepcopy(DEFAULT_STUDY)
    if source is not None:
        data = read_mapping(source, "a study")
    for override in overrides or []:
        apply_override(data, override)
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            describe_validation_error(str(source or "the built-in study"), err, "invalid study")
        ) from None


def stage_config(study: StudyConfig, stage: dict[str, Any], name: str, **extra: Any) -> TrainConfig:
    merged = deep_merge(deep_merge(study.base, stage), {"name": name, **extra})
    return validate_config(merged, origin=f"study {study.name!r}, run {name!r}")


def run_study(
    source: str | Path | None = None, overrides: list[str] | None = None, address: str | None = None
):
    study = load_study(source, overrides)
    # A fresh name per invocation: reusing a name would resume the old runs.
    tag = f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    pretrain = stage_config(study, study.pretrain, f"{tag}-pretrain")
    finetunes = [
        stage_config(
            study,
            study.finetune,
            f"{tag}-{from_dict(p).slug()}",
            policy=p,
            model={"weights": "PENDING"},
        )
        for p in study.policies
    ]  # validated before anything trains
    print(f"[freezelab] transfer study {tag}: pretraining {pretrain.model.name} on the source task")
    source = train(pretrain, address=address).outcome
    parent = None
    if finetunes[0].mlflow.enabled:
        from freezelab.mlflow.sweep import start_group_run

        parent, _ = start_group_run(finetunes[0], tag, "study")
    weights = source.weights_file
    print(
        f"[freezelab] source model val_acc {source.metrics.get('val_acc', float('nan')):.3f}; weights {weights}"
    )
    rows = []
    for config in finetunes:
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"weights": weights})}
        )
        started = time.perf_counter()
        m = train(config, address=address, parent_run_id=parent).outcome.metrics
        total = m["trainable_params"] + m["frozen_params"]
        rows.append(
            {
                "policy": config.policy.label(),
                "val_acc": m["val_acc"],
                "best_val_acc": m["best_val_acc"],
                "wall_s": time.perf_counter() - started,
                "trainable_pct": 100.0 * m["trainable_params"] / total,
                "backbone_drift": _mean_backbone_drift(m),
            }
        )
    print(format_study(tag, rows))
    if parent is not None:
        import mlflow

        from freezelab.mlflow.tracking import resolve_tracking_uri
        from freezelab.report import build_report

        uri = resolve_tracking_uri(finetunes[0].mlflow.tracking_uri)
        report = build_report(parent, out_dir=Path("freezelab_reports") / tag, tracking_uri=uri)
        mlflow.MlflowClient(tracking_uri=uri).set_terminated(parent)
        print(f"[freezelab] report of the study: {report.index}")
        print(f"[freezelab] compare the runs in the MLflow UI: mlflow ui --backend-store-uri {uri}")
    return rows


STUDY_COLUMNS = (
    Column("policy", max_width=40),
    Column("val_acc", fmt="{:.3f}"),
    Column("best_val_acc", "best", fmt="{:.3f}"),
    Column("wall_s", "time_s", fmt="{:.1f}"),
    Column("trainable_pct", "trainable%", fmt="{:.1f}"),
    Column("backbone_drift", "drift", fmt="{:.3f}"),
)


def format_study(tag: str, rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        [
            f"transfer study {tag}: fine-tuning on the target task",
            format_table(rows, STUDY_COLUMNS),
            "drift: mean relative L2 change of the backbone's groups from the pretrained weights",
        ]
    )


def _mean_backbone_drift(metrics: dict[str, Any]) -> float:
    values = [v for k, v in metrics.items() if k.startswith("drift/") and k != "drift/head"]
    return sum(values) / len(values) if values else 0.0
