"""Every benchmark script runs in ``--smoke`` mode (tiny sizes, 1 repeat) and prints its
table. These check that the scripts work, not how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "freeze_compute": "freeze_compute: ",
    "compile_step": "compile_step: ",
    "feature_cache": "feature_cache: ",
    "overhead": "overhead: ",
    "ddp_traffic": "ddp_traffic: ",
    "train_overhead": "train_overhead: ",
    "lightning_compare": "lightning_compare: ",
    "sweep_efficiency": "sweep_efficiency: ",
    "advise_vs_sweep": "advise_vs_sweep: ",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_runs_in_smoke_mode_and_prints_its_table(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # Each smoke run takes under 50 s alone (sweep_efficiency starts Ray and runs two
        # Tune sweeps); the margin is for a loaded 2-core machine.
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert SCRIPTS[name] in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows
    header = result.stdout.split(SCRIPTS[name], 1)[1].splitlines()[1]
    assert all(column in header for column in rows[0])
