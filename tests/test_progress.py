"""The driver's progress display: plain lines off a terminal, bars on one, and the
feed that carries a Ray Train run's reports to it."""

from __future__ import annotations

import io
import json
import re

from freezelab.progress import EPOCH_KEYS, Progress, epoch_line, followed


def _epoch(epoch: int, val_acc: float = 0.5, phase: str = "main") -> dict:
    return {
        "epoch": epoch,
        "phase": phase,
        "train_loss": 1.0 / (epoch + 1),
        "train_acc": 0.5,
        "val_loss": 1.5,
        "val_acc": val_acc,
        "epoch_time_s": 1.25,
        "images_per_s": 812.4,
        "feature_cache": 0,
        "drift/head": 0.3,  # one of the ~40 other keys of a report
    }


def _plain() -> Progress:
    progress = Progress(stream=io.StringIO())
    assert not progress.live  # a StringIO is not a terminal
    return progress


def test_off_a_terminal_each_epoch_is_one_plain_line():
    progress = _plain()
    progress.start("k", "tiny-full", epochs=2)
    progress.update("k", _epoch(0, 0.25))
    progress.update("k", {"epoch": 1, "val_acc": 0.5})  # not an epoch report: ignored
    progress.update("other", _epoch(0))  # a run it was not told of: ignored
    progress.update("k", _epoch(1, 0.75, phase="unfrozen_1"))
    progress.finish("k")
    lines = progress.stream.getvalue().splitlines()
    assert lines == [
        epoch_line("tiny-full", 2, _epoch(0, 0.25)),
        epoch_line("tiny-full", 2, _epoch(1, 0.75, "unfrozen_1")),
    ]
    assert lines[1].startswith(
        "[freezelab] tiny-full epoch 2/2 phase unfrozen_1: train_loss 0.5000"
    )
    assert lines[1].endswith("val_acc 0.750 (1.2s, 812 img/s)")


def test_a_sweep_off_a_terminal_says_how_each_trial_ended_and_how_many_are_done():
    progress = _plain()
    progress.expect("sweep 'demo'", 3)
    progress.start("t1", "full", epochs=2)
    progress.start("t2", "head_only", epochs=2)
    progress.update("t2", _epoch(0))
    progress.update("t1", _epoch(0))
    progress.finish("t2", "stopped after 1 of 2 epoch(s)")
    progress.update("t1", _epoch(1))
    progress.finish("t1")
    progress.start("t3", "bitfit", epochs=2)
    progress.finish("t3", "failed: ValueError: boom")
    progress.close()
    text = progress.stream.getvalue()
    assert text.splitlines() == [
        epoch_line("head_only", 2, _epoch(0)),
        epoch_line("full", 2, _epoch(0)),
        "[freezelab] head_only: stopped after 1 of 2 epoch(s)",
        "[freezelab] trials finished: 1/3",
        epoch_line("full", 2, _epoch(1)),
        "[freezelab] trials finished: 2/3",
        "[freezelab] bitfit: failed: ValueError: boom",
        "[freezelab] trials finished: 3/3",
    ]


def _screen(raw: str) -> list[str]:
    """Each line a terminal draws: tqdm rewrites a line after a carriage return, and
    moves between bars with cursor codes."""
    raw = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw)
    return [part.strip() for part in re.split(r"[\r\n]", raw) if part.strip()]


def test_on_a_terminal_a_run_is_a_bar_with_its_epoch_metrics_and_time_left(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the terminal's width: nothing cut off
    progress = Progress(stream=io.StringIO(), live=True)
    progress.start("k", "tiny-full", epochs=4)
    progress.update("k", _epoch(0, 0.25))
    progress.update("k", _epoch(1, 0.625, phase="unfrozen_1"))
    progress.finish("k")
    shown = _screen(progress.stream.getvalue())
    last = shown[-1]
    assert last.startswith("tiny-full epoch 2/4 |")
    for part in ("ETA ", "val_acc 0.625", "train_loss 0.500", "812 img/s", "phase unfrozen_1"):
        assert part in last, last
    assert not any(line.startswith("[freezelab]") for line in shown)  # no plain lines too


def test_on_a_terminal_a_sweep_counts_finished_trials_and_keeps_a_line_per_trial():
    progress = Progress(stream=io.StringIO(), live=True)
    progress.expect("sweep 'demo'", 2)
    progress.start("t1", "full", epochs=2)
    progress.start("t2", "head_only", epochs=2)
    progress.update("t1", _epoch(0))
    progress.update("t2", _epoch(0, 0.125))
    progress.finish("t2", "stopped after 1 of 2 epoch(s)")
    shown = _screen(progress.stream.getvalue())
    assert any(s.startswith("full epoch 1/2 |") for s in shown)
    assert epoch_line("head_only", 2, _epoch(0, 0.125)) in shown  # a finished trial's last epoch
    assert "[freezelab] head_only: stopped after 1 of 2 epoch(s)" in shown
    assert any(s.startswith("[freezelab] sweep 'demo': trials finished 1/2") for s in shown)
    progress.close()


def test_a_ray_train_runs_reports_reach_the_display_through_its_feed_in_order():
    """The feed runs in the Train controller and appends a line per report; the
    driver's reader shows each complete line, and all of them by the run's end."""
    progress = _plain()
    with followed("tiny", 3, progress) as feed:
        from ray.train import UserCallback

        assert isinstance(feed, UserCallback)  # Ray Train takes it as a callback
        feed.after_report(None, [_epoch(0), _epoch(0)], None)  # one dict per worker
        with open(feed.path, "a") as out:  # a report half written when the reader looks
            out.write(json.dumps({k: _epoch(1)[k] for k in EPOCH_KEYS})[:20])
        written = open(feed.path).read().splitlines()
        assert json.loads(written[0]) == {k: _epoch(0)[k] for k in EPOCH_KEYS}
    text = progress.stream.getvalue()
    assert text.splitlines() == [epoch_line("tiny", 3, _epoch(0))]


def test_a_run_in_this_process_shows_each_epoch_as_it_is_reported():
    progress = _plain()
    with followed("tiny", 2, progress, ray_train=False) as feed:
        feed.after_report(None, [_epoch(0)], None)
        # shown at once, before the loop goes on: nothing waits for a reader
        assert progress.stream.getvalue() == epoch_line("tiny", 2, _epoch(0)) + "\n"
