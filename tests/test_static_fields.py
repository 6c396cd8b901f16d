"""Static fields: area averaging rules (synthetic), user sources, missing extra, real packaged sources."""

import importlib.util

import numpy as np
import pytest
import xarray as xr

from dpdm_diffusers import static_fields as sf
from dpdm_diffusers.grids import Grid

HAS_SOURCES = all(importlib.util.find_spec(p) is not None for p in ("pvlib", "global_land_mask"))
# `pytest.importorskip("global_land_mask")` would import it, and importing it unpacks a 933 MB mask:
# check the packages are installed without importing them.
needs_sources = pytest.mark.skipif(not HAS_SOURCES, reason="needs the data extra: pip install 'dpdm-diffusers[data]'")


def regular(dlat, dlon, lat0=-90.0, lat1=90.0, lon0=0.0, lon1=360.0):
    return Grid(np.arange(lat0 + dlat / 2, lat1, dlat), np.arange(lon0 + dlon / 2, lon1, dlon))


def cell_areas(grid: Grid) -> np.ndarray:
    lat_edges = np.clip(np.r_[grid.lat - grid.dlat / 2, grid.lat[-1] + grid.dlat / 2], -90, 90)
    band = np.abs(np.diff(np.sin(np.deg2rad(lat_edges))))
    return band[:, None] * np.full(grid.lon.size, grid.dlon)[None, :]


def test_area_average_conserves_the_global_integral_and_constants():
    src, dst = regular(1.0, 1.0), regular(7.5, 12.0)  # target edges do not align with source edges
    rng = np.random.default_rng(0)
    values = rng.normal(size=src.shape)
    out = sf.area_average(values, src, dst)
    total_src = (values * cell_areas(src)).sum()
    total_dst = (out * cell_areas(dst)).sum()
    np.testing.assert_allclose(total_dst, total_src, rtol=1e-10)
    np.testing.assert_allclose(sf.area_average(np.full(src.shape, 3.5), src, dst), 3.5)


def test_area_average_weights_by_area_on_the_sphere():
    src = Grid(np.array([-67.5, -22.5, 22.5, 67.5]), np.array([90.0, 270.0]))  # 45-degree bands
    values = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    dst = Grid(np.array([-45.0, 45.0]), np.arange(0.5, 360, 1.0))  # hemispheres
    out = sf.area_average(values, src, dst)
    expected = 1 - np.sin(np.deg2rad(45))  # area share of 45..90N in 0..90N (0.29), not 0.5
    np.testing.assert_allclose(out[1], expected, rtol=1e-12)
    np.testing.assert_allclose(out[0], 0.0)


def test_area_average_longitude_conventions_latitude_order_and_seam():
    src = regular(2.0, 2.0)
    rng = np.random.default_rng(1)
    values = rng.random(src.shape)
    east = Grid(np.arange(-88.75, 90, 2.5), np.arange(0, 360, 3.75))       # 0..360, cells straddle 0E
    west = Grid(east.lat[::-1], np.arange(-180, 180, 3.75))                 # -180..180, lat descending
    a = sf.area_average(values, src, east)
    b = sf.area_average(values, src, west)
    np.testing.assert_allclose(b[::-1], np.roll(a, -48, axis=1), rtol=1e-12)
    # a target cell centred on 0E takes half of its area from each side of the source seam
    seam = sf.area_average(values, src, Grid(src.lat, np.arange(0.0, 360, 2.0)))
    np.testing.assert_allclose(seam[:, 0], 0.5 * (values[:, 179] + values[:, 0]), rtol=1e-12)


def test_area_average_ignores_nan_and_flags_uncovered_cells():
    src = Grid(np.arange(10.5, 20, 1.0), np.arange(100.5, 110, 1.0))  # regional source, 10 x 10
    values = np.ones(src.shape)
    values[:, :5] = np.nan
    values[:, 5:] = 2.0
    out = sf.area_average(values, src, Grid(np.array([12.5, 17.5]), np.array([105.0, 115.0])))
    np.testing.assert_allclose(out[:, 0], 2.0)  # NaN halves ignored, not counted as zero
    assert np.isnan(out[:, 1]).all()            # outside the source


def test_user_sources_units_and_output_format():
    grid = Grid(np.arange(-88.75, 90, 2.5), np.arange(-180, 180, 3.75))
    fine = Grid(np.arange(-89.5, 90, 1.0), np.arange(0.5, 360, 1.0))
    lat = fine.lat[:, None] + 0 * fine.lon[None, :]
    geopotential = xr.DataArray(
        (np.clip(lat, 0, None) * 10.0 * 9.80665)[::-1][None], dims=("time", "latitude", "longitude"),
        coords={"time": [0], "latitude": fine.lat[::-1], "longitude": fine.lon}, attrs={"units": "m**2 s**-2"},
    ).to_dataset(name="z")
    sftlf = xr.Dataset({"sftlf": (("lat", "lon"), np.where(lat > 0, 100.0, 0.0), {"units": "%"})},
                       coords={"lat": fine.lat, "lon": fine.lon})
    ds = sf.get_static_fields(grid, sources={"topography": geopotential, "land_sea_mask": sftlf})
    assert list(ds.data_vars) == ["topography", "land_sea_mask"]
    assert ds["topography"].dims == ("lat", "lon")
    np.testing.assert_array_equal(ds["lon"].values, grid.lon)
    assert ds["topography"].attrs["units"] == "m" and ds["land_sea_mask"].attrs["units"] == "1"
    assert ds["land_sea_mask"].attrs["standard_name"] == "land_area_fraction"
    row = np.argmin(np.abs(grid.lat - 46.25))
    np.testing.assert_allclose(ds["topography"].values[row], 462.5, rtol=1e-3)  # geopotential / g, area mean
    assert ds["land_sea_mask"].values.max() == pytest.approx(1.0) and ds["land_sea_mask"].values.min() == 0.0
    bad = sftlf.assign(sftlf=sftlf["sftlf"].assign_attrs(units="1"))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sf.get_static_fields(grid, ["land_sea_mask"], sources={"land_sea_mask": bad})
    with pytest.raises(ValueError, match="Unknown static channels"):
        sf.get_static_fields(grid, ["albedo"])


