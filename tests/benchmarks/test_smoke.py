"""Every benchmark script runs in ``--smoke`` mode (tiny sizes, 1 repeat), prints its
table, and holds one claim that its section of BENCHMARKS.md makes, read from its
``--json`` rows. A claim on time holds with a wide margin only, as the machine is shared;
where the tiny sizes cannot show a section's claim, the check says what it reads instead."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
Rows = list[dict]


def _by(rows: Rows, key: str) -> dict[str, dict]:
    return {row[key]: row for row in rows if key in row}


def _traffic_is_the_trainable_params(rows: Rows) -> None:
    # Section 4: the bytes all-reduced per step are the trainable parameters x 4 bytes.
    for row in rows:
        assert row["MB_per_step"] == row["expected_MB"] and row["matches_trainable"], row
        assert row["same_every_repeat"], row


def _head_only_step_is_cheaper_than_full(rows: Rows) -> None:
    # Section 1: no gradient reaches the backbone (0.27x on the full sizes).
    policies = _by(rows, "policy")
    assert policies["head_only"]["trainable"] < policies["full"]["trainable"]
    assert policies["head_only"]["ratio_vs_full"] < 1.0, policies["head_only"]


def _cached_epochs_are_faster(rows: Rows) -> None:
    # Section 2: the epochs after the first skip the backbone (469x on the full sizes;
    # 13-73x at the smoke sizes, test_resnet at 128 px, on a loaded 2-core machine). The
    # script itself exits non-zero when such an epoch did not use the cache.
    sides = _by(rows, "feature_cache")
    assert set(sides) == {"on", "off"}
    assert all(side["epochs_counted"] >= 3 for side in sides.values())
    assert sides["on"]["speedup_vs_off"] > 1.5, sides


def _cached_head_only_beats_lightnings_frozen_phase(rows: Rows) -> None:
    # Section 5: freezelab's frozen phase with the cache, 0.0025x of Lightning's.
    sides = _by(rows, "side")
    assert sides["freezelab+cache"]["time_vs_lightning"] < 0.5, sides["freezelab+cache"]


def _asha_trains_no_more_than_the_grid(rows: Rows) -> None:
    # Section 6: ASHA stops trials early, so it never trains more trial-epochs.
    sweeps = _by(rows, "sweep")
    assert sweeps["asha"]["trial_epochs"] <= sweeps["grid"]["trial_epochs"], sweeps


def _advise_spends_no_more_than_it_planned(rows: Rows) -> None:
    # Section 10: advise's short runs, counted by the loop, stay within the plan that
    # its budget sized; its pick is one of the study's policies, which the study ranked.
    tasks = [row for row in rows if "flops_share" in row]
    assert tasks, rows
    for row in tasks:
        assert 0 < row["flops_share"] <= row["planned_share"] * (1 + 1e-9), row
        assert row["advise_pick"].split(" lr=")[0] in {r["policy"] for r in rows if "policy" in r}


def _every_path_delivers_images(rows: Rows) -> None:
    # Section 9: the four paths, each with a rate and the cores it used.
    paths = _by(rows, "path")
    assert set(paths) == {
        "dataloader nw=0",
        "dataloader nw=2",
        "ray_data local",
        "ray_data s3 (moto)",
    }
    assert all(p["images_per_s"] > 0 and p["images_per_core_s"] > 0 for p in paths.values())


def _runs_side_by_side_give_the_same_accuracies(rows: Rows) -> None:
    # Section 8: a run's accuracies do not depend on the runs beside it.
    assert all(row["same_accuracies"] for row in rows if "same_accuracies" in row), rows
    assert rows[0]["runs"] == 4, rows[0]


def _selection_trains_well_under_the_full_grid(rows: Rows) -> None:
    # Section 11: successive halving stops the values that fall behind, so choosing each
    # policy's rate trains fewer epochs than every rate to the end (0.56x on the full
    # sizes; at the smoke sizes, 3 epochs, only the first rung can stop a run).
    studies = _by(rows, "study")
    selection, grid = studies["selection (ASHA)"], studies["full grid"]
    assert 0 < selection["choosing_epochs"] < grid["choosing_epochs"], studies


# name: (the table's title, the claim checked on its rows or None where the smoke sizes
# cannot show one, and the marks it needs)
SCRIPTS: dict[str, tuple[str, Callable[[Rows], None] | None, tuple]] = {
    "freeze_compute": ("freeze_compute: ", _head_only_step_is_cheaper_than_full, ()),
    "compile_step": ("compile_step: ", None, ()),
    "feature_cache": ("feature_cache: ", _cached_epochs_are_faster, ()),
    "overhead": ("overhead: ", None, ()),
    "ddp_traffic": ("ddp_traffic: ", _traffic_is_the_trainable_params, ()),
    "train_overhead": ("train_overhead: ", None, ()),
    "lightning_compare": (
        "lightning_compare: ",
        _cached_head_only_beats_lightnings_frozen_phase,
        (),
    ),
    "sweep_efficiency": (
        "sweep_efficiency: ",
        _asha_trains_no_more_than_the_grid,
        (pytest.mark.ray,),
    ),
    "advise_vs_sweep": (
        "advise_vs_sweep: ",
        _advise_spends_no_more_than_it_planned,
        (pytest.mark.ray,),
    ),
    "data_throughput": ("data_throughput: ", _every_path_delivers_images, (pytest.mark.ray,)),
    "lr_selection_cost": (
        "lr_selection_cost: ",
        _selection_trains_well_under_the_full_grid,
        (pytest.mark.ray,),
    ),
    "study_concurrency": (
        "study_concurrency: ",
        _runs_side_by_side_give_the_same_accuracies,
        (pytest.mark.ray,),
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=SCRIPTS[name][2]) for name in sorted(SCRIPTS)]
)
def test_script_runs_in_smoke_mode_and_holds_its_claim(name: str, tmp_path: Path) -> None:
    title, claim, _ = SCRIPTS[name]
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # Each smoke run takes under 50 s alone (sweep_efficiency starts Ray and runs two
        # Tune sweeps), but lr_selection_cost's three demos 2 minutes; the margin is for a
        # loaded 2-core machine.
        timeout=360,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert title in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows
    header = result.stdout.split(title, 1)[1].splitlines()[1]
    assert all(column in header for column in rows[0])
    if claim is not None:
        claim(rows)
