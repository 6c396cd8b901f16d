"""Conservation (block means reproduce the input, L2 projection, NaN, multiplicative) and the lapse-rate baseline."""

import numpy as np
import pytest
import torch
import xarray as xr

from dpdm_diffusers.baselines import lapse_rate_baseline
from dpdm_diffusers.conservation import block_mean, check_refinement, conserve, conserve_dataarray
from dpdm_diffusers.data import regrid
from dpdm_diffusers.grids import Grid, refine


def tol(low, dtype=np.float32):
    # float precision: a few ulps of the largest input value
    return 4 * np.finfo(dtype).eps * float(np.nanmax(np.abs(np.asarray(low))))


def fields(shape, seed=0, loc=280.0, scale=5.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# block means and the correction
# ---------------------------------------------------------------------------------------------------
def test_block_mean_numpy_torch_and_nan():
    x = np.arange(2 * 4 * 6, dtype=np.float64).reshape(2, 4, 6)
    want = x.reshape(2, 2, 2, 3, 2).mean(axis=(-3, -1))
    np.testing.assert_allclose(block_mean(x, 2), want)
    np.testing.assert_allclose(block_mean(torch.tensor(x), 2).numpy(), want)
    x[0, 0, 0] = np.nan  # skipped inside its block
    x[1, :2, :2] = np.nan  # the whole block is missing
    out = block_mean(x, 2)
    assert out[0, 0, 0] == pytest.approx(np.mean([1.0, 6.0, 7.0]))
    assert np.isnan(out[1, 0, 0]) and np.isfinite(out[1, 1, 1])
    t = block_mean(torch.tensor(x), 2)
    np.testing.assert_allclose(t.numpy(), out)
    with pytest.raises(ValueError, match="not divisible"):
        block_mean(np.zeros((5, 6)), 2)


@pytest.mark.parametrize("members_shape, low_shape", [
    ((8, 12), (2, 3)),  # one field
    ((3, 2, 8, 12), (2, 2, 3)),  # (member, variable) against (variable)
    ((4, 2, 3, 8, 12), (2, 3, 2, 3)),  # pipeline layout: (member, batch, variable) against (batch, variable)
    ((4, 1, 3, 8, 12), (5, 3, 2, 3)),  # size-1 batch broadcast
])
def test_block_means_equal_the_input(members_shape, low_shape):
    members, low = fields(members_shape, 0), fields(low_shape, 1)
    out = conserve(members, low, 4)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == np.broadcast_shapes(members_shape[:-2], low_shape[:-2]) + members_shape[-2:]
    np.testing.assert_allclose(block_mean(out, 4), np.broadcast_to(low, out.shape[:-2] + low.shape[-2:]), rtol=0, atol=tol(low))

    tout = conserve(torch.tensor(members), torch.tensor(low), 4)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32
    np.testing.assert_allclose(tout.numpy(), out, rtol=0, atol=tol(low))
    # numpy low-res with torch members (the pipeline's physical output)
    np.testing.assert_allclose(conserve(torch.tensor(members), low, 4).numpy(), out, rtol=0, atol=tol(low))


def test_correction_is_the_l2_projection():
    rng = np.random.default_rng(3)
    s = 4
    truth = rng.normal(280, 5, (20, 16, 24))
    low = block_mean(truth, s)
    members = truth + rng.normal(0, 2, truth.shape) + rng.normal(0, 1, (20, 1, 1))  # noise and a bias
    out = conserve(members, low, s)
    # the correction is constant over each block ...
    corr = (out - members).reshape(20, 4, s, 6, s)
    np.testing.assert_allclose(corr, corr[:, :, :1, :, :1] * np.ones_like(corr), atol=1e-10)
    # ... and orthogonal to every zero-block-mean field: out - truth has zero block means, so Pythagoras holds
    err_before = ((members - truth) ** 2).sum(axis=(-2, -1))
    err_after = ((out - truth) ** 2).sum(axis=(-2, -1))
    np.testing.assert_allclose(err_before, err_after + ((out - members) ** 2).sum(axis=(-2, -1)), rtol=1e-9)
    assert np.all(err_after <= err_before)
    # a field that already matches the input is left unchanged
    np.testing.assert_allclose(conserve(truth, low, s), truth, atol=1e-10)


def test_nan_cells_stay_nan_and_valid_cells_conserve():
    s = 2
    members = fields((3, 4, 6), 0).astype(np.float64)
    low = fields((2, 3), 1).astype(np.float64)
    members[:, 0, 0] = np.nan  # a masked cell in every member
    members[1, 2:4, 2:4] = np.nan  # a whole block masked in one member
    low[0, 2] = np.nan  # no input here: nothing to conserve
    out = conserve(members, low, s)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(members))
    bm = block_mean(out, s)
    ok = np.isfinite(np.broadcast_to(low, bm.shape)) & np.isfinite(bm)
    np.testing.assert_allclose(bm[ok], np.broadcast_to(low, bm.shape)[ok], atol=1e-10)
    np.testing.assert_array_equal(out[:, 0:2, 4:6], members[:, 0:2, 4:6])  # the NaN input block is left as it was
    t = conserve(torch.tensor(members), torch.tensor(low), s).numpy()
    np.testing.assert_allclose(t, out, atol=1e-10)


