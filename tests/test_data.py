"""Data layer: lazy opening, coordinate conventions, selections, pairs and their errors (synthetic data)."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from dpdm_diffusers import data
from dpdm_diffusers.grids import Grid, block_mean, interpolate


def field(lat, lon, times=None, name="t2m", units="K", seed=0):
    """A smooth-plus-noise field whose value encodes its position, so reorderings are detectable."""
    rng = np.random.default_rng(seed)
    la, lo = np.meshgrid(np.asarray(lat, float), np.asarray(lon, float), indexing="ij")
    base = 280 + 0.3 * la + 5 * np.cos(np.deg2rad(lo)) + rng.normal(0, 0.1, la.shape)
    if times is None:
        return xr.Dataset({name: (("lat", "lon"), base, {"units": units})}, coords={"lat": lat, "lon": lon})
    vals = base[None] + np.arange(len(times))[:, None, None]
    return xr.Dataset(
        {name: (("time", "lat", "lon"), vals, {"units": units})},
        coords={"time": pd.to_datetime(times), "lat": lat, "lon": lon},
    )


LAT = np.arange(-87.5, 90, 5.0)      # 36 rows
LON = np.arange(0, 360, 5.0)         # 72 columns, periodic
TIMES = pd.date_range("2000-01-01", periods=6, freq="MS")


def test_open_netcdf_era5_naming_descending_lat_is_lazy_and_standardised(tmp_path):
    ds = field(LAT, LON, TIMES).rename({"lat": "latitude", "lon": "longitude", "time": "valid_time"})
    ds = ds.isel(latitude=slice(None, None, -1))  # ERA5 stores 90N -> 90S
    path = tmp_path / "era5.nc"
    ds.to_netcdf(path)
    out = data.open_dataset(path)
    assert set(out.dims) == {"time", "lat", "lon"}
    assert hasattr(out["t2m"].data, "dask"), "opening must be lazy (dask)"
    assert np.all(np.diff(out["lat"].values) > 0)
    expected = field(LAT, LON, TIMES)["t2m"]
    np.testing.assert_allclose(out["t2m"].values, expected.transpose(*out["t2m"].dims).values)
    assert out["lat"].attrs["units"] == "degrees_north"


def test_open_many_files_by_glob_and_list(tmp_path):
    full = field(LAT, LON, TIMES)
    for i in range(3):
        full.isel(time=slice(2 * i, 2 * i + 2)).to_netcdf(tmp_path / f"part_{i}.nc")
    by_glob = data.open_dataset(str(tmp_path / "part_*.nc"))
    by_list = data.open_dataset([tmp_path / "part_2.nc", tmp_path / "part_0.nc", tmp_path / "part_1.nc"])
    for out in (by_glob, by_list):
        assert out.sizes["time"] == 6
        assert hasattr(out["t2m"].data, "dask")
        np.testing.assert_allclose(out["t2m"].values, full["t2m"].values)
    with pytest.raises(FileNotFoundError, match="No files match"):
        data.open_dataset(str(tmp_path / "nothing_*.nc"))


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_open_zarr_store_with_selection(tmp_path):
    full = field(LAT, LON, TIMES)
    full.to_zarr(tmp_path / "hr.zarr")  # consolidated (xarray default)
    out = data.open_dataset(tmp_path / "hr.zarr", variables=["t2m"], time=("2000-02", "2000-04"),
                            lat=(10, 40), lon=(100, 150), units={"t2m": "kelvin"})
    assert hasattr(out["t2m"].data, "dask")
    assert list(out["time"].dt.month.values) == [2, 3, 4]
    assert out["lat"].values.min() >= 10 and out["lat"].values.max() <= 40
    np.testing.assert_allclose(out["lon"].values, np.arange(100, 151, 5.0))
    np.testing.assert_allclose(
        out["t2m"].values, full["t2m"].sel(time=slice("2000-02", "2000-04"), lat=slice(10, 40), lon=slice(100, 150)).values
    )


def test_missing_variable_error_lists_available():
    ds = field(LAT, LON)
    with pytest.raises(KeyError, match=r"\['tp'\] not found.*t2m"):
        data.select_variables(ds, ["t2m", "tp"])


def test_irregular_curvilinear_rotated_and_projected_grids_are_refused():
    lat = np.concatenate([np.arange(-80, 0, 10.0), np.arange(0, 81, 5.0)])
    with pytest.raises(ValueError, match="irregular"):
        data.standardize(field(lat, LON))
    curvi = xr.Dataset(
        {"t": (("y", "x"), np.zeros((3, 4)))},
        coords={"lat": (("y", "x"), np.zeros((3, 4))), "lon": (("y", "x"), np.zeros((3, 4)))},
    )
    with pytest.raises(ValueError, match="Curvilinear"):
        data.standardize(curvi)
    rot = xr.Dataset({"t": (("rlat", "rlon"), np.zeros((3, 4)))}, coords={"rlat": np.arange(3.0), "rlon": np.arange(4.0)})
    with pytest.raises(ValueError, match="no CF grid_mapping variable"):  # where is the pole?
        data.standardize(rot)
    proj = xr.Dataset({"t": (("y", "x"), np.zeros((3, 4)))}, coords={"y": np.arange(3) * 1e4, "x": np.arange(4) * 1e4})
    with pytest.raises(ValueError, match="no CF grid_mapping variable"):
        data.standardize(proj)
    # the pipeline too: rotated coordinates (uk_hires.pp's rlat 0.1..0.7) or projected km never pass for degrees, and
    # a projection's mapping on dims named lat/lon is not guessed at
    from conftest import make_pipeline

    pipe = make_pipeline(static=())
    small = xr.Dataset({"tas": (("rlat", "rlon"), np.full((3, 4), 280.0, "f4"), {"units": "K"})},
                       coords={"rlat": ("rlat", np.arange(3) * 0.2, {"standard_name": "grid_latitude"}),
                               "rlon": ("rlon", 357.5 + np.arange(4) * 0.2, {"standard_name": "grid_longitude"})})
    for bad in (small,
                small.rename(rlat="y", rlon="x").assign_coords(y=("y", np.arange(3.0), {"units": "km"}),
                                                               x=("x", np.arange(4.0), {"units": "km"})),
                small.rename(rlat="lat", rlon="lon").assign_coords(lat=np.arange(3.0), lon=np.arange(4.0))
                .assign_coords(crs=((), 0, {"grid_mapping_name": "lambert_conformal_conic"}))  # decode_coords="all"
                .pipe(lambda d: d.assign(tas=d.tas.assign_attrs(grid_mapping="crs")))):
        with pytest.raises(ValueError, match="no CF grid_mapping variable|no 1-D axes in its coordinates"):
            pipe(bad, num_members=1, num_inference_steps=1)
    ok = small.rename(rlat="y", rlon="x").assign_coords(y=("y", 10 + np.arange(3.0), {"units": "degrees_north"}),
                                                        x=("x", 100 + np.arange(4.0), {"units": "degrees_east"}))
    assert pipe(ok, num_members=1, num_inference_steps=1).members.tas.dims == ("member", "y", "x")


def test_units_checks_accept_spellings_and_reject_mismatches():
    assert data.same_units("m/s", "m s-1") and data.same_units("m s**-1", "m s-1")
    assert data.same_units("K", "kelvin") and data.same_units("kg/m2/s", "kg m-2 s-1")
    assert not data.same_units("K", "degC") and not data.same_units("m", "km")
    ds = field(LAT, LON, units="degC")
    with pytest.raises(ValueError, match="Mismatched units.*degC"):
        data.check_units(ds, {"t2m": "K"})
    with pytest.raises(ValueError, match="no `units`"):
        data.check_units(ds.assign(t2m=ds["t2m"].assign_attrs(units=None).drop_attrs()), {"t2m": "K"})


def test_time_selection_inclusive_partial_strings_and_empty_error():
    ds = field(LAT, LON, TIMES)
    out = data.select_time(ds, ("2000-02", "2000-03"))
    assert list(out["time"].dt.month.values) == [2, 3]
    with pytest.raises(ValueError, match="empty"):
        data.select_time(ds, ("1990", "1991"))


@pytest.mark.parametrize("convention", ["0..360", "-180..180"])
@pytest.mark.parametrize("box", [(170, -170), (170, 190), (-190, -170)])
def test_box_across_dateline_either_convention(convention, box):
    ds = data.set_lon_convention(field(LAT, LON), convention)
    out = data.select_box(ds, lat=(50, 10), lon=box)  # lat bounds in any order
    # continuous across the dateline, starting at the west edge as the caller wrote it
    np.testing.assert_allclose(out["lon"].values, np.arange(box[0], box[0] + 21, 5.0))
    Grid.from_xarray(out)  # still a regular grid
    ref = field(LAT, LON)["t2m"]
    expected = ref.sel(lat=slice(10, 50)).isel(lon=[int(v % 360 // 5) for v in out["lon"].values])
    np.testing.assert_allclose(out["t2m"].values, expected.values)


def test_box_across_greenwich_in_0_360_data():
    out = data.select_box(field(LAT, LON), lon=(-10, 10))
    np.testing.assert_allclose(out["lon"].values, np.arange(-10, 11, 5.0))
    ref = field(LAT, LON)["t2m"]
    np.testing.assert_allclose(out["t2m"].isel(lon=0).values, ref.sel(lon=350).values)
    np.testing.assert_allclose(out["t2m"].isel(lon=-1).values, ref.sel(lon=10).values)


def test_lon_convention_roll_and_unsorted_longitudes():
    ds = field(LAT, LON)
    west = data.set_lon_convention(ds, "-180..180")
    assert west["lon"].values[0] == -180 and np.all(np.diff(west["lon"].values) > 0)
    np.testing.assert_allclose(west["t2m"].sel(lon=-10).values, ds["t2m"].sel(lon=350).values)
    shuffled = west.isel(lon=np.r_[36:72, 0:36])  # stored 0..175 then -180..-5
    fixed = data.standardize(shuffled)
    np.testing.assert_allclose(fixed["lon"].values, west["lon"].values)
    np.testing.assert_allclose(fixed["t2m"].values, west["t2m"].values)


def test_coarsen_is_block_mean_with_block_centre_coords_and_nan_rules():
    ds = field(LAT, LON, TIMES)
    vals = ds["t2m"].values.copy()
    vals[:, 0:2, 0:1] = np.nan      # partly missing block: mean of the valid points
    vals[:, 4:8, 4:8] = np.nan      # fully missing block: missing
    ds["t2m"].values = vals
    low = data.coarsen(ds, 4)
    assert low.sizes == {"time": 6, "lat": 9, "lon": 18}
    np.testing.assert_allclose(low["lat"].values, data.coarse_grid(Grid.from_xarray(ds), 4).lat)
    np.testing.assert_allclose(Grid.from_xarray(low).refine(4).lat, ds["lat"].values)
    np.testing.assert_allclose(Grid.from_xarray(low).refine(4).lon, ds["lon"].values)
    np.testing.assert_allclose(low["t2m"].values[:, 1:, 2:], block_mean(vals, 4)[:, 1:, 2:])
    np.testing.assert_allclose(low["t2m"].values[:, 0, 0], np.nanmean(vals[:, 0:4, 0:4], axis=(1, 2)))
    assert np.isnan(low["t2m"].values[:, 1, 1]).all()
    assert low["t2m"].attrs["units"] == "K"


def test_coarsen_requires_divisible_grid_and_trim_helps():
    ds = field(LAT[:-2], np.arange(100, 150, 2.5))  # regional 34 x 20
    with pytest.raises(ValueError, match="not divisible.*trim_to_multiple"):
        data.make_pairs(ds, scale_factor=4)
    trimmed = data.trim_to_multiple(ds, 4)
    assert trimmed.sizes == {"lat": 32, "lon": 20}
    assert data.make_pairs(trimmed, scale_factor=4).low_res.sizes == {"lat": 8, "lon": 5}
    with pytest.raises(ValueError, match="Global longitude"):
        data.trim_to_multiple(field(LAT, LON), 7)


def test_perfect_model_pairs_are_lazy_and_lerp_matches_grids_interpolate():
    hr = field(LAT, LON, TIMES).chunk({"time": 2})
    pairs = data.make_pairs(hr, scale_factor=4)
    lerp = pairs.lerp("bilinear")
    assert hasattr(pairs.low_res["t2m"].data, "dask") and hasattr(lerp["t2m"].data, "dask")
    expected = interpolate(block_mean(hr["t2m"].values, 4), pairs.coarse_grid, pairs.grid, "bilinear")
    np.testing.assert_allclose(lerp["t2m"].transpose("time", "lat", "lon").values, expected, rtol=1e-12)
    np.testing.assert_allclose(lerp["lon"].values, hr["lon"].values)


def test_real_low_res_is_regridded_to_the_matching_coarse_grid():
    # High-res 0.5 deg over a box; low-res source: global 2-deg field linear in latitude (bilinear is exact).
    hr = field(np.arange(10.25, 30, 0.5), np.arange(100.25, 120, 0.5), TIMES)
    src_lat, src_lon = np.arange(-89, 90, 2.0), np.arange(-180, 180, 2.0)
    lin = 250 + 0.5 * src_lat[:, None] + 0 * src_lon[None, :]
    low = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), np.repeat(lin[None], 6, 0), {"units": "kelvin"})},
        coords={"time": TIMES, "latitude": src_lat, "longitude": src_lon},
    ).isel(latitude=slice(None, None, -1))
    pairs = data.make_pairs(hr, low_res=low)
    assert pairs.scale_factor == 4
    cg = data.coarse_grid(Grid.from_xarray(hr), 4)
    np.testing.assert_allclose(pairs.low_res["lat"].values, cg.lat)
    np.testing.assert_allclose(pairs.low_res["lon"].values, cg.lon)
    got = pairs.low_res["t2m"].transpose("time", "lat", "lon").values
    np.testing.assert_allclose(got, np.broadcast_to(250 + 0.5 * cg.lat[:, None], got.shape), atol=1e-9)


def test_pairs_check_time_axis_variables_and_units():
    hr = field(np.arange(10.25, 30, 0.5), np.arange(100.25, 120, 0.5), TIMES)
    low = data.coarsen(hr, 4)
    shifted = low.assign_coords(time=low["time"] + np.timedelta64(14, "D"))
    with pytest.raises(ValueError, match="Time axes differ at step 0.*time_tolerance"):
        data.make_pairs(hr, low_res=shifted)
    ok = data.make_pairs(hr, low_res=shifted, time_tolerance="16D")
    np.testing.assert_array_equal(ok.low_res["time"].values, hr["time"].values)
    with pytest.raises(ValueError, match="differ in length"):
        data.make_pairs(hr, low_res=low.isel(time=slice(0, 5)))
    with pytest.raises(KeyError, match="lacks variables"):
        data.make_pairs(hr, low_res=low.rename({"t2m": "air"}))
    # compatible units are converted (pint), incompatible ones refused
    celsius = data.make_pairs(hr, low_res=low.assign(t2m=(low["t2m"] - 273.15).assign_attrs(units="degC")))
    np.testing.assert_allclose(celsius.low_res.t2m.values, data.make_pairs(hr, low_res=low).low_res.t2m.values, atol=1e-4)
    assert celsius.low_res.t2m.attrs["units"] == hr.t2m.attrs["units"]
    with pytest.raises(ValueError, match="Mismatched units.*'m'"):
        data.make_pairs(hr, low_res=low.assign(t2m=low["t2m"].assign_attrs(units="m")))
