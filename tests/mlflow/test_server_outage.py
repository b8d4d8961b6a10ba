"""A real ``mlflow server`` on 127.0.0.1 that the tests stop and start while a run
trains (local mode, so a test callback can time the outage to an epoch): nothing
tracked is lost, and what could not be written at the end is finished by
``freezelab sync``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from servers import Server

from freezelab.api import train
from freezelab.cli import main
from freezelab.mlflow.tracked import SYNC_FILE


@pytest.fixture
def server(tmp_path):
    started = Server(tmp_path / "server")
    started.start()
    yield started
    started.stop()


class Outage:
    """A Train callback that stops the server as epoch ``stop_at`` reports and starts
    it again as epoch ``start_at`` reports (after MLflow's callback, which runs first,
    has logged, or failed to log, that epoch)."""

    def __init__(self, server: Server, stop_at: int, start_at: int | None = None):
        self.server, self.stop_at, self.start_at = server, stop_at, start_at

    def after_report(self, run_context, metrics, checkpoint) -> None:
        epoch = metrics[0]["epoch"]
        if epoch == self.stop_at:
            self.server.stop()
        if epoch == self.start_at:
            self.server.start()


def _config(tiny_config, server: Server, **update):
    return tiny_config(
        name="outage",
        epochs=5,
        mlflow={"enabled": True, "tracking_uri": server.uri, "experiment": "outage", **update},
    )


def _epochs(client, run_id: str, key: str = "run/epoch") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_server_back_mid_run_gets_every_epoch_once(tiny_config, server, capsys):
    config = _config(tiny_config, server)
    tracked = train(config, callbacks=[Outage(server, stop_at=1, start_at=3)])
    out = capsys.readouterr().out
    assert "is unreachable" in out and "reachable again" in out
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert _epochs(client, run.info.run_id) == [0, 1, 2, 3, 4]
    values = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
    ]
    assert values == [h["val_acc"] for h in tracked.outcome.history]
    assert tracked.model_uri is not None
    assert not (Path(config.storage_path) / config.name / SYNC_FILE).exists()


def test_a_server_away_at_the_end_leaves_the_run_to_freezelab_sync(
    tiny_config, server, capsys, tmp_path, monkeypatch
):
    config = _config(tiny_config, server, sync_timeout_s=2)
    tracked = train(config, callbacks=[Outage(server, stop_at=1)])
    out = capsys.readouterr().out
    run_dir = Path(config.storage_path) / config.name
    # Training finished; the end of the run waited, then said how to finish it later.
    assert len(tracked.outcome.history) == 5 and tracked.model_uri is None
    assert f"freezelab sync {run_dir}" in out and "retrying in" in out
    assert (run_dir / SYNC_FILE).is_file()

    server.start()
    client = mlflow.MlflowClient(server.uri)
    assert client.get_run(tracked.run_id).info.status == "RUNNING"
    assert _epochs(client, tracked.run_id) == [0, 1]  # logged before the server went away
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the marker names the run: sync works from any folder
    assert main(["sync", str(run_dir)]) == 0
    assert f"synced run {tracked.run_id}" in capsys.readouterr().out

    def state():
        run = client.get_run(tracked.run_id)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{tracked.run_id}'",
        )
        history = {
            key: [(m.step, m.value) for m in client.get_metric_history(tracked.run_id, key)]
            for key in ("run/epoch", "val_acc", "cost/wall_s")
        }
        return run.info.status, [m.model_id for m in models], history

    status, models, history = state()
    assert status == "FINISHED" and len(models) == 1
    assert sorted(step for step, _ in history["run/epoch"]) == [0, 1, 2, 3, 4]
    assert sorted(history["val_acc"]) == [
        (h["epoch"], h["val_acc"]) for h in tracked.outcome.history
    ]
    (logged,) = client.search_logged_models(
        experiment_ids=[client.get_run(tracked.run_id).info.experiment_id],
        filter_string=f"source_run_id = '{tracked.run_id}'",
    )
    assert {m.key: m.step for m in logged.metrics}["val_acc"] == 4
    assert not (run_dir / SYNC_FILE).exists()

    # A second sync changes nothing.
    assert main(["sync", str(run_dir)]) == 0
    assert "nothing to sync" in capsys.readouterr().out
    assert state() == (status, models, history)


def test_sync_of_a_folder_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["sync", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
