"""`dpdm downscale` output is clean CF, checked by a real CF checker (IOOS compliance-checker, cf:1.8), from
ERA5-, CMIP6- and CORDEX-style (365-day, daily) inputs: the input's dims, names, orientation and calendar kept,
provenance appended, coarse-grid attributes dropped, the model named by its folder, never a machine path."""

from __future__ import annotations

import json

import cftime
import numpy as np
import pytest
import xarray as xr
from conftest import make_pipeline

from dpdm_diffusers.workflows import downscale_file

pytest.importorskip("compliance_checker")

RNG = np.random.default_rng(0)
LON = np.arange(100.5, 108.4, 1.0)


def era5_style(path):
    lat = np.arange(40.5, 34.4, -1.0)  # ERA5 stores latitude north to south
    v = (280 + RNG.normal(0, 1, (3, lat.size, LON.size))).astype("f4")
    ds = xr.Dataset(
        {"t2m": (("valid_time", "latitude", "longitude"), v, {
            "units": "K", "long_name": "2 metre temperature", "standard_name": "unknown", "GRIB_paramId": 167,
            "GRIB_gridType": "regular_ll", "GRIB_Nx": 8, "GRIB_iDirectionIncrementInDegrees": 1.0})},
        coords={"valid_time": ("valid_time", np.array(["2000-01-01", "2000-02-01", "2000-03-01"], "datetime64[ns]"),
                               {"standard_name": "time", "long_name": "time"}),
                "latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude",
                                               "stored_direction": "decreasing"}),
                "longitude": ("longitude", LON, {"units": "degrees_east", "standard_name": "longitude"}),
                "number": ((), 0, {"long_name": "ensemble member numerical id", "units": "1",
                                   "standard_name": "realization"})},
        attrs={"GRIB_centre": "ecmf", "Conventions": "CF-1.7", "institution": "ECMWF"})
    ds.to_netcdf(path)
    return {"t2m": "tas"}


def cmip6_style(path, calendar="noleap", daily=False):
    lat = np.arange(34.5, 40.6, 1.0)
    n = 3
    if daily:
        times = [cftime.datetime(2001, 1, 1 + k, 12, calendar=calendar) for k in range(n)]
        bounds = [[cftime.datetime(2001, 1, 1 + k, calendar=calendar), cftime.datetime(2001, 1, 2 + k, calendar=calendar)]
                  for k in range(n)]
    else:
        times = [cftime.datetime(2000, m, 16, calendar=calendar) for m in (1, 2, 3)]
        bounds = [[cftime.datetime(2000, m, 1, calendar=calendar), cftime.datetime(2000, m + 1, 1, calendar=calendar)]
                  for m in (1, 2, 3)]
    v = (7 + RNG.normal(0, 1, (n, lat.size, LON.size))).astype("f4")
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), v, {"units": "degC", "standard_name": "air_temperature",
                                             "long_name": "Near-Surface Air Temperature",
                                             "cell_methods": "area: time: mean", "cell_measures": "area: areacella"}),
         "time_bnds": (("time", "bnds"), np.array(bounds, dtype=object)),
         "lat_bnds": (("lat", "bnds"), np.stack([lat - 0.5, lat + 0.5], 1)),
         "lon_bnds": (("lon", "bnds"), np.stack([LON - 0.5, LON + 0.5], 1))},
        coords={"time": ("time", times, {"bounds": "time_bnds", "standard_name": "time", "axis": "T"}),
                "lat": ("lat", lat, {"bounds": "lat_bnds", "units": "degrees_north", "standard_name": "latitude",
                                     "axis": "Y"}),
                "lon": ("lon", LON, {"bounds": "lon_bnds", "units": "degrees_east", "standard_name": "longitude",
                                     "axis": "X"}),
                "height": ((), 2.0, {"units": "m", "standard_name": "height", "positive": "up", "axis": "Z"})},
        attrs={"Conventions": "CF-1.7 CMIP-6.2", "source": "HadGEM3-GC31-LL (2016)", "nominal_resolution": "250 km",
               "history": "2019-06-19T11:21:17Z ; CMOR rewrote data", "title": "HadGEM3 output"})
    for name in ("time", "time_bnds"):
        ds[name].encoding.update(calendar=calendar, units="days since 1850-01-01")
    ds.to_netcdf(path)
    return {}


