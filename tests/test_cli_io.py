"""The `dpdm` command line and atomic output writing."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import make_low_res, make_pipeline
from typer.testing import CliRunner

from dpdm_diffusers.cli import app
from dpdm_diffusers.io import ensemble_dataset, netcdf_encoding, write_dataset, zarr_encoding

runner = CliRunner()


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_write_dataset_round_trip_and_refuses_to_clobber(tmp_path, suffix):
    ds = make_low_res()
    path = write_dataset(ds, tmp_path / f"out{suffix}")
    back = xr.open_dataset(path, engine="zarr" if suffix == ".zarr" else None)
    np.testing.assert_allclose(back.tas.values, ds.tas.values)
    assert back.tas.attrs["units"] == "K"
    if suffix == ".zarr":  # Zarr format 2 with consolidated metadata, readable by zarr v2 and v3 alike
        assert (path / ".zgroup").exists() and (path / ".zmetadata").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(ds, path)
    write_dataset(ds + 1, path, overwrite=True)
    assert float(xr.open_dataset(path, engine="zarr" if suffix == ".zarr" else None).tas.mean()) == pytest.approx(float(ds.tas.mean()) + 1, rel=1e-6)
    assert not list(tmp_path.glob(".*partial"))


def test_one_encoding_per_format_compresses_the_fields(tmp_path):
    ds = make_low_res().assign(flag=(("lat", "lon"), np.zeros((6, 8), "i1")))
    enc = netcdf_encoding(ds)
    assert enc["tas"] == {"zlib": True, "complevel": 4, "dtype": "float32"} and "flag" not in enc  # floats only
    # CF: coordinates without _FillValue, times not as int64
    assert enc["lat"] == enc["lon"] == {"_FillValue": None} and enc["time"] == {"_FillValue": None, "dtype": "float64"}
    ds["tas"].encoding["chunks"] = (1, 100, 3)  # a zarr store's chunks, streamed to netCDF: clipped to the shape
    assert netcdf_encoding(ds, chunked=True)["tas"]["chunksizes"] == (1, 6, 3)
    assert "chunksizes" not in netcdf_encoding(ds)["tas"]
    assert set(zarr_encoding(ds)) == {"tas", "flag"}
    path = write_dataset(ds, tmp_path / "out.zarr")  # the writer uses it: zstd-compressed
    assert '"zstd"' in (path / "tas" / ".zarray").read_text()


def test_unknown_output_format(tmp_path):
    with pytest.raises(ValueError, match=".nc"):
        write_dataset(make_low_res(), tmp_path / "out.csv")


def test_ensemble_dataset_names_mean_and_std():
    ds = make_low_res()
    members = xr.concat([ds, ds + 2], dim="member")
    out = ensemble_dataset(members, members.mean("member"), members.std("member"))
    assert {"tas", "tas_mean", "tas_std"} <= set(out.data_vars)
    np.testing.assert_allclose(out.tas_mean, ds.tas + 1)


def test_cli_downscale_writes_members_mean_and_spread(tmp_path):
    pipe = make_pipeline(static=())
    pipe.save_pretrained(tmp_path / "model")
    make_low_res().to_netcdf(tmp_path / "low.nc")
    out = tmp_path / "fine.nc"
    args = ["downscale", str(tmp_path / "low.nc"), "-o", str(out), "--model", str(tmp_path / "model"),
            "--members", "3", "--steps", "2", "--scheduler", "ddim"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    ds = xr.open_dataset(out)
    assert ds.tas.dims == ("member", "time", "lat", "lon") and ds.tas.shape == (3, 2, 24, 32)
    assert ds.tas_mean.attrs["cell_methods"] == "member: mean"
    res = runner.invoke(app, args)  # an existing output is never overwritten silently
    assert res.exit_code != 0 and "overwrite" in res.output


def test_cli_reports_bad_model_variables(tmp_path):
    pipe = make_pipeline(variables=("pr",), units=("mm/day",), static=())
    pipe.save_pretrained(tmp_path / "model")
    make_low_res().to_netcdf(tmp_path / "low.nc")
    res = runner.invoke(app, ["downscale", str(tmp_path / "low.nc"), "-o", str(tmp_path / "x.nc"), "--model", str(tmp_path / "model")])
    text = " ".join(res.output.replace("│", " ").split())  # the message as typer's box wraps it
    assert res.exit_code != 0 and "lacks the model's variables ['pr']" in text and "--variable tas=pr" in text


def test_cli_evaluate_end_to_end_on_glosea4(tmp_path):
    pytest.importorskip("iris")
    pytest.importorskip("pvlib")
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.modeling import build_unet, default_scheduler

    unet = build_unet(1, 2, 32, "tiny")
    pipe = DownscalingPipeline(
        unet=unet, scheduler=default_scheduler(), variables=["surface_temperature"], units=["K"],
        transforms=["identity"], norm_mean=[278.0], norm_std=[20.0], residual_std=[0.1],
        static_channels=["topography", "land_sea_mask"], static_mean=[400.0, 0.3], static_std=[900.0, 0.45],
        scale_factor=4, patch_size=32,
    )
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "model"), "--members", "1,2", "--steps", "1",
                              "--max-fields", "1", "--baselines", "lerp", "--out-dir", str(out)])
    assert res.exit_code == 0, res.output
    assert str(tmp_path) not in (out / "quality_glosea4.json").read_text()  # no machine paths in results
    md = (out / "quality_glosea4.md").read_text()
    assert "| Lerp |" in md and "DPDM 2-member mean" in md and "northern_australia" in md
    for f in ("quality_glosea4.json", "quality_glosea4_maps.png", "quality_glosea4_skill_vs_members.png",
              "quality_glosea4_spectra.png"):
        assert (out / f).stat().st_size > 1000


def test_cli_calibrate_writes_the_spread_into_the_model_index(tmp_path):
    pytest.importorskip("iris")
    pytest.importorskip("pvlib")
    import json

    import torch

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.modeling import build_unet, default_scheduler

    kw = dict(variables=["surface_temperature"], units=["K"], transforms=["identity"], norm_mean=[278.0],
              norm_std=[20.0], residual_std=[0.1], static_channels=["topography", "land_sea_mask"],
              static_mean=[400.0, 0.3], static_std=[900.0, 0.45], scale_factor=4, patch_size=32)
    torch.manual_seed(0)
    diffusion, regression = build_unet(1, 2, 32, "tiny"), build_unet(1, 2, 32, "tiny")
    pipe = DownscalingPipeline(unet=diffusion, scheduler=default_scheduler(), regression_unet=regression,
                               stochastic_std=[0.3], **kw)
    pipe.save_pretrained(tmp_path / "model")
    res = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "model"), "--members", "2", "--steps", "1", "--write"])
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "model" / "model_index.json").read_text())["stochastic_std"][0]
    assert written != 0.3 and "wrote stochastic_std" in res.output
    assert DownscalingPipeline.from_pretrained(tmp_path / "model").config.stochastic_std == [written]


def test_overwrite_never_deletes_what_this_tool_did_not_write(tmp_path):
    ds = make_low_res()
    (tmp_path / "x.nc").mkdir()  # a directory named like a netCDF file
    (tmp_path / "x.nc" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an output of dpdm-diffusers"):
        write_dataset(ds, tmp_path / "x.nc", overwrite=True)
    foreign = tmp_path / "other.zarr"
    ds.to_zarr(foreign, zarr_format=2)  # somebody else's store
    with pytest.raises(FileExistsError, match="not an output of dpdm-diffusers"):
        write_dataset(ds, foreign, overwrite=True)
    assert (tmp_path / "x.nc" / "precious.txt").read_text() == "keep me" and foreign.exists()
    ours = write_dataset(ds, tmp_path / "ours.zarr")
    write_dataset(ds + 1, ours, overwrite=True)  # its own store is replaced (old kept until the new is in place)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old copies left


def test_a_failed_write_leaves_the_old_output_and_no_partial_file(tmp_path, monkeypatch):
    path = write_dataset(make_low_res(), tmp_path / "out.nc")
    before = path.read_bytes()

    def full_disk(self, *a, **k):
        open(a[0], "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", full_disk)
    with pytest.raises(OSError, match="No space left to write"):
        write_dataset(make_low_res() + 1, path, overwrite=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.nc"]

    def hdf_error(self, *a, **k):  # what netCDF4 raises when the disk fills up
        raise RuntimeError("NetCDF: HDF error")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", hdf_error)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("du", (), {"free": 1024})())
    with pytest.raises(OSError, match="No space left to write"):
        write_dataset(make_low_res() + 1, path, overwrite=True)


def test_output_path_problems_are_found_before_computing(tmp_path):
    from dpdm_diffusers.io import check_output

    with pytest.raises(ValueError, match=".nc"):
        check_output(tmp_path / "out.txt", False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="not a writable directory"):
        check_output(tmp_path / "file" / "out.nc", False)


def era5_like(ntime=4):
    """An ERA5-style file: `latitude` descending, `valid_time`, bounds and GRIB grid attributes of the coarse grid."""
    ds = make_low_res(ntime=ntime).isel(lat=slice(None, None, -1)).rename(lat="latitude", lon="longitude",
                                                                           time="valid_time")
    ds["latitude"].attrs.update(bounds="latitude_bnds", stored_direction="decreasing")
    ds["longitude"].attrs.update(bounds="longitude_bnds")
    ds["valid_time"].attrs.update(bounds="time_bnds")
    ds["tas"].attrs.update(cell_methods="time: mean", GRIB_paramId=167, GRIB_Nx=8, GRIB_gridType="regular_ll",
                           GRIB_iDirectionIncrementInDegrees=1.0)
    ds.attrs.update(source="ERA5 reanalysis", nominal_resolution="100 km", GRIB_centre="ecmwf")
    return ds


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_downscale_output_keeps_the_input_layout_and_is_clean_cf(tmp_path, suffix):
    pipe = make_pipeline(static=())
    pipe.save_pretrained(tmp_path / "model")
    era5_like().to_netcdf(tmp_path / "low.nc")
    out = tmp_path / f"fine{suffix}"
    res = runner.invoke(app, ["downscale", str(tmp_path / "low.nc"), "-o", str(out), "--model", str(tmp_path / "model"),
                              "--members", "2", "--steps", "2", "--chunk-size", "3", "--noise-time-correlation", "0.5"])
    assert res.exit_code == 0, res.output
    ds = xr.open_dataset(out, engine="zarr" if suffix == ".zarr" else None)
    assert ds.tas.dims == ("member", "valid_time", "latitude", "longitude")  # the input's names, read as written
    assert np.all(np.diff(ds.latitude.values) < 0) and ds.latitude.attrs["stored_direction"] == "decreasing"
    for name in ds.variables:  # no attribute points at a variable the file lacks; no coarse-grid GRIB keys
        assert ds[name].attrs.get("bounds") in (None, *ds.variables), name
        assert not any(k in ds[name].attrs for k in ("GRIB_Nx", "GRIB_gridType", "GRIB_iDirectionIncrementInDegrees"))
    assert ds.tas.attrs["GRIB_paramId"] == 167 and ds.tas.attrs["cell_methods"] == "time: mean"
    assert ds.tas_mean.attrs["cell_methods"] == "time: mean member: mean"
    assert "ERA5 reanalysis" in ds.attrs["source"] and "dpdm-diffusers" in ds.attrs["source"]
    assert "nominal_resolution" not in ds.attrs and ds.attrs["input_nominal_resolution"] == "100 km"
    # the same values as the pipeline on the standardised input: only names and order were given back
    import torch

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.evaluation import set_scheduler
    from dpdm_diffusers.workflows import open_low_res

    p = set_scheduler(DownscalingPipeline.from_pretrained(tmp_path / "model"), "dpmsolver++")
    ref = p(open_low_res(tmp_path / "low.nc", ["tas"]).load(), num_members=2, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), noise_time_correlation=0.5).members.tas
    np.testing.assert_allclose(ds.tas.values[..., ::-1, :], ref.values, atol=1e-5)
