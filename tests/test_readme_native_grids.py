"""The README's rotated-pole (UK 1.5 km) and Lambert-conformal (North America) recipes run as written (fewer steps
and members) on real data, and their outputs keep the grid mapping."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dpdm_diffusers.native_grids import native_axes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(900)]
FAST = {"--steps 300": "--steps 2", "--regression-steps 300": "--regression-steps 2", "--members 10": "--members 2",
        "--validation-time 2001,2020": "--validation-time 2001,2003", "--time 2050,2099": "--time 2096,2099"}


def recipes() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Rotated-pole and projected grids"):text.index("## Five variables")]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def run(script: str, cwd: Path) -> None:
    for long, short in FAST.items():
        script = script.replace(long, short)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_readme_rotated_pole_recipe_fine_tunes_and_downscales_on_the_rotated_grid(tmp_path):
    pytest.importorskip("iris_sample_data")
    uk, _ = recipes()
    assert all(long in uk for long in ("--steps 300", "--regression-steps 300", "--members 10"))
    run(uk, tmp_path)
    out = xr.open_dataset(tmp_path / "runs" / "uk" / "theta-fine.nc")
    axes = native_axes(out)
    assert axes is not None and axes.mapping.rotated and dict(axes.mapping.attrs)["grid_north_pole_latitude"] == 37.5
    assert out.air_potential_temperature.shape == (2, 3, 204, 184) and out["lat"].dims == ("y", "x")
    assert 52.5 < float(out["lat"].min()) and float(out["lat"].max()) < 55.5  # the Irish Sea, Wales, NW England
    assert np.isfinite(out.air_potential_temperature.values).all()


def test_readme_lambert_recipe_regrids_a_lat_lon_scenario_fine_tunes_and_downscales(tmp_path):
    pytest.importorskip("iris_sample_data")
    _, lambert = recipes()
    assert all(long in lambert for long in FAST)  # every substitution still matches the README
    run(lambert, tmp_path)
    coarse = xr.open_dataset(tmp_path / "runs" / "a1b-lambert-coarse.nc")
    assert coarse.air_temperature.shape == (4, 7, 10) and native_axes(coarse).mapping.kind == "lambert_conformal_conic"
    out = xr.open_zarr(tmp_path / "runs" / "a1b-lambert-fine.zarr")
    assert out.air_temperature.dims == ("member", "time", "y", "x") and out.air_temperature.shape == (2, 4, 28, 40)
    assert out["lambert_conformal"].attrs["standard_parallel"] == [33.0, 45.0]
    assert np.isfinite(out.air_temperature.values).all() and 250 < float(out.air_temperature_mean.mean()) < 310
