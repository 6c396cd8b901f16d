"""Statistics: training split only, transforms, NaN/mask handling, config keys (synthetic data)."""

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from dpdm_diffusers.statistics import compute_statistics, default_transform, static_statistics
from dpdm_diffusers.transforms import Normalizer, forward_transform

CONFIG_KEYS = {"variables", "units", "transforms", "norm_mean", "norm_std", "residual_std",
               "static_channels", "static_mean", "static_std"}
TIMES = pd.date_range("2001-01-01", periods=8, freq="MS")
LAT, LON = np.arange(0.5, 8, 1.0), np.arange(0.5, 12, 1.0)


@pytest.fixture
def pair():
    """t2m and tp on 8 months; months 7-8 (the 'test' split) are wildly different on purpose."""
    rng = np.random.default_rng(1)
    shape = (8, LAT.size, LON.size)
    t2m = rng.normal(285, 4, shape)
    tp = rng.gamma(0.6, 3.0, shape)
    t2m[6:] += 500.0
    tp[6:] *= 100.0
    hr = xr.Dataset(
        {"t2m": (("time", "lat", "lon"), t2m, {"units": "K"}),
         "tp": (("time", "lat", "lon"), tp, {"units": "mm/day"})},
        coords={"time": TIMES, "lat": LAT, "lon": LON},
    )
    lerp = hr + xr.Dataset({k: (("time", "lat", "lon"), rng.normal(0, s, shape)) for k, s in (("t2m", 1.0), ("tp", 0.5))})
    lerp["tp"] = lerp["tp"].clip(min=-0.2)  # interpolation can undershoot slightly below zero
    for k in hr.data_vars:
        lerp[k].attrs = hr[k].attrs
    return hr.chunk({"time": 3}), lerp.chunk({"time": 3})


TRAIN = {"time": slice("2001-01", "2001-06")}


def numpy_stats(h, l, transform):
    th, tl = forward_transform(h, transform), forward_transform(l, transform)
    mean, std = np.nanmean(th), np.nanstd(th)
    return mean, std, np.nanstd((th - tl) / std)


def test_statistics_use_the_training_split_only_and_match_numpy(pair):
    hr, lerp = pair
    stats = compute_statistics(hr, lerp, train=TRAIN)
    assert set(stats) >= set(CONFIG_KEYS) - {"static_channels", "static_mean", "static_std"}
    assert stats["variables"] == ["t2m", "tp"] and stats["units"] == ["K", "mm/day"]
    assert stats["transforms"] == ["identity", "log1p"]
    for i, (v, t) in enumerate(zip(stats["variables"], stats["transforms"])):
        h, l = hr[v].values[:6], lerp[v].values[:6]
        mean, std, res = numpy_stats(h, l, t)
        np.testing.assert_allclose([stats["norm_mean"][i], stats["norm_std"][i], stats["residual_std"][i]],
                                   [mean, std, res], rtol=1e-10)
    everything = compute_statistics(hr, lerp)
    assert everything["norm_mean"][0] > stats["norm_mean"][0] + 100  # the test months would leak in


def test_model_space_of_training_data_is_standardised(pair):
    hr, lerp = pair
    stats = compute_statistics(hr, lerp, train=TRAIN)
    nz = Normalizer.from_config(stats)
    h = torch.from_numpy(hr.isel(time=slice(0, 6)).to_array("v").transpose("time", "v", "lat", "lon").values)
    l = torch.from_numpy(lerp.isel(time=slice(0, 6)).to_array("v").transpose("time", "v", "lat", "lon").values)
    z = nz.normalize(h)
    r = nz.to_model_space(h, l)
    for k in range(2):
        assert abs(float(z[:, k].mean())) < 1e-6 and abs(float(z[:, k].std(unbiased=False)) - 1) < 1e-6
        assert abs(float(r[:, k].std(unbiased=False)) - 1) < 1e-6