def test_multiplicative_keeps_non_negative_and_conserves():
    rng = np.random.default_rng(5)
    s = 4
    members = rng.gamma(0.5, 3.0, (6, 2, 8, 12)) * (rng.random((6, 2, 8, 12)) > 0.4)  # dry cells are 0
    members[0, 0, :4, :4] = 0.0  # an all-dry block ...
    low = rng.gamma(0.5, 3.0, (2, 2, 3))
    low[0, 0, 0] = 1.5  # ... the input says is wet: additive fallback
    low[1, 1, 1] = 0.0  # a dry input block
    for x, lr in ((members, low), (torch.tensor(members), torch.tensor(low))):
        out = np.asarray(conserve(x, lr, s, method="multiplicative"))
        assert out.min() >= 0.0
        np.testing.assert_allclose(block_mean(out, s), np.broadcast_to(low, out.shape[:-2] + (2, 3)), atol=1e-12)
        np.testing.assert_allclose(out[0, 0, :4, :4], 1.5)
        np.testing.assert_array_equal(out[:, 1, 4:8, 4:8], 0.0)
        # dry cells of a wet block stay dry (the additive correction would wet them)
        wet_block = (members[:, :, 4:8, :4] == 0) & (members[:, :, 4:8, :4].sum(axis=(-2, -1), keepdims=True) > 0)
        assert np.all(out[:, :, 4:8, :4][wet_block] == 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        conserve(members, -low - 1.0, s, method="multiplicative")
    with pytest.raises(ValueError, match="Unknown conservation method"):
        conserve(members, low, s, method="ratio")


def test_non_refined_shapes_raise():
    with pytest.raises(ValueError, match="not the low-res 2 x 3 grid refined by 4"):
        conserve(np.zeros((8, 8)), np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="not the low-res"):
        conserve(np.zeros((8, 12)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="do not broadcast"):
        conserve(np.zeros((3, 8, 12)), np.zeros((2, 2, 3)), 4)
    with pytest.raises(ValueError, match="positive integer"):
        conserve(np.zeros((8, 12)), np.zeros((2, 3)), 0)


# ---------------------------------------------------------------------------------------------------
# xarray
# ---------------------------------------------------------------------------------------------------
def coarse_da(ny=6, nx=8, nt=2, seed=1, lat0=-30.0, dlat=5.0, lon0=10.0, dlon=5.0, names=("lat", "lon")):
    lat, lon = lat0 + dlat * np.arange(ny), lon0 + dlon * np.arange(nx)
    return xr.DataArray(fields((nt, ny, nx), seed), dims=("time", *names),
                        coords={"time": np.arange(nt), names[0]: lat, names[1]: lon}, name="tas", attrs={"units": "K"})


def fine_like(low, s, members=3, seed=0, shift=(0.0, 0.0)):
    la, lo = low.dims[-2:]
    lat, lon = refine(low[la].values, s) + shift[0], refine(low[lo].values, s) + shift[1]
    vals = fields((members, low.sizes["time"], lat.size, lon.size), seed)
    return xr.DataArray(vals, dims=("member", "time", la, lo),
                        coords={"member": np.arange(members), "time": low["time"].values, la: lat, lo: lon},
                        name="tas", attrs={"units": "K"})


@pytest.mark.parametrize("names", [("lat", "lon"), ("latitude", "longitude")])
def test_conserve_dataarray(names):
    low = coarse_da(names=names)
    ens = fine_like(low, 4)
    out = conserve_dataarray(ens, low, 4)
    assert out.dims == ens.dims and out.attrs == ens.attrs
    xr.testing.assert_equal(out[names[0]], ens[names[0]])
    back = block_mean(out.values, 4)
    np.testing.assert_allclose(back, np.broadcast_to(low.values, back.shape), rtol=0, atol=tol(low))
    # dim order of the low-res does not matter; datasets go variable by variable
    out2 = conserve_dataarray(ens.transpose(names[1], "time", "member", names[0]), low.transpose(names[1], names[0], "time"), 4)
    xr.testing.assert_allclose(out2.transpose(*ens.dims), out)
    ds = conserve_dataarray(ens.to_dataset(), low.to_dataset(), 4)
    xr.testing.assert_allclose(ds["tas"], out)


def test_conserve_dataarray_descending_lat_and_other_lon_convention():
    low = coarse_da(lat0=30.0, dlat=-5.0, lon0=-20.0)
    ens = fine_like(low, 2)
    ens = ens.assign_coords(lon=(ens["lon"] % 360.0))  # same cells in 0..360
    out = conserve_dataarray(ens, low, 2)
    np.testing.assert_allclose(block_mean(out.values, 2), np.broadcast_to(low.values, (3, 2, 6, 8)), atol=tol(low))


def test_misaligned_grids_are_refused():
    low = coarse_da()
    with pytest.raises(ValueError, match="misaligned"):
        conserve_dataarray(fine_like(low, 4, shift=(0.0, 1.25)), low, 4)  # shifted by one fine cell
    with pytest.raises(ValueError, match="misaligned"):
        conserve_dataarray(fine_like(low, 4, shift=(0.3, 0.0)), low, 4)
    with pytest.raises(ValueError, match="not a refinement"):
        conserve_dataarray(fine_like(low, 4), low, 2)
    with pytest.raises(ValueError, match="not a refinement"):
        check_refinement(fine_like(low, 4).isel(lat=slice(0, 20)), low, 4)
    # a tiny float difference (float32 coordinates) is accepted
    ens = fine_like(low, 4)
    check_refinement(ens.assign_coords(lat=ens["lat"].astype(np.float32)), low, 4)
    # shared dims must match exactly
    with pytest.raises(ValueError):
        conserve_dataarray(fine_like(low, 4).assign_coords(time=[5, 6]), low, 4)


# ---------------------------------------------------------------------------------------------------
# Lerp + lapse rate
# ---------------------------------------------------------------------------------------------------
def topo_case(s=4, ny=8, nx=10, seed=0):
    rng = np.random.default_rng(seed)
    coarse = Grid(-20.0 + 4.0 * np.arange(ny), 100.0 + 4.0 * np.arange(nx))
    fine = coarse.refine(s)
    yy, xx = np.meshgrid(fine.lat, fine.lon, indexing="ij")
    z = np.clip(800 * np.exp(-((yy - 0) ** 2 + (xx - 115) ** 2) / 60.0) + rng.normal(0, 150, yy.shape), 0, None)
    topo = xr.DataArray(z.astype(np.float32), dims=("lat", "lon"), coords={"lat": fine.lat, "lon": fine.lon},
                        attrs={"units": "m"})
    # a temperature exactly lapse-rate-consistent: linear in lat/lon (bilinear reproduces it) minus 6.5 K/km x z
    a = 290.0 - 0.4 * (yy + 20) + 0.05 * (xx - 100)
    truth = xr.DataArray((a - 0.0065 * z)[None], dims=("time", "lat", "lon"),
                         coords={"time": [0], "lat": fine.lat, "lon": fine.lon}, name="tas", attrs={"units": "K"})
    low = truth.coarsen(lat=s, lon=s).mean().assign_attrs(truth.attrs)
    return truth, low, topo


def test_lapse_rate_recovers_a_lapse_rate_consistent_field():
    truth, low, topo = topo_case()
    lerp = regrid(low, Grid.from_xarray(truth), "bilinear")
    lapse = lapse_rate_baseline(low, topo, 4)
    assert lapse.dims == truth.dims and lapse.attrs["units"] == "K" and lapse.name == "tas"
    inner = dict(lat=slice(4, -4), lon=slice(4, -4))  # edge cells are held, not extrapolated, by the interpolation
    err_lerp = float(np.sqrt(((lerp - truth).isel(inner) ** 2).mean()))
    err_lapse = float(np.sqrt(((lapse - truth).isel(inner) ** 2).mean()))
    assert err_lapse < 1e-3 < 0.5 < err_lerp
    # bicubic reproduces linear fields too, up to its iterative spline solver's tolerance (scipy, a few mK here)
    assert float(np.abs(lapse_rate_baseline(low, topo, 4, "bicubic") - truth).isel(inner).max()) < 2e-2


def test_flat_topography_equals_lerp_and_units():
    truth, low, topo = topo_case()
    flat = xr.full_like(topo, 350.0)
    for method in ("bilinear", "bicubic"):
        np.testing.assert_allclose(lapse_rate_baseline(low, flat, 4, method).values,
                                   regrid(low, Grid.from_xarray(truth), method).values, rtol=0, atol=1e-4)
    # degC works (same lapse rate), km topography is converted, a numpy topography is taken as metres
    c = lapse_rate_baseline((low - 273.15).assign_attrs(units="degC"), topo, 4)
    np.testing.assert_allclose(c.values + 273.15, lapse_rate_baseline(low, topo, 4).values, atol=1e-3)
    km = (topo / 1000).assign_attrs(units="km")
    np.testing.assert_allclose(lapse_rate_baseline(low, km, 4).values, lapse_rate_baseline(low, topo, 4).values, atol=1e-3)
    np.testing.assert_allclose(lapse_rate_baseline(low, topo.values, 4).values, lapse_rate_baseline(low, topo, 4).values, atol=1e-4)


def test_lapse_rate_refuses_non_temperature_and_bad_grids():
    truth, low, topo = topo_case()
    with pytest.raises(ValueError, match="only to temperature"):
        lapse_rate_baseline(low.assign_attrs(units="mm/day"), topo, 4)
    with pytest.raises(ValueError, match="only to temperature"):
        lapse_rate_baseline(low.assign_attrs(units="Pa"), topo, 4)
    with pytest.raises(ValueError, match="no `units`"):
        lapse_rate_baseline(low.assign_attrs(units=""), topo, 4)
    with pytest.raises(ValueError, match="misaligned"):
        lapse_rate_baseline(low, topo.assign_coords(lon=topo["lon"] + 1.0), 4)
    with pytest.raises(ValueError, match="not a refinement"):
        lapse_rate_baseline(low, topo, 2)
    with pytest.raises(ValueError, match="Unknown interpolation"):
        lapse_rate_baseline(low, topo, 4, "nearest")