def cf_problems(path, tmp_path) -> tuple[list, list]:
    """The checker's (errors, warnings) as (section, message) pairs."""
    from compliance_checker.runner import CheckSuite, ComplianceChecker

    CheckSuite.load_all_available_checkers()
    report = tmp_path / f"{path.stem}-cf.json"
    ComplianceChecker.run_checker(str(path), checker_names=["cf:1.8"], verbose=0, criteria="normal",
                                  output_filename=str(report), output_format="json")
    result = json.loads(report.read_text())["cf:1.8"]

    def flat(key):
        return [(r["name"], m) for r in result[key] for m in r["msgs"]]

    return flat("high_priorities"), flat("medium_priorities")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-model"
    make_pipeline(static=()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("style", ["era5", "cmip6", "cordex-365-day-daily"])
def test_downscaled_netcdf_passes_the_cf_checker_and_reads_as_the_input_did(style, model_dir, tmp_path):
    src = tmp_path / f"{style}.nc"
    variable_map = {"era5": era5_style, "cmip6": cmip6_style,
                    "cordex-365-day-daily": lambda p: cmip6_style(p, calendar="365_day", daily=True)}[style](src)
    out = tmp_path / f"{style}-x4.nc"
    downscale_file(src, out, model=str(model_dir), num_members=2, num_inference_steps=2, variable_map=variable_map,
                   progress=False)
    errors, warnings = cf_problems(out, tmp_path)
    assert errors == []
    # CF 1.8 names only dimensions, scalar coordinates and "area" in cell_methods: the reduced member dimension of
    # the ensemble mean and spread is the one warning left (kept, as the mean's provenance)
    assert all("cell_methods name component member" in m for _, m in warnings), warnings

    with xr.open_dataset(src, use_cftime=True) as a, xr.open_dataset(out, use_cftime=True) as b:
        name = next(iter(variable_map), "tas")
        assert b[name].dims == ("member", *a[name].dims)  # the input's names and order
        for dim in a[name].dims:
            if dim.startswith("lat"):
                assert (b[dim][0] > b[dim][-1]) == (a[dim][0] > a[dim][-1])  # orientation kept
                assert b[dim].attrs.get("stored_direction") == a[dim].attrs.get("stored_direction")
        time = a[name].dims[0]
        same = {"365_day": "noleap", "366_day": "all_leap", "gregorian": "standard"}  # CF's synonyms
        calendar = [same.get(c, c) for c in (x[time].encoding.get("calendar", "standard") for x in (a, b))]
        assert calendar[0] == calendar[1]
        np.testing.assert_array_equal(b[time].values, a[time].values)
        assert b.attrs["history"].startswith(a.attrs.get("history", "")) and "downscaled x4" in b.attrs["history"]
        assert b.attrs["source"].startswith("dpdm-diffusers") and a.attrs.get("source", "") in b.attrs["source"]
        assert b.attrs["dpdm_model"] == "tiny-model"  # the folder's name, not its path
        assert "nominal_resolution" not in b.attrs
        for v in b.variables.values():
            assert not any(k.startswith(("GRIB_N", "GRIB_iDirection", "GRIB_gridType")) for k in v.attrs)
            assert "cell_measures" not in v.attrs and v.attrs.get("standard_name") != "unknown"
            assert v.attrs.get("bounds") in (None, *b.variables)
        if "cell_methods" in a[name].attrs:
            assert b[name].attrs["cell_methods"] == a[name].attrs["cell_methods"]
            assert b[f"{name}_mean"].attrs["cell_methods"] == f"{a[name].attrs['cell_methods']} member: mean"
        assert b[name].attrs["units"] == "K"  # the model's units (a degC input was converted)