def test_log1p_is_one_transform_for_tensors_and_lazy_arrays_and_default_by_name():
    x = np.array([-0.5, 0.0, 0.3, 12.0, np.nan])
    want = np.log1p(np.maximum(x, 0))  # clipped at 0; NaN stays NaN
    np.testing.assert_allclose(forward_transform(torch.from_numpy(x), "log1p").numpy(), want)
    np.testing.assert_allclose(forward_transform(x, "log1p"), want)
    lazy = forward_transform(xr.DataArray(x, dims="i").chunk(2), "log1p")
    assert lazy.chunks is not None and isinstance(lazy, xr.DataArray)  # statistics stay one lazy dask graph
    np.testing.assert_allclose(lazy.values, want)
    assert default_transform("tp") == "log1p" and default_transform("pr") == "log1p"
    assert default_transform("x", {"standard_name": "precipitation_flux"}) == "log1p"
    assert default_transform("t2m") == "identity" and default_transform("sp") == "identity"
    assert default_transform("tpw") == "identity"  # precipitable water is not precipitation
    with pytest.raises(ValueError):
        forward_transform(x, "cbrt")


def test_missing_values_are_ignored_not_zero(pair):
    hr, lerp = pair
    hr = hr.compute()
    t2m = hr["t2m"].values.copy()
    t2m[:, :, :4] = np.nan  # an 'ocean' with no data, as in ERA5-Land
    hr["t2m"].values = t2m
    stats = compute_statistics(hr, lerp, variables=["t2m"], train=TRAIN)
    np.testing.assert_allclose(stats["norm_mean"][0], np.nanmean(t2m[:6]), rtol=1e-12)
    np.testing.assert_allclose(stats["norm_std"][0], np.nanstd(t2m[:6]), rtol=1e-12)
    assert stats["norm_mean"][0] > 200  # zeros would drag the mean down by a third
    lerp_only_valid = lerp["t2m"].values[:6][:, :, 4:]
    np.testing.assert_allclose(
        stats["residual_std"][0], np.std((t2m[:6][:, :, 4:] - lerp_only_valid) / np.nanstd(t2m[:6])), rtol=1e-10
    )


def test_mask_excludes_points(pair):
    hr, lerp = pair
    land = xr.DataArray(LON[None, :] > 6 + 0 * LAT[:, None], dims=("lat", "lon"), coords={"lat": LAT, "lon": LON})
    stats = compute_statistics(hr, lerp, variables=["t2m"], train=TRAIN, mask=land)
    vals = hr["t2m"].values[:6][:, :, LON > 6]
    np.testing.assert_allclose(stats["norm_mean"][0], vals.mean(), rtol=1e-12)


def test_static_statistics_and_constant_channel():
    static = xr.Dataset(
        {"topography": (("lat", "lon"), np.arange(96.0).reshape(8, 12)),
         "land_sea_mask": (("lat", "lon"), np.ones((8, 12)))},
        coords={"lat": LAT, "lon": LON},
    )
    s = static_statistics(static)
    assert s["static_channels"] == ["topography", "land_sea_mask"]
    np.testing.assert_allclose(s["static_mean"], [47.5, 1.0])
    np.testing.assert_allclose(s["static_std"], [np.arange(96.0).std(), 1.0])  # constant channel: std 1


def test_full_config_feeds_the_normalizer(pair):
    hr, lerp = pair
    static = xr.Dataset({"topography": (("lat", "lon"), np.random.default_rng(0).random((8, 12)) * 1000)},
                        coords={"lat": LAT, "lon": LON})
    stats = compute_statistics(hr, lerp, train=TRAIN, static=static, transforms={"tp": "identity"})
    assert set(stats) == CONFIG_KEYS
    assert stats["transforms"] == ["identity", "identity"]
    nz = Normalizer.from_config(stats)
    assert nz.static_channels == ["topography"] and nz.num_variables == 2


def test_errors_for_missing_or_empty_variables(pair):
    hr, lerp = pair
    with pytest.raises(KeyError, match="lacks variables"):
        compute_statistics(hr, lerp.drop_vars("tp"))
    empty = hr.assign(t2m=hr["t2m"] * np.nan)
    with pytest.raises(ValueError, match="no valid values"):
        compute_statistics(empty, lerp, train=TRAIN)
