"""Two Ray Train workers on a 2-CPU Ray session: the CLI end to end, replica equality
after an unfreeze (and its failure without the DDP rebuild), and resource checks."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from freezelab.cli import main
from freezelab.trainers.config import ConfigError
from freezelab.trainers.launch import run_training, worker_resources
from tests.conftest import TINY, merge

TWO_WORKERS = {"scaling": {"num_workers": 2}}


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


def _unfreeze_and_step(rank: int, world_size: int, port: int, rebuild: bool, results) -> None:
    """One gloo rank: DDP built while the backbone is frozen, the backbone unfrozen,
    then one step on this rank's own batch, with or without rewrapping DDP."""
    import os

    import torch.distributed as dist

    from freezelab.policies import apply, from_dict
    from freezelab.trainers.loop import _replicas_in_sync, _wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        import timm

        model = timm.create_model("test_resnet", num_classes=3)
        apply(model, from_dict({"type": "head_only"}).plan(model, 0))
        wrapped = _wrap(model, world_size, torch.device("cpu"))
        apply(model, from_dict({"type": "full", "bn": "eval"}).plan(model, 0))
        if rebuild:
            wrapped = _wrap(model, world_size, torch.device("cpu"))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(100 + rank)  # each rank its own batch, as under a sampler
        loss = wrapped(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        results[rank] = _replicas_in_sync(model, world_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rebuild", [True, False], ids=["rebuilt", "not-rebuilt"])
def test_replica_check_sees_the_drift_of_an_unfreeze_without_ddp_rebuild(rebuild):
    # Lightning issue 20340: DDP syncs only what required grad when it was built.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_unfreeze_and_step, args=(2, port, rebuild, results), nprocs=2, join=True)
    assert dict(results) == ({0: 1, 1: 1} if rebuild else {0: 0, 1: 0})


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
    assert one.metrics["val_acc"] == pytest.approx(two.metrics["val_acc"], abs=0.05)
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


@pytest.mark.ray
def test_default_worker_resources_fit_two_cpus(ray_session, tiny_config):
    assert worker_resources(tiny_config(**TWO_WORKERS)) == {"CPU": 1.0}
    assert worker_resources(tiny_config(scaling={"num_workers": 4})) == {"CPU": 0.5}
