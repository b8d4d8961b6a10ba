"""`freezelab demo` on its default path, as a user runs it: a Ray of its own, the
pretraining on 2 Ray Train workers, the study's fine-tuning runs as Ray Tune trials, the
tables, and that Ray stopped again when the command ends. Only the sizes are shrunk
(``tests/demo_command.py``; the README's demo command in ``tests/docs`` reads the same
run)."""

from __future__ import annotations

import pytest


@pytest.mark.ray  # the command starts a Ray of its own (in a subprocess)
def test_demo_pretrains_on_two_workers_runs_the_study_as_trials_and_stops_its_ray(demo_run):
    both = demo_run.out + demo_run.err
    assert demo_run.returncode == 0, both[-3000:]
    # The pretraining on Ray Train: each of its 2 workers reports the group it is in.
    assert "2 workers on 1 node(s)" in both, both[-3000:]
    # The fine-tuning runs as Tune trials, counted as they finish, then the tables.
    assert "trials finished: 12/12" in demo_run.out, both[-3000:]
    for variant in ("new-digits", "new-digits-inverted"):
        assert f"fine-tuning on the target '{variant}'" in demo_run.out, both[-3000:]
    assert "each setting over its seeds" in demo_run.out, both[-3000:]
    # Ray ran from the folder it was given, and none of its processes outlived the command.
    assert demo_run.ray_used_its_folder, "Ray did not use RAY_TMPDIR"
    assert not demo_run.ray_left, f"Ray processes left after freezelab demo: {demo_run.ray_left}"
