"""Rotated-pole, Lambert conformal and polar stereographic grids (CF grid mappings read by pyproj): where the cells
are on Earth, static fields over each cell's footprint, the pipeline, streaming to netCDF and zarr with the grid
mapping kept, fine-tuning, the regridding step for lat/lon input, and the refusals (tiny models, seconds each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_pipeline

from dpdm_diffusers import data
from dpdm_diffusers.grids import Grid, area_weights, grid_dims, lat_lon_names
from dpdm_diffusers.native_grids import native_axes, native_grid

ROTATED = {"grid_mapping_name": "rotated_latitude_longitude", "grid_north_pole_latitude": 37.5,
           "grid_north_pole_longitude": 177.5}  # the UK 1.5 km model's pole (iris-sample-data uk_hires.pp)
LAMBERT = {"grid_mapping_name": "lambert_conformal_conic", "standard_parallel": [40.0, 50.0],
           "longitude_of_central_meridian": 10.0, "latitude_of_projection_origin": 46.0}  # over the Alps
POLAR = {"grid_mapping_name": "polar_stereographic", "straight_vertical_longitude_from_pole": -45.0,
         "latitude_of_projection_origin": 90.0, "standard_parallel": 70.0}  # NSIDC-like Arctic
KINDS = {
    # name: (attrs, y centres, x centres, axis names, units)
    "rotated": (ROTATED, -1.0 + 0.25 * np.arange(8), 358.0 + 0.25 * np.arange(10), ("rlat", "rlon"), "degrees"),
    "lambert": (LAMBERT, -100e3 + 25e3 * np.arange(8), -125e3 + 25e3 * np.arange(10), ("y", "x"), "m"),
    "polar": (POLAR, -1000.0 + 50.0 * np.arange(8), 200.0 + 50.0 * np.arange(10), ("y", "x"), "km"),
}


def native_dataset(kind: str, ntime=2, factor=1, name="tas", seed=0) -> xr.Dataset:
    """A field on ``kind``'s grid (refined by ``factor``) that depends on geography, laid out as a CF file: the native
    axes with their standard names, 2-D lat/lon, and the grid-mapping variable the data point to."""
    attrs, y, x, (yn, xn), units = KINDS[kind]
    grid = native_grid(attrs, y, x, "crs", units).refine(factor)
    lat, lon = grid.geographic()
    rng = np.random.default_rng(seed)
    base = 280 + 0.5 * (lat - 50) + 2 * np.sin(np.deg2rad(lon) * 20)
    vals = np.stack([base + rng.normal(0, 0.3, base.shape) for _ in range(ntime)]).astype("float32")
    std = ("grid_latitude", "grid_longitude") if kind == "rotated" else ("projection_y_coordinate", "projection_x_coordinate")
    time = np.array([f"2001-{m + 1:02d}-16" for m in range(ntime)], dtype="datetime64[ns]")
    return xr.Dataset(
        {name: (("time", yn, xn), vals, {"units": "K", "grid_mapping": "crs", "standard_name": "air_temperature"}),
         "crs": ((), np.int32(0), attrs)},
        coords={"time": ("time", time, {"standard_name": "time"}), yn: (yn, grid.y, {"standard_name": std[0], "units": units}),
                xn: (xn, grid.x, {"standard_name": std[1], "units": units}),
                "lat": ((yn, xn), lat, {"units": "degrees_north"}), "lon": ((yn, xn), lon, {"units": "degrees_east"})})


# --- where the cells are -------------------------------------------------------------------------------------
def test_pyproj_places_each_grid_where_its_mapping_says():
    # rotated (0, 0) about the pole (37.5N, 177.5E) is at 52.5N, 2.5W; a projection's origin is its (lat_0, lon_0)
    rot = native_grid(ROTATED, [0.0, 0.1], [0.0, 0.1], "rotated_pole", "degrees")
    lat, lon = rot.mapping.to_geographic(0.0, 0.0)
    assert np.isclose(lat, 52.5) and np.isclose(lon, -2.5) and rot.mapping.name == "rotated_pole"
    lam = native_grid(LAMBERT, [0.0, 1.0], [0.0, 1.0])
    assert np.allclose(lam.mapping.to_geographic(0.0, 0.0), (46.0, 10.0))
    # km axes are scaled: 1000 km along x from the pole (y=0) on the -45 meridian's perpendicular
    polar = native_grid(POLAR, [0.0, 1.0], [0.0, 1.0], axis_units="km")
    assert np.isclose(polar.mapping.to_geographic(0.0, 0.0)[0], 90.0)
    assert 80.0 < polar.mapping.to_geographic(0.0, 1000.0)[0] < 82.0
    back = lam.mapping.from_geographic(*lam.mapping.to_geographic(5e4, -7e4))
    assert np.allclose(back, (5e4, -7e4), atol=1e-3)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_standardize_keeps_native_axes_as_y_x_and_never_as_latitude(kind):
    ds = native_dataset(kind)
    std = data.standardize(ds)
    assert grid_dims(std) == ("y", "x") and "lat" not in std.variables and "crs" in std.coords
    grid = Grid.from_xarray(std)
    assert grid.native and not grid.periodic and grid.mapping.kind == KINDS[kind][0]["grid_mapping_name"]
    with pytest.raises(ValueError, match="not latitude/longitude"):
        lat_lon_names(ds)  # rlat/y would otherwise be read as latitude
    layout = data.input_layout(ds)
    back = data.restore_layout(std, layout)
    assert back[KINDS[kind][3][0]].size == ds.sizes[KINDS[kind][3][0]]
    # area weights: cos(rotated latitude) on a rotated grid, equal on a projected one
    w = area_weights(grid)
    assert np.allclose(w, np.cos(np.deg2rad(grid.y))[:, None]) if kind == "rotated" else np.allclose(w, 1.0)


def test_float32_axis_jitter_is_accepted_and_snapped():
    # uk_hires.pp's grid_longitude is float32 near 360 with a 0.0135-degree step: rounding jitters it by 2e-3 of a step
    ds = native_dataset("rotated")
    x = (359.0 + 0.0135 * np.arange(ds.sizes["rlon"])).astype(np.float32)
    ds = ds.assign_coords(rlon=("rlon", x, ds["rlon"].attrs)).drop_vars(["lat", "lon"])
    std = data.standardize(ds)
    assert np.allclose(np.diff(std["x"].values), np.diff(std["x"].values)[0], rtol=0, atol=1e-12)


# --- refusals ------------------------------------------------------------------------------------------------
def test_unreadable_mapping_inconsistent_lat_lon_and_curvilinear_grids_are_refused_by_name():
    bad = native_dataset("lambert")
    bad["crs"].attrs = {"grid_mapping_name": "no_such_projection"}
    with pytest.raises(ValueError, match="'crs' .*no_such_projection.*cannot be read by pyproj"):
        data.standardize(bad)
    moved = native_dataset("rotated")
    moved["crs"].attrs = {**ROTATED, "grid_north_pole_latitude": 39.5}  # the file's lat/lon say 37.5
    with pytest.raises(ValueError, match="disagree with its grid mapping"):
        data.standardize(moved)
    curvi = native_dataset("lambert").drop_vars(["y", "x"]).rename({"y": "j", "x": "i"})
    with pytest.raises(ValueError, match="no 1-D axes in its coordinates"):
        data.standardize(curvi)
    nomap = native_dataset("rotated").drop_vars(["crs", "lat", "lon"])
    del nomap["tas"].attrs["grid_mapping"]
    with pytest.raises(ValueError, match="no CF grid_mapping variable"):
        data.standardize(nomap)


def test_a_coarse_grid_that_does_not_nest_in_the_target_is_refused():
    pipe = make_pipeline(static=())
    low = native_dataset("lambert")
    target = native_dataset("lambert", factor=3)  # 3x, the model is 4x
    with pytest.raises(ValueError, match="Wrong scale factor"):
        pipe(low, target_grid=target, num_members=1, num_inference_steps=1)
    other = native_dataset("polar", factor=4)
    with pytest.raises(ValueError, match="same kind of grid"):
        pipe(low, target_grid=other, num_members=1, num_inference_steps=1)


# --- static fields -------------------------------------------------------------------------------------------
def test_static_fields_average_each_cells_footprint():
    from dpdm_diffusers.static_fields import get_static_fields

    # a pole at the north pole rotates nothing (rotated longitude = longitude + 180 - 180): the footprint average must
    # then agree with the exact spherical area average on the same lat/lon cells (Alps, 0.25 degree cells)
    trivial = {"grid_mapping_name": "rotated_latitude_longitude", "grid_north_pole_latitude": 90.0,
               "grid_north_pole_longitude": 180.0}
    lat, lon = 44.125 + 0.25 * np.arange(16), 5.125 + 0.25 * np.arange(24)
    native = native_grid(trivial, lat, lon, "rotated_pole", "degrees")
    assert np.allclose(native.geographic()[0], lat[:, None]) and np.allclose(native.geographic()[1], lon[None, :])
    a = get_static_fields(native)
    b = get_static_fields(Grid(lat, lon))
    assert a["topography"].dims == ("y", "x") and a["topography"].attrs["grid_mapping"] == "rotated_pole"
    assert np.abs(a["topography"].values - b["topography"].values).mean() < 0.05 * b["topography"].values.std()
    assert np.abs(a["land_sea_mask"].values - b["land_sea_mask"].values).mean() < 0.03
    assert b["topography"].values.max() > 2000  # the Alps are in there


# --- pipeline, streaming, round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pipeline_output_keeps_native_dims_2d_lat_lon_and_the_grid_mapping(kind):
    pipe = make_pipeline()
    ds = native_dataset(kind)
    out = pipe(ds, num_members=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    yn, xn = KINDS[kind][3]
    m = out.members["tas"]
    assert m.dims == ("member", "time", yn, xn) and m.shape[-2:] == (32, 40)
    assert m.attrs["grid_mapping"] == "crs" and out.members["crs"].attrs["grid_mapping_name"] == KINDS[kind][0]["grid_mapping_name"]
    fine = native_dataset(kind, factor=4)  # the same grid refined 4x: where the output's cells must be
    assert np.allclose(out.members[yn], fine[yn]) and np.allclose(out.members[xn], fine[xn])
    assert np.allclose(out.members["lat"], fine["lat"], atol=1e-6) and np.allclose(out.members["lon"], fine["lon"], atol=1e-6)
    assert np.isfinite(m.values).all() and abs(float(m.mean()) - float(ds["tas"].mean())) < 5
    # conservation works on the native grid's block means
    cons = pipe(ds, num_members=1, num_inference_steps=1, generator=torch.Generator().manual_seed(0), conserve=True).members["tas"]
    block = cons.coarsen({yn: 4, xn: 4}).mean().isel(member=0)
    assert np.allclose(block.values, ds["tas"].values, atol=1e-3)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dpdm_downscale_round_trip_keeps_the_grid_mapping(tmp_path, model_dir, kind, suffix):
    from dpdm_diffusers.cli import main

    src = tmp_path / f"{kind}.nc"
    native_dataset(kind, ntime=3).to_netcdf(src)
    out = tmp_path / f"fine{suffix}"
    with pytest.raises(SystemExit) as done:
        main(["downscale", str(src), "-o", str(out), "--model", str(model_dir), "--members", "2", "--steps", "1",
              "--chunk-size", "2", "--quiet"])
    assert done.value.code in (0, None)
    res = xr.open_zarr(out) if suffix == ".zarr" else xr.open_dataset(out)
    axes = native_axes(res)
    yn, xn = KINDS[kind][3]
    assert axes is not None and (axes.y, axes.x) == (yn, xn)
    expected = native_axes(native_dataset(kind)).mapping
    assert axes.mapping.crs == expected.crs and axes.mapping.name == expected.name == "crs"
    assert res["tas"].dims == ("member", "time", yn, xn) and res["lat"].dims == (yn, xn)
    assert res["tas_mean"].attrs["grid_mapping"] == "crs" and res[yn].attrs["units"] == KINDS[kind][4]
    fine = native_dataset(kind, factor=4)
    assert np.allclose(res["lat"], fine["lat"], atol=1e-6) and np.isfinite(res["tas"].values).all()
    # and it reads back as the same native grid, so it can be scored or downscaled again
    assert Grid.from_xarray(data.standardize(res)).mapping == Grid.from_xarray(data.standardize(fine)).mapping


# --- lat/lon input for a native target -----------------------------------------------------------------------
def test_regrid_to_native_bilinear_is_exact_for_linear_fields_and_conservative_keeps_means():
    lat = np.arange(40.0, 53.0, 0.5)
    lon = np.arange(0.0, 21.0, 0.5)
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    src = xr.Dataset({"tas": (("time", "lat", "lon"), (270 + 0.7 * yy + 0.2 * xx)[None], {"units": "K"})},
                     coords={"time": [np.datetime64("2001-01-16", "ns")], "lat": ("lat", lat, {"units": "degrees_north"}),
                             "lon": ("lon", lon, {"units": "degrees_east"})})
    target = native_grid(LAMBERT, -100e3 + 50e3 * np.arange(5), -100e3 + 50e3 * np.arange(6))
    out = data.regrid_to_native(src, target, "bilinear")
    glat, glon = target.geographic()
    assert out["tas"].dims == ("time", "y", "x") and out["tas"].attrs["grid_mapping"] == "crs"
    assert np.allclose(out["tas"].isel(time=0), 270 + 0.7 * glat + 0.2 * glon, atol=1e-6)
    cons = data.regrid_to_native(src, target, "conservative")
    assert abs(float(cons["tas"].mean()) - float(out["tas"].mean())) < 0.2  # a linear field's cell means = centre values
    assert Grid.from_xarray(data.standardize(out)).mapping == target.mapping  # ready for dpdm downscale
    with pytest.raises(ValueError, match="lie outside the lat/lon source"):
        data.regrid_to_native(src.sel(lat=slice(47, None)), target)


# --- fine-tuning ---------------------------------------------------------------------------------------------
def test_a_lambert_region_fine_tunes_from_its_file_and_downscales_on_its_grid(tmp_path):
    import json

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.modeling import build_unet, default_sampler
    from dpdm_diffusers.training.finetune import finetune
    from dpdm_diffusers.user_data import load_region

    path = tmp_path / "alps.nc"
    native_dataset("lambert", ntime=6, factor=4).to_netcdf(path)
    region = load_region(str(path), scale_factor=4, static_channels=["topography", "land_sea_mask"],
                         validation_lat_box=[45.0, 47.0], validation_lon_box=[9.0, 11.0])
    assert region.pairs.grid.native and region.static["topography"].dims == ("y", "x")
    assert dict(region.pairs.low_res.sizes) == {"time": 6, "y": 8, "x": 10}
    rows, cols = region.validation_box  # the coarse cells whose centres are in the box, in fine indices
    lat, lon = region.pairs.grid.geographic()
    assert 45 < lat[rows, cols].mean() < 47 and 9 < lon[rows, cols].mean() < 11

    torch.manual_seed(0)
    stats = dict(variables=["tas"], units=["K"], transforms=["identity"], norm_mean=[285.0], norm_std=[5.0],
                 residual_std=[0.5], static_channels=[], static_mean=[], static_std=[], scale_factor=4, patch_size=16)
    DownscalingPipeline(unet=build_unet(1, 0, 16, "tiny"), scheduler=default_sampler(), objective="regression",
                        **stats).save_pretrained(tmp_path / "base")
    out = finetune([str(path)], output_dir=tmp_path / "alps-model", model=str(tmp_path / "base"), steps=2,
                   batch_size=4, validation_lat_box="45,47", validation_lon_box="9,11", lr_warmup_steps=0,
                   validation_members=1, validation_inference_steps=1, validation_steps=0, checkpointing_steps=0)
    assert np.isfinite(json.loads((out / "training_summary.json").read_text())["val_rmse_mean"])
    tuned = DownscalingPipeline.from_pretrained(out)
    res = tuned(data.coarsen(data.standardize(xr.open_dataset(path)), 4), num_members=1, num_inference_steps=1)
    assert res.mean["tas"].dims == ("time", "y", "x") and res.mean["tas"].attrs["grid_mapping"] == "crs"


def test_dpdm_regrid_puts_lat_lon_input_on_the_coarse_native_grid_that_downscales_onto_the_target(tmp_path, model_dir):
    from dpdm_diffusers.cli import main

    fine = native_dataset("rotated", factor=4)  # the regional model's grid (e.g. your high-res training files)
    fine.to_netcdf(tmp_path / "fine.nc")
    glat, glon = fine["lat"].values, fine["lon"].values
    lat = np.arange(np.floor(glat.min()) - 1, glat.max() + 1, 0.5)
    lon = np.arange(np.floor(glon.min()) - 1, glon.max() + 1, 0.5)
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    gcm = xr.Dataset({"tas": (("time", "lat", "lon"), (280 + 0.3 * yy - 0.1 * xx)[None].astype("f4"), {"units": "K"})},
                     coords={"time": [np.datetime64("2001-01-16", "ns")], "lat": ("lat", lat, {"units": "degrees_north"}),
                             "lon": ("lon", lon, {"units": "degrees_east"})})
    gcm.to_netcdf(tmp_path / "gcm.nc")
    for argv in (["regrid", str(tmp_path / "gcm.nc"), "-o", str(tmp_path / "coarse.nc"), "--like", str(tmp_path / "fine.nc"),
                  "--scale-factor", "4"],
                 ["downscale", str(tmp_path / "coarse.nc"), "-o", str(tmp_path / "out.nc"), "--model", str(model_dir),
                  "--members", "1", "--steps", "1", "--quiet"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None), argv
    coarse = xr.open_dataset(tmp_path / "coarse.nc")
    assert coarse["tas"].dims == ("time", "rlat", "rlon") and coarse.sizes["rlat"] * 4 == fine.sizes["rlat"]
    assert np.allclose(coarse["tas"].isel(time=0), 280 + 0.3 * coarse["lat"] - 0.1 * coarse["lon"], atol=1e-3)
    out = xr.open_dataset(tmp_path / "out.nc")
    assert np.allclose(out["rlat"], fine["rlat"]) and np.allclose(out["rlon"], fine["rlon"])
    assert np.allclose(out["lat"], fine["lat"], atol=1e-6)
    with pytest.raises(SystemExit) as refused:  # a lat/lon target needs no regrid step
        main(["regrid", str(tmp_path / "gcm.nc"), "-o", str(tmp_path / "x.nc"), "--like", str(tmp_path / "gcm.nc")])
    assert refused.value.code == 2


# --- scoring and calibrating on a native grid -----------------------------------------------------------------
def test_dpdm_evaluate_scores_files_on_a_projected_grid_with_equal_area_weights(tmp_path):
    import json

    from typer.testing import CliRunner

    from dpdm_diffusers.cli import app

    truth = data.standardize(native_dataset("lambert", ntime=3, factor=4))
    truth.to_netcdf(tmp_path / "truth.nc")
    data.coarsen(truth, 4).to_netcdf(tmp_path / "low.nc")
    ens = xr.concat([truth + d for d in (0.5, 1.0, 1.5)], "member")
    ens["tas"].attrs = truth["tas"].attrs
    ens.to_netcdf(tmp_path / "ens.nc")
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "truth.nc"), "--forecast", f"dpdm={tmp_path / 'ens.nc'}",
                                   "--low-res", str(tmp_path / "low.nc"), "--out-dir", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval" / "scores.json").read_text())
    table = {(r["method"], r["metric"]): r["value"] for r in report["climate"] if r["variable"] == "tas"}
    assert table[("dpdm", "bias")] == pytest.approx(1.0, abs=1e-6) and ("bicubic", "bias") in table


def test_dpdm_calibrate_runs_on_a_rotated_file(tmp_path):
    import json

    import torch
    from typer.testing import CliRunner

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.cli import app
    from dpdm_diffusers.modeling import build_unet, default_sampler

    native_dataset("rotated", ntime=4, factor=4).to_netcdf(tmp_path / "rot.nc")
    torch.manual_seed(0)
    stats = dict(variables=["tas"], units=["K"], transforms=["identity"], norm_mean=[285.0], norm_std=[5.0],
                 residual_std=[0.5], static_channels=[], static_mean=[], static_std=[], scale_factor=4, patch_size=16)
    DownscalingPipeline(unet=build_unet(1, 0, 16, "tiny"), regression_unet=build_unet(1, 0, 16, "tiny"),
                        scheduler=default_sampler(), stochastic_std=[0.4], **stats).save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "rot.nc"), "--model", str(tmp_path / "m"),
                                   "--validation-time", "2001-03,2001-04", "--members", "2", "--steps", "1", "--write"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["stochastic_std"] != [0.4]


# --- real rotated-pole data -----------------------------------------------------------------------------------
def test_real_rotated_pole_file_is_placed_over_the_north_atlantic_and_europe():
    iris = pytest.importorskip("iris")
    from dpdm_diffusers.static_fields import get_static_fields

    ds = xr.open_dataset(iris.sample_data_path("rotated_pole.nc"))  # UM MSLP, 22 x 36 cells of 2.2 rotated degrees
    std = data.standardize(ds)
    grid = Grid.from_xarray(std)
    assert grid.mapping.rotated and grid.shape == (22, 36)
    lat, lon = grid.geographic()
    assert 15 < lat.min() and lat.max() < 77 and -88 < lon.min() and lon.max() < 68
    land = get_static_fields(grid, ["land_sea_mask"])["land_sea_mask"].values
    i, j = np.unravel_index(np.argmin(np.hypot(lat - 52.0, (lon + 1.0) * 0.6)), lat.shape)  # England
    k, m = np.unravel_index(np.argmin(np.hypot(lat - 45.0, (lon + 30.0) * 0.7)), lat.shape)  # mid-Atlantic
    assert land[i, j] > 0.6 and land[k, m] == 0.0
    # a lat/lon field put on it and read back as the same grid
    src = xr.Dataset({"t": (("lat", "lon"), np.fromfunction(lambda a, b: 250 + a * 0.5, (91, 360)), {"units": "K"})},
                     coords={"lat": ("lat", np.arange(91.0) - 0.0, {"units": "degrees_north"}),
                             "lon": ("lon", np.arange(360.0) - 180.0, {"units": "degrees_east"})})
    out = data.regrid_to_native(src, grid)
    assert np.allclose(out["t"], 250 + 0.5 * lat, atol=1e-6)


@pytest.mark.parametrize("kind", ["rotated", "lambert"])
def test_native_output_passes_the_cf_checker(kind, model_dir, tmp_path):
    pytest.importorskip("compliance_checker")
    from test_cf_output import cf_problems

    from dpdm_diffusers.workflows import downscale_file

    src = tmp_path / f"{kind}.nc"
    native_dataset(kind, ntime=2).to_netcdf(src)
    out = tmp_path / f"{kind}-x4.nc"
    downscale_file(src, out, model=str(model_dir), num_members=2, num_inference_steps=1, progress=False)
    errors, warnings = cf_problems(out, tmp_path)
    assert errors == []
    assert all("cell_methods name component member" in m for _, m in warnings), warnings


def test_fine_tuning_data_at_another_scale_warns_to_recompute_statistics(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from dpdm_diffusers.training.data import warn_scale_change
    from dpdm_diffusers.user_data import load_region

    path = tmp_path / "uk-like.nc"
    native_dataset("rotated", ntime=3, factor=4).to_netcdf(path)  # detail of 0.3 K against a std of 5 K
    pairs = load_region(str(path), scale_factor=4).pairs
    stats = dict(variables=["tas"], transforms=["identity"], norm_std=[5.0], residual_std=[0.5])
    with caplog.at_level(logging.WARNING, logger="dpdm_diffusers.training"):
        assert warn_scale_change(pairs, SimpleNamespace(interpolation="bilinear"), stats, None) == ["tas"]
    assert "--recompute-statistics" in caplog.text
    stats["residual_std"] = [0.05]  # a base model trained on detail this small: no warning
    assert warn_scale_change(pairs, SimpleNamespace(interpolation="bilinear"), stats, None) == []


def test_a_native_run_resumes_after_a_failure_and_another_pole_is_refused(tmp_path, model_dir):
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.reconstruct import partial_path, reconstruct

    pipe = DownscalingPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    low = data.standardize(native_dataset("rotated", ntime=6))
    kw = dict(num_members=2, num_inference_steps=1, seed=0, progress=False, chunk_size=2)
    full = reconstruct(pipe, low, tmp_path / "full.zarr", **kw)
    calls, real = [], pipe.__call__

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # one call per chunk: the third (last) chunk dies
            raise RuntimeError("simulated kill")
        return real(*a, **k)

    flaky = DownscalingPipeline.from_pretrained(model_dir)
    flaky.__class__ = type("Flaky", (DownscalingPipeline,), {"__call__": lambda self, *a, **k: dying(*a, **k)})
    with pytest.raises(RuntimeError, match="simulated kill"):
        reconstruct(flaky, low, tmp_path / "part.zarr", **kw)
    assert partial_path(tmp_path / "part.zarr").exists()
    moved = low.assign_coords(crs=low["crs"].assign_attrs(grid_north_pole_latitude=38.0))  # same axes, other place
    with pytest.raises(ValueError, match="input_coords"):
        reconstruct(pipe, moved, tmp_path / "part.zarr", **kw)
    res = reconstruct(pipe, low, tmp_path / "part.zarr", **kw)
    assert (res.chunks_total, res.chunks_computed) == (3, 1)  # the two finished chunks were kept
    a, b = xr.open_zarr(full.path), xr.open_zarr(res.path)
    np.testing.assert_array_equal(a["tas"].values, b["tas"].values)
    assert native_axes(b).mapping == native_axes(low).mapping


def test_a_dataarray_that_left_its_grid_mapping_behind_is_refused_with_the_fix():
    ds = native_dataset("rotated")
    with pytest.raises(ValueError, match=r"ds.set_coords\('crs'\)\[var\]"):
        make_pipeline(static=())(ds["tas"], num_members=1, num_inference_steps=1)
    out = make_pipeline(static=())(ds.set_coords("crs")["tas"], num_members=1, num_inference_steps=1)
    assert out.members.dims == ("member", "time", "rlat", "rlon") and out.members.attrs["grid_mapping"] == "crs"


def test_maps_of_a_native_field_are_labelled_with_its_own_axes(tmp_path):
    from dpdm_diffusers import plots

    ds = native_dataset("rotated")
    field = ds.set_coords("crs")["tas"].isel(time=0)
    assert plots._axis_labels(field, True) == ("rlon (degrees)", "rlat (degrees)")
    assert plots.plot_maps(field, field, field, field, field * 0, tmp_path / "m.png").stat().st_size > 1000
