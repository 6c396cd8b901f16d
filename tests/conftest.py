"""Shared fixtures: tiny seeded pipelines and small synthetic fields (diffusers test style)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import xarray as xr

from dpdm_diffusers.grids import Grid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def make_pipeline(
    variables=("tas",),
    units=None,
    transforms=None,
    static=("topography", "land_sea_mask"),
    patch_size=16,
    scale_factor=4,
    prediction="residual",
    seed=0,
):
    """A tiny pipeline with a seeded random UNet (weights made non-trivial, as diffusers' tests do)."""
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.modeling import build_unet, default_scheduler

    v = len(variables)
    torch.manual_seed(seed)
    unet = build_unet(v, len(static), patch_size, "tiny")
    pipe = DownscalingPipeline(
        unet=unet,
        scheduler=default_scheduler(),
        variables=list(variables),
        units=list(units or ["K"] * v),
        transforms=list(transforms or ["identity"] * v),
        norm_mean=[280.0] * v,
        norm_std=[10.0] * v,
        residual_std=[0.5] * v,
        static_channels=list(static),
        static_mean=[500.0, 0.3][: len(static)],
        static_std=[800.0, 0.4][: len(static)],
        scale_factor=scale_factor,
        patch_size=patch_size,
        prediction=prediction,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_low_res(nlat=6, nlon=8, ntime=2, lat0=10.0, lon0=100.0, step=1.0, variables=("tas",), units=None, seed=0):
    """A smooth coarse field with a time axis and CF-ish attributes."""
    rng = np.random.default_rng(seed)
    lat = lat0 + step * (np.arange(nlat) + 0.5)
    lon = lon0 + step * (np.arange(nlon) + 0.5)
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    data_vars = {}
    for i, v in enumerate(variables):
        base = 280 + 5 * np.sin(np.deg2rad(yy) * 8) + 3 * np.cos(np.deg2rad(xx) * 6) + i
        vals = np.stack([base + rng.normal(0, 0.5, base.shape) for _ in range(ntime)]).astype("float32")
        u = (units or ["K"] * len(variables))[i]
        data_vars[v] = (("time", "lat", "lon"), vals, {"units": u, "long_name": f"{v} field"})
    time = np.array([f"2000-{m + 1:02d}-01" for m in range(ntime)], dtype="datetime64[ns]")
    ds = xr.Dataset(
        data_vars,
        coords={"time": time, "lat": ("lat", lat, {"units": "degrees_north"}), "lon": ("lon", lon, {"units": "degrees_east"})},
        attrs={"title": "synthetic low-res"},
    )
    return ds


def make_record(ntime: int, nlat=6, nlon=8, noise: bool = True):
    """A monthly record (30-day steps from 2000-01-16) of one coarse field, each step shifted by a random offset
    (``noise``): the input of the long-reconstruction tests."""
    one = make_low_res(nlat=nlat, nlon=nlon, ntime=1)
    times = np.array([np.datetime64("2000-01-16") + np.timedelta64(30 * k, "D") for k in range(ntime)],
                     dtype="datetime64[ns]")
    rng = np.random.default_rng(0)
    ds = xr.concat([one.assign_coords(time=[t]) + (rng.normal(0, 1) if noise else 0.0) for t in times], "time")
    ds["tas"].attrs = one["tas"].attrs
    return ds


def make_static(grid: Grid, seed=1):
    """Topography (m) and land fraction on ``grid`` as a dict of DataArrays."""
    rng = np.random.default_rng(seed)
    coords = {"lat": grid.lat, "lon": grid.lon}
    topo = xr.DataArray(np.abs(rng.normal(300, 200, grid.shape)), coords=coords, dims=("lat", "lon"), attrs={"units": "m"})
    lsm = xr.DataArray(rng.uniform(0, 1, grid.shape), coords=coords, dims=("lat", "lon"))
    return {"topography": topo, "land_sea_mask": lsm}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny pipeline without static channels (folder name ``tiny``)."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    make_pipeline(static=()).save_pretrained(folder)
    return folder


@pytest.fixture
def pipe():
    return make_pipeline()


@pytest.fixture
def low_res():
    return make_low_res()


@pytest.fixture
def static(low_res):
    return make_static(Grid.from_xarray(low_res).refine(4))
