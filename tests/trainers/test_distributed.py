"""Two Ray Train workers on a 2-CPU Ray session: the CLI end to end, replica equality
after an unfreeze (and its failure without the DDP rebuild, which fails the run), and
resource checks."""

from functools import partial

import pytest
import torch
import yaml
from safetensors.torch import load_file

from freezelab.cli import main
from freezelab.trainers.config import ConfigError
from freezelab.trainers.launch import run_training, worker_resources
from tests.conftest import TINY, merge

TWO_WORKERS = {"scaling": {"num_workers": 2}}


def assert_two_ranks_split(metrics: dict, train_size: int, epochs: int) -> None:
    """The run had two ranks, and each trained on its half of the training set every
    epoch (``DistributedSampler`` pads an odd set to equal halves): what one rank alone
    would report differs (world_size 1, a single rank0 with every image)."""
    assert metrics["world_size"] == 2
    half = -(-train_size // 2)
    assert metrics["train_images/rank0"] == metrics["train_images/rank1"] == half * epochs
    assert metrics["train_images"] == 2 * half * epochs
    assert "train_images/rank2" not in metrics


@pytest.mark.ray
def test_cli_trains_two_workers_end_to_end(ray_session, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(merge(TINY, {"name": "cli-2w", "storage_path": str(tmp_path / "runs")}))
    )
    code = main(
        [
            "train",
            str(path),
            "--set",
            "scaling.num_workers=2",
            "--set",
            "policy={type: gradual, every: 1}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "run cli-2w: 2 epochs, policy gradual" in out
    checkpoints = list((tmp_path / "runs" / "cli-2w").glob("checkpoint_*/model.safetensors"))
    assert checkpoints, "Ray Train wrote no checkpoint under storage_path/name"
    from freezelab.trainers import checkpoint as ckpt

    last = max((ckpt.read_state(path.parent) for path in checkpoints), key=lambda s: s["epoch"])
    # TINY: 3 digit classes of 24 training images, 2 epochs.
    assert_two_ranks_split(last["metrics"], train_size=72, epochs=2)


@pytest.mark.ray
def test_replicas_identical_after_unfreeze(ray_session, tiny_config):
    # gradual: epoch 0 trains the head, epoch 1 unfreezes layer4, epoch 2 layer3.
    config = tiny_config(
        name="sync",
        policy={"type": "gradual", "every": 1},
        epochs=3,
        performance={"feature_cache": False},
        **TWO_WORKERS,
    )
    outcome = run_training(config)
    assert outcome.metrics["phase"] == "unfrozen_2"
    assert outcome.metrics["replicas_in_sync"] == 1
    assert_two_ranks_split(outcome.metrics, train_size=72, epochs=3)


@pytest.mark.ray
def test_replicas_that_disagree_fail_the_run_and_hand_over_no_model(
    ray_session, tmp_path, capsys, monkeypatch
):
    import mlflow
    from faults import KeepDdpWrapper

    import freezelab.api
    from freezelab.mlflow.tracked import train_tracked

    # gradual: epoch 1 trains the head, epoch 2 unfreezes layer4, which the kept DDP
    # wrapper never synchronizes.
    monkeypatch.setattr(
        freezelab.api, "train_tracked", partial(train_tracked, reporter=KeepDdpWrapper())
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "diverge.yaml"
    config = {
        "name": "diverge",
        "storage_path": str(tmp_path / "runs"),
        "policy": {"type": "gradual", "every": 1},
        "performance": {"feature_cache": False},
        "mlflow": {"enabled": True, "tracking_uri": uri, "experiment": "diverge"},
    }
    path.write_text(yaml.safe_dump(merge(TINY, merge(config, TWO_WORKERS))))
    assert main(["train", str(path)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("freezelab ")]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("freezelab train: error: epoch 2/2: ")
    assert "layer group(s) layer4;" in errors[0] and "no model is handed over" in errors[0]
    assert "model:" not in captured.out and "checkpoint:" not in captured.out
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("diverge")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert not client.search_logged_models(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    # The epoch whose replicas disagree is charted; its report saved no checkpoint.
    checks = client.get_metric_history(run.info.run_id, "run/replicas_in_sync")
    assert [(m.step, m.value) for m in checks] == [(1, 0.0)]
    from freezelab.trainers import checkpoint as ckpt

    saved = list((tmp_path / "runs" / "diverge").glob("checkpoint_*/model.safetensors"))
    assert [ckpt.read_state(f.parent)["epoch"] for f in saved] == [0]


def _gloo_ranks(case: str) -> dict[str, object]:
    """Two gloo ranks in processes of their own (``gloo_ranks.py``), never in a
    process that holds a Ray session."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gloo_ranks.py")
    result = subprocess.run(
        [sys.executable, str(script), case], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["rebuilt", "not-rebuilt"])
def test_replica_check_sees_the_drift_of_an_unfreeze_without_ddp_rebuild(case):
    # Lightning issue 20340: DDP syncs only what required grad when it was built.
    expected = 1 if case == "rebuilt" else 0
    assert _gloo_ranks(case) == {"0": expected, "1": expected}


def test_the_error_names_the_groups_that_hold_what_differs():
    import timm

    from freezelab.policies.groups import layer_groups
    from freezelab.trainers.ddp import groups_holding

    groups = tuple(layer_groups(timm.create_model("test_resnet", num_classes=3)))
    differing = [
        "fc.weight",
        "layer4.0.bn1.running_mean",  # a buffer: the group of its module
        "layer4.0.conv1.weight",
        "layer1.0.bn1.num_batches_tracked",
        "not.a.module.buffer",
    ]
    assert groups_holding(differing, groups) == ["layer1", "layer4", "head", "not.a.module.buffer"]


@pytest.mark.ray
def test_two_workers_match_one_process_on_the_same_global_batch(ray_session, tiny_config):
    # DDP averages gradients: 2 workers x batch 8 take the same steps as 1 x batch 16,
    # up to float reduction order (full batches only, so the shards line up; head_only
    # so that no BatchNorm sees per-worker batch statistics).
    common = {
        "policy": {"type": "head_only"},
        "epochs": 1,
        "data": {"train_per_class": 32},
        "performance": {"feature_cache": False},
        "optimizer": {"momentum": 0.0},
    }
    one = run_training(tiny_config(name="one", batch_size=16, **common))
    two = run_training(tiny_config(name="two", batch_size=8, **common, **TWO_WORKERS))
    assert one.metrics["world_size"] == 1 and one.metrics["train_images/rank0"] == 96
    assert_two_ranks_split(two.metrics, train_size=96, epochs=1)
    assert one.metrics["val_acc"] == pytest.approx(two.metrics["val_acc"], abs=0.05)
    a, b = load_file(one.weights_file), load_file(two.weights_file)
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_two_workers_split_the_same_epoch_subset_as_one_process(ray_session, tiny_config):
    # data.epoch_fraction draws each epoch's subset before the ranks split it, and Ray's
    # prepare_data_loader keeps the sampler: 2 workers x batch 8 take one process's
    # steps at batch 16, epoch after epoch (as in the test above).
    common = {
        "policy": {"type": "head_only"},
        "epochs": 2,
        "data": {"train_per_class": 32, "epoch_fraction": 0.5},
        "optimizer": {"momentum": 0.0},
    }
    one = run_training(tiny_config(name="one-half", batch_size=16, **common))
    two = run_training(tiny_config(name="two-half", batch_size=8, **common, **TWO_WORKERS))
    assert one.metrics["train_images/rank0"] == 48 * 2  # ceil(0.5 * 96) per epoch
    assert_two_ranks_split(two.metrics, train_size=48, epochs=2)
    a, b = load_file(one.weights_file), load_file(two.weights_file)
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_a_request_that_can_never_fit_fails_clearly(ray_session, tiny_config):
    config = tiny_config(
        name="huge", scaling={"num_workers": 2, "resources_per_worker": {"CPU": 4}}
    )
    with pytest.raises(ConfigError, match="can never fit"):
        worker_resources(config)
    config = tiny_config(name="gpu", scaling={"num_workers": 1, "use_gpu": True})
    with pytest.raises(ConfigError, match="GPU"):
        worker_resources(config)
    # 16 workers on 2 CPUs would get 0.125 CPU each: refused, with the numbers.
    config = tiny_config(name="crowd", scaling={"num_workers": 16})
    with pytest.raises(
        ConfigError, match=r"16 workers on 2 CPUs would get 0.125 CPU each.*at most 8"
    ):
        worker_resources(config)


@pytest.mark.ray
def test_default_worker_resources_fit_two_cpus(ray_session, tiny_config):
    assert worker_resources(tiny_config(**TWO_WORKERS)) == {"CPU": 1.0}
    assert worker_resources(tiny_config(scaling={"num_workers": 4})) == {"CPU": 0.5}


def test_replica_check_covers_batchnorm_statistics_and_averaging_aligns_them():
    # [before averaging, after] on each rank: the statistics differ, then agree.
    assert _gloo_ranks("buffers") == {"0": [0, 1], "1": [0, 1]}


@pytest.mark.ray
def test_reported_accuracy_is_the_saved_models_with_batchnorm_on_two_workers(
    ray_session, tiny_config
):
    from freezelab.trainers import checkpoint as ckpt
    from freezelab.trainers.data import build_splits
    from freezelab.trainers.models import build_for_config

    config = tiny_config(
        name="bn-exact",
        policy={"type": "full"},
        epochs=2,
        # A held-out test set of 107 images: an odd count, strided over the ranks as val is.
        data={"train_per_class": 30, "test_fraction": 0.2},
        **TWO_WORKERS,
    )
    outcome = run_training(config)
    assert outcome.metrics["replicas_in_sync"] == 1
    assert_two_ranks_split(outcome.metrics, train_size=90, epochs=2)
    model = build_for_config(config)
    ckpt.load_model_weights(outcome.checkpoint_dir, model)
    model.eval()
    _, val_set, test_set, _ = build_splits(config.data, model)
    assert outcome.metrics["test_images"] == len(test_set) == 107
    for key, dataset in (("val_acc", val_set), ("test_acc", test_set)):
        correct = total = 0
        with torch.no_grad():
            for images, labels in torch.utils.data.DataLoader(dataset, batch_size=64):
                correct += int((model(images).argmax(1) == labels).sum())
                total += len(labels)
        # At most one sample apart (float ties between two logits).
        assert abs(outcome.metrics[key] * total - correct) <= 1, (
            key,
            outcome.metrics[key],
            correct / total,
        )