def test_coarser_user_source_is_interpolated_not_blocky():
    grid = Grid(np.arange(20.25, 30, 0.5), np.arange(100.25, 110, 0.5))
    coarse = xr.DataArray(np.add.outer(np.arange(10.0, 41, 5), np.zeros(5)) * 10, dims=("lat", "lon"),
                          coords={"lat": np.arange(10.0, 41, 5), "lon": np.arange(95.0, 116, 5)}, name="orog")
    out = sf.get_static_fields(grid, ["topography"], sources={"topography": coarse})["topography"].values
    np.testing.assert_allclose(out[:, 0], grid.lat * 10, rtol=1e-5)  # bilinear reproduces a linear ramp


def test_missing_extra_raises_import_error_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sf.importlib.util, "find_spec", lambda name, *a: None if name == "pvlib" else real(name, *a))
    sf._topography_5min.cache_clear()
    sf._packaged_on_grid.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"dpdm-diffusers\[data\]"):
            sf.get_static_fields(Grid(np.arange(-60.0, 61, 30), np.arange(0.0, 360, 30)), ["topography"])
    finally:
        sf._topography_5min.cache_clear()
        sf._packaged_on_grid.cache_clear()


@needs_sources
def test_real_static_fields_on_the_glosea4_grid_both_conventions():
    grid = Grid(-90 + 1.25 * np.arange(144), 1.875 * np.arange(192))
    ds = sf.get_static_fields(grid)
    topo, land = ds["topography"].values, ds["land_sea_mask"].values
    assert land.min() >= 0 and land.max() <= 1
    w = np.cos(np.deg2rad(grid.lat))[:, None] * np.ones(grid.shape)
    assert 0.27 < np.average(land, weights=w) < 0.31  # Earth's land fraction is about 0.29

    def at(lat, lon, arr, g=grid):
        return arr[np.argmin(np.abs(g.lat - lat)), np.argmin(np.abs((g.lon - lon + 180) % 360 - 180))]

    assert at(32, 88, topo) > 4000          # Tibetan Plateau
    assert at(-40, 240, topo) == 0 and at(-40, 240, land) == 0    # South Pacific
    assert at(23, 15, land) == 1 and 200 < at(23, 15, topo) < 1500  # Sahara
    assert at(-75, 90, topo) > 2000          # East Antarctic plateau
    west = Grid(grid.lat, np.r_[grid.lon[96:] - 360, grid.lon[:96]])
    ds_w = sf.get_static_fields(west)
    np.testing.assert_allclose(ds_w["topography"].values, np.roll(topo, -96, axis=1), rtol=1e-5, atol=1e-3)
    assert sf._packaged_on_grid.cache_info().currsize >= 4


@needs_sources
def test_real_static_fields_regional_grid_and_cache():
    import time

    east_asia = Grid(np.arange(54.95, 10, -0.1), np.arange(100.05, 150, 0.1))  # 0.1 deg, descending lat
    t0 = time.perf_counter()
    first = sf.get_static_fields(east_asia)
    t1 = time.perf_counter()
    again = sf.get_static_fields(east_asia)
    t2 = time.perf_counter()
    assert first["land_sea_mask"].shape == (450, 500)
    assert t2 - t1 < 0.2 * (t1 - t0) + 0.01  # memoised on the grid
    np.testing.assert_array_equal(first["topography"].values, again["topography"].values)
    lsm = first["land_sea_mask"].values
    # 0.1 deg cells resolve the coast: both pure land, pure sea and mixed coastal cells exist
    assert (lsm == 1).mean() > 0.3 and (lsm == 0).mean() > 0.2 and ((lsm > 0) & (lsm < 1)).mean() > 0.01
    lat, lon = first["lat"].values, first["lon"].values

    def at(la, lo, name):
        return first[name].values[np.argmin(np.abs(lat - la)), np.argmin(np.abs(lon - lo))]

    assert at(35.36, 138.73, "topography") > 800      # Mt Fuji (5-arcmin mean of the source)
    assert at(40, 135, "topography") == 0 and at(40, 135, "land_sea_mask") == 0  # Sea of Japan
    assert first["topography"].values.max() > 4500    # eastern Tibetan Plateau


def test_the_pipeline_takes_static_fields_as_a_dataset(pipe, low_res, static):
    """Callers pass get_static_fields' Dataset as it is: no ``{k: ds[k] for k in ds.data_vars}`` needed."""
    import torch

    def run(s):
        return pipe(low_res, static_fields=s, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).members

    np.testing.assert_array_equal(run(xr.Dataset(static)).tas.values, run(static).tas.values)
