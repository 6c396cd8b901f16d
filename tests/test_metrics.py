"""Metrics: hand-checkable values, library-backed values against independent computations, NaN masks."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from dpdm_diffusers import metrics as M


def grid(nt=3, ny=16, nx=20, seed=0, lat0=-40.0, lat1=40.0, lon0=0.0, dlon=2.0):
    rng = np.random.default_rng(seed)
    lat = np.linspace(lat0, lat1, ny)
    lon = lon0 + dlon * np.arange(nx)
    base = 280 + 10 * np.cos(np.deg2rad(lat))[:, None] + 2 * np.sin(np.deg2rad(3 * lon))[None, :]
    vals = base[None] + rng.normal(size=(nt, ny, nx))
    return xr.DataArray(
        vals, dims=("time", "lat", "lon"), coords={"time": np.arange(nt), "lat": lat, "lon": lon}, name="ts"
    )


# ---------------------------------------------------------------------------------------------------
# deterministic scores
# ---------------------------------------------------------------------------------------------------
def test_perfect_forecast():
    y = grid()
    assert float(M.rmse(y, y)) == 0.0
    assert float(M.mae(y, y)) == 0.0
    np.testing.assert_allclose(M.acc(y, y).values, 1.0, atol=1e-12)
    assert float(M.ssim(y, y)) == pytest.approx(1.0, abs=1e-12)
    assert np.isposinf(float(M.psnr(y, y)))
    ens = xr.concat([y, y, y], "member")
    assert float(M.crps(ens, y)) == pytest.approx(0.0, abs=1e-12)


def test_constant_offset():
    y = grid()
    c = 0.75
    f = y + c
    assert float(M.rmse(f, y)) == pytest.approx(c)
    assert float(M.bias(f, y)) == pytest.approx(c)
    assert float(M.bias(y - c, y)) == pytest.approx(-c)
    assert float(M.mae(f, y)) == pytest.approx(c)
    assert float(M.mse(f, y)) == pytest.approx(c**2)
    # a uniform offset is removed by the centred pattern correlation ...
    np.testing.assert_allclose(M.acc(f, y).values, 1.0, atol=1e-12)
    # ... and PSNR is 10 log10(L^2 / c^2) with L the per-field truth range
    L = (y.max(("lat", "lon")) - y.min(("lat", "lon"))).values
    assert float(M.psnr(f, y)) == pytest.approx(np.mean(10 * np.log10(L**2 / c**2)))


def test_dims_argument_and_member_dim_kept():
    y = grid(nt=2)
    f = xr.concat([y + 1.0, y + 3.0], "member")
    r = M.rmse(f, y)  # default: reduce the truth's dims, keep member
    assert r.dims == ("member",)
    np.testing.assert_allclose(r.values, [1.0, 3.0])
    per_time = M.rmse(y + 2.0, y, dims=("lat", "lon"))
    assert per_time.dims == ("time",)
    np.testing.assert_allclose(per_time.values, 2.0)


def test_area_weighting():
    lat = np.array([0.0, 60.0])
    y = xr.DataArray(np.zeros((2, 3)), dims=("lat", "lon"), coords={"lat": lat, "lon": [0.0, 1.0, 2.0]})
    f = y.copy()
    f[1, :] = 2.0  # error only at 60N, where cos(lat) = 0.5
    assert float(M.bias(f, y)) == pytest.approx(1.0)
    # weighted: (0 * 1 + 2 * 0.5) / (1 + 0.5)
    assert float(M.bias(f, y, area_weighted=True)) == pytest.approx(1.0 / 1.5)
    assert float(M.rmse(f, y, area_weighted=True)) == pytest.approx(np.sqrt(4 * 0.5 / 1.5))


def test_nan_points_excluded():
    y = grid(seed=1)
    f = y + np.random.default_rng(2).normal(size=y.shape)
    mask = np.zeros(y.shape[1:], bool)
    mask[:4, :5] = True
    y_masked = y.where(~xr.DataArray(mask, dims=("lat", "lon")))
    f_garbage = f.where(~xr.DataArray(mask, dims=("lat", "lon")), 1e6)  # huge values under the mask
    ref = np.sqrt(np.mean(((f.values - y.values)[:, ~mask]) ** 2))
    assert float(M.rmse(f_garbage, y_masked)) == pytest.approx(ref)
    assert float(M.rmse(f.where(y_masked.notnull()), y)) == pytest.approx(ref)  # NaN in the forecast
    # field metrics ignore whatever is under the mask
    f_nan = f.where(y_masked.notnull())
    assert float(M.ssim(f_garbage, y_masked)) == pytest.approx(float(M.ssim(f_nan, y_masked)))
    assert float(M.acc(f_garbage, y_masked).mean()) == pytest.approx(float(M.acc(f_nan, y_masked).mean()))
    psnr_ref = np.mean(
        [
            10 * np.log10(np.ptp(y.values[t][~mask]) ** 2 / np.mean((f.values[t] - y.values[t])[~mask] ** 2))
            for t in range(y.sizes["time"])
        ]
    )
    assert float(M.psnr(f_garbage, y_masked)) == pytest.approx(psnr_ref)
    ens = xr.concat([f_garbage, f_garbage + 1], "member")
    assert np.isfinite(float(M.crps(ens, y_masked)))
    assert float(M.crps(ens, y_masked)) < 10
    # a fully masked field does not poison the mean over time
    y_allnan = y.copy()
    y_allnan[0] = np.nan
    assert np.isfinite(float(M.ssim(f, y_allnan)))
    assert np.isfinite(float(M.psnr(f, y_allnan)))


def test_float_coordinate_tolerance_and_mismatch():
    y = grid()
    f = (y + 1).assign_coords(lat=y.lat.astype(np.float32))  # float32 latitudes: accepted
    assert float(M.rmse(f, y)) == pytest.approx(1.0)
    shifted = (y + 1).assign_coords(lon=y.lon + 1.0)
    with pytest.raises(ValueError, match="coordinates differ"):
        M.rmse(shifted, y)


# ---------------------------------------------------------------------------------------------------
# ACC
# ---------------------------------------------------------------------------------------------------
def test_acc_matches_pearson_of_anomalies():
    y = grid(nt=4, seed=3)
    f = y + np.random.default_rng(4).normal(size=y.shape)
    clim = y.mean("time") + 0.3 * np.random.default_rng(5).normal(size=y.shape[1:])
    got = M.acc(f, y, clim)
    for t in range(4):
        fa = (f[t] - clim).values.ravel()
        ya = (y[t] - clim).values.ravel()
        assert float(got[t]) == pytest.approx(np.corrcoef(fa, ya)[0, 1])
    # uncentred: plain cosine of the anomaly vectors
    fa = (f[0] - clim).values.ravel()
    ya = (y[0] - clim).values.ravel()
    cos = fa @ ya / np.sqrt((fa @ fa) * (ya @ ya))
    assert float(M.acc(f, y, clim, centered=False)[0]) == pytest.approx(cos)


def test_acc_default_is_member_to_member_climatology():
    y = grid(nt=5, seed=6)
    f = y + np.random.default_rng(7).normal(size=y.shape)
    np.testing.assert_allclose(M.acc(f, y).values, M.acc(f, y, y.mean("time")).values)
    # a training climatology far from this month leaves the seasonal signal in: higher ACC
    train = y.mean("time") - 30 * np.cos(np.deg2rad(y.lat))
    assert float(M.acc(f, y, train).mean()) > float(M.acc(f, y).mean()) + 0.1


# ---------------------------------------------------------------------------------------------------
# SSIM / PSNR against scikit-image directly
# ---------------------------------------------------------------------------------------------------
def test_ssim_matches_direct_skimage_call():
    from skimage.metrics import structural_similarity

    y = grid(nt=2, seed=8)
    f = y + 0.8 * np.random.default_rng(9).normal(size=y.shape)
    ref = np.mean(
        [structural_similarity(y.values[t], f.values[t], data_range=np.ptp(y.values[t])) for t in range(2)]
    )
    assert float(M.ssim(f, y)) == pytest.approx(ref, rel=1e-12)
    ref_fixed = structural_similarity(y.values[0], f.values[0], data_range=50.0)
    assert float(M.ssim(f[0], y[0], data_range=50.0)) == pytest.approx(ref_fixed, rel=1e-12)
    assert float(M.ssim(f, y)) < 0.99


def test_ssim_averages_over_valid_points_only():
    from skimage.metrics import structural_similarity

    y = grid(nt=1, ny=30, nx=40, seed=16)
    f = y + 2.0 * np.random.default_rng(17).normal(size=y.shape)
    y_masked = y.copy()
    y_masked[:, :, :20] = np.nan  # western half masked
    ref = structural_similarity(y.values[0, :, 20:], f.values[0, :, 20:], data_range=np.ptp(y.values[0, :, 20:]))
    got = float(M.ssim(f, y_masked))
    # equal up to the windows straddling the mask edge (filled with the truth mean there)
    assert got == pytest.approx(ref, abs=0.03)
    assert got < 0.5


def test_ssim_small_region_reduces_window():
    y = grid(nt=1, ny=5, nx=6)
    f = y + 0.1
    v = float(M.ssim(f, y))
    assert 0 < v < 1


def test_psnr_matches_skimage_and_formula():
    from skimage.metrics import peak_signal_noise_ratio

    y = grid(nt=1, seed=10)
    f = y + np.random.default_rng(11).normal(size=y.shape)
    L = np.ptp(y.values[0])
    ref = peak_signal_noise_ratio(y.values[0], f.values[0], data_range=L)
    assert float(M.psnr(f, y)) == pytest.approx(ref)
    assert ref == pytest.approx(10 * np.log10(L**2 / np.mean((f.values[0] - y.values[0]) ** 2)))


# ---------------------------------------------------------------------------------------------------
# Ensemble scores
# ---------------------------------------------------------------------------------------------------
def test_crps_against_energy_form():
    rng = np.random.default_rng(12)
    y = grid(nt=2, ny=6, nx=7, seed=12)
    ens = xr.concat([y + rng.normal(0.3, 1.0, size=y.shape) for _ in range(5)], "member")
    X = ens.transpose(..., "member").values  # (..., M)
    obs = y.values[..., None]
    M_ = X.shape[-1]
    e1 = np.abs(X - obs).mean(-1)
    pair = np.abs(X[..., :, None] - X[..., None, :]).sum((-1, -2))
    crps_nrg = e1 - 0.5 * pair / M_**2
    crps_fair = e1 - 0.5 * pair / (M_ * (M_ - 1))
    assert float(M.crps(ens, y, fair=False)) == pytest.approx(crps_nrg.mean())
    assert float(M.crps(ens, y, fair=True)) == pytest.approx(crps_fair.mean())
    assert float(M.crps(ens, y, fair=True)) < float(M.crps(ens, y, fair=False))


def test_crps_single_member_and_deterministic_equal_mae():
    y = grid(seed=13)
    f = y + np.random.default_rng(14).normal(size=y.shape)
    mae = float(M.mae(f, y))
    assert float(M.crps(f, y)) == pytest.approx(mae)  # no member dim
    assert float(M.crps(f.expand_dims(member=1), y, fair=True)) == pytest.approx(mae)
    assert float(M.crps(f.expand_dims(member=1), y, fair=False)) == pytest.approx(mae)


def _exchangeable(n_members=9, shape=(20, 25, 25), seed=0, spread=1.0):
    """Truth and members drawn from the same N(mu, 1) at each point, mu varying."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=shape) * 3
    dims = ("time", "lat", "lon")
    coords = {"lat": np.linspace(-30, 30, shape[1]), "lon": np.linspace(0, 60, shape[2])}
    y = xr.DataArray(mu + rng.normal(size=shape), dims=dims, coords=coords)
    ens = xr.DataArray(
        mu[None] + spread * rng.normal(size=(n_members,) + shape), dims=("member",) + dims, coords=coords
    )
    return ens, y


def test_spread_skill_ratio_calibrated_and_underdispersive():
    ens, y = _exchangeable(n_members=5)
    assert float(M.spread_skill_ratio(ens, y)) == pytest.approx(1.0, abs=0.03)
    ens_narrow, y2 = _exchangeable(n_members=5, spread=0.4)
    assert float(M.spread_skill_ratio(ens_narrow, y2)) < 0.6
    # the (M+1)/M correction matters for small M: without it a 2-member calibrated ensemble ~ sqrt(2/3)
    ens2, y3 = _exchangeable(n_members=2, seed=1)
    assert float(M.spread_skill_ratio(ens2, y3)) == pytest.approx(1.0, abs=0.05)
    assert np.isnan(float(M.spread_skill_ratio(ens.isel(member=[0]), y)))


def test_rank_histogram_flat_for_exchangeable_ensemble():
    from scipy.stats import chi2

    ens, y = _exchangeable(n_members=9, shape=(8, 25, 25))
    h = M.rank_histogram(ens, y)
    n = y.size
    assert h.dims == ("rank",) and h.sizes["rank"] == 10
    assert int(h.sum()) == n
    expected = n / 10
    stat = float((((h - expected) ** 2) / expected).sum())
    assert stat < chi2.ppf(0.999, df=9)
    # under-dispersive ensemble: U shape
    narrow, y2 = _exchangeable(n_members=9, shape=(8, 25, 25), spread=0.3)
    hn = M.rank_histogram(narrow, y2).values
    assert hn[0] > 2 * hn[5] and hn[-1] > 2 * hn[5]


def test_rank_histogram_ties_broken_randomly_and_nan_skipped():
    y = grid(nt=40, ny=10, nx=10, seed=15)
    ens = xr.concat([y] * 4, "member")  # every member equals the truth: all ties
    h = M.rank_histogram(ens, y, seed=0).values
    assert h.shape == (5,)
    assert h.min() > 0.8 * h.mean()  # without tie-breaking everything would sit in one bin
    np.testing.assert_array_equal(h, M.rank_histogram(ens, y, seed=0).values)  # seeded
    y_nan = y.copy()
    y_nan[:, 0, :] = np.nan
    assert int(M.rank_histogram(ens, y_nan).sum()) == y.size - 40 * 10


def test_rank_histogram_flatness_reliability_index_and_outside_fraction():
    flat = np.full(11, 100)
    assert float(M.reliability_index(flat)) == 0.0  # the ideal value
    assert float(M.outside_fraction(flat)) == pytest.approx(2 / 11)
    u_shape = np.array([300, 60, 40, 30, 20, 20, 20, 30, 40, 60, 300])  # under-dispersive
    dome = np.array([20, 40, 80, 120, 150, 160, 150, 120, 80, 40, 20])  # over-dispersive
    assert float(M.reliability_index(u_shape)) > float(M.reliability_index(dome)) > 0.0
    assert float(M.outside_fraction(u_shape)) > 2 / 11 > float(M.outside_fraction(dome))
    # hand value: one bin holds everything -> 2 M / (M + 1); independent of the sample size
    one = np.zeros(5, dtype=int)
    one[2] = 7
    assert float(M.reliability_index(one)) == pytest.approx(2 * 4 / 5)
    assert float(M.reliability_index(u_shape * 1000)) == pytest.approx(float(M.reliability_index(u_shape)))
    # from rank_histogram: exchangeable ensemble near 0, narrow one clearly worse; extra dims are kept
    ens, y = _exchangeable(n_members=9, shape=(8, 25, 25))
    narrow, y2 = _exchangeable(n_members=9, shape=(8, 25, 25), spread=0.3)
    ri, ri_narrow = float(M.reliability_index(M.rank_histogram(ens, y))), float(M.reliability_index(M.rank_histogram(narrow, y2)))
    assert ri < 0.1 < 0.5 < ri_narrow
    per_time = M.reliability_index(M.rank_histogram(ens, y, dims=("lat", "lon")))
    assert per_time.dims == (y.dims[0],) and per_time.sizes[y.dims[0]] == 8
    assert np.isnan(float(M.reliability_index(np.zeros(4))))  # an empty histogram has no flatness


# ---------------------------------------------------------------------------------------------------
# Power spectrum
# ---------------------------------------------------------------------------------------------------
def test_power_spectrum_peaks_at_sinusoid_wavenumber():
    n = 64
    j = np.arange(n)
    field = np.sin(2 * np.pi * 5 * j / n)[None, :] * np.ones((n, 1)) + 280.0
    da = xr.DataArray(field, dims=("lat", "lon"), coords={"lat": np.linspace(-60, 60, n), "lon": np.arange(n) * 1.0})
    s = M.power_spectrum(da)
    assert s.dims == ("wavenumber",)
    assert float(s.wavenumber[s.argmax("wavenumber")]) == pytest.approx(5 / n)
    assert float(s.wavelength[s.argmax("wavenumber")]) == pytest.approx(n / 5)
    # a single sharp peak
    assert float(s.max()) > 100 * float(s.median())
    # along latitude, and with masked points (filled with the field mean)
    da2 = xr.DataArray(field.T.copy(), dims=("lat", "lon"), coords=da.coords)
    da2[3:6, 3:6] = np.nan
    s2 = M.power_spectrum(da2)
    assert np.all(np.isfinite(s2))
    assert float(s2.wavenumber[s2.argmax("wavenumber")]) == pytest.approx(5 / n)


def test_power_spectrum_keeps_requested_dims_and_spacing():
    y = grid(nt=3, ny=16, nx=20)
    s = M.power_spectrum(y, dims=[])
    assert s.dims == ("time", "wavenumber") and s.sizes["wavenumber"] == 8
    s_km = M.power_spectrum(y, spacing=100.0)
    np.testing.assert_allclose(s_km.wavenumber.values, M.power_spectrum(y).wavenumber.values / 100.0)
    np.testing.assert_allclose(s.mean("time").values, M.power_spectrum(y).values)


# ---------------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------------
def _global(lon_convention="0..360", lat_descending=False):
    lat = np.arange(-88.75, 90, 2.5)
    lon = np.arange(0, 360, 2.5) if lon_convention == "0..360" else np.arange(-180, 180, 2.5)
    if lat_descending:
        lat = lat[::-1]
    data = np.cos(np.deg2rad(lat))[:, None] * 10 + np.sin(np.deg2rad(lon))[None, :]
    return xr.DataArray(data, dims=("lat", "lon"), coords={"lat": lat, "lon": lon})


@pytest.mark.parametrize("name", ["east_asia", "gulf_coast", "northern_australia"])
def test_select_region_conventions(name):
    a = M.select_region(_global("0..360"), name)
    b = M.select_region(_global("-180..180", lat_descending=True), name)
    box = M.REGIONS[name]
    assert a.lat.min() >= box.lat_min and a.lat.max() <= box.lat_max
    assert b.lat.values[0] > b.lat.values[-1]  # descending kept
    np.testing.assert_allclose(np.mod(a.lon.values, 360), np.mod(b.lon.values, 360))
    np.testing.assert_allclose(a.values, b.values[::-1])  # same data, lat order flipped
    assert a.sizes["lon"] == pytest.approx((box.lon_max - box.lon_min) / 2.5 + 1)
    assert np.all(np.diff(a.lon.values) > 0)


def test_select_region_gulf_coast_values_and_wrap():
    g = M.select_region(_global("0..360"), "gulf_coast")
    assert g.lon.values[0] == 260.0 and g.lon.values[-1] == 280.0
    assert g.lat.values[0] == pytest.approx(21.25) and g.lat.values[-1] == pytest.approx(33.75)
    w = M.select_region(_global("0..360"), M.Box(350.0, 10.0, -10.0, 10.0))  # crosses the seam
    np.testing.assert_allclose(w.lon.values, [350, 352.5, 355, 357.5, 0, 2.5, 5, 7.5, 10])
    assert M.select_region(_global(), "global").shape == _global().shape
    assert M.select_region(_global(), None).shape == _global().shape
    with pytest.raises(KeyError):
        M.select_region(_global(), "atlantis")
    with pytest.raises(ValueError, match="selects no points"):
        M.select_region(grid(), "gulf_coast")


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
def _benchmark_like():
    rng = np.random.default_rng(20)
    lat = np.arange(-60, 61, 2.5)
    lon = np.arange(0, 360, 2.5)
    base = 280 + 20 * np.cos(np.deg2rad(lat))[:, None] + 3 * np.sin(np.deg2rad(2 * lon))[None, :]
    y = xr.DataArray(
        base[None] + rng.normal(size=(3, lat.size, lon.size)),
        dims=("time", "lat", "lon"),
        coords={"time": np.arange(3), "lat": lat, "lon": lon},
        name="ts",
    )
    ens = xr.concat([y + rng.normal(size=y.shape) for _ in range(4)], "member")
    return y, ens


def test_score_table_structure_and_values():
    y, ens = _benchmark_like()
    lerp = y + 0.5
    clim = y.mean("time") + 1.0
    df = M.score_table(y, {"Lerp": lerp, "DPDM 4": ens, "DPDM single": ens.isel(member=[0]), "perfect": y}, climatology=clim)
    assert list(df.columns) == ["method", "region", "variable", "metric", "value"]
    assert list(dict.fromkeys(df.method)) == ["Lerp", "DPDM 4", "DPDM single", "perfect"]
    assert set(df.region) == {"global", "east_asia", "gulf_coast", "northern_australia"}
    assert set(df.variable) == {"ts"}

    def get(method, metric, region="global"):
        sel = df[(df.method == method) & (df.metric == metric) & (df.region == region)]
        assert len(sel) == 1, (method, metric, region)
        return float(sel.value.iloc[0])

    assert get("Lerp", "RMSE") == pytest.approx(0.5)
    assert get("Lerp", "CRPS") == pytest.approx(0.5)  # deterministic: CRPS = MAE
    assert get("perfect", "RMSE") == 0 and get("perfect", "SSIM") == pytest.approx(1.0)
    assert np.isposinf(get("perfect", "PSNR"))
    assert get("perfect", "ACC") == pytest.approx(1.0) and get("perfect", "ACC_train") == pytest.approx(1.0)
    # ensemble: paper's four on the ensemble mean, CRPS and SSR on members
    mean = ens.mean("member")
    assert get("DPDM 4", "RMSE") == pytest.approx(float(M.rmse(mean, y)))
    assert get("DPDM 4", "SSIM") == pytest.approx(float(M.ssim(mean, y)))
    assert get("DPDM 4", "CRPS") == pytest.approx(float(M.crps(ens, y)))
    ea = M.select_region(y, "east_asia")
    assert get("DPDM 4", "SSR", "east_asia") == pytest.approx(
        float(M.spread_skill_ratio(M.select_region(ens, "east_asia"), ea))
    )
    # single member: CRPS = its MAE, no SSR; deterministic: no SSR
    assert get("DPDM single", "CRPS") == pytest.approx(float(M.mae(ens.isel(member=0), y)))
    assert df[(df.metric == "SSR")].method.unique().tolist() == ["DPDM 4"]


def test_score_table_dataset_input_and_markdown():
    y, ens = _benchmark_like()
    ds_y = xr.Dataset({"ts": y, "u10": y * 0.01})
    ds_f = {"Lerp": ds_y + 0.1, "DPDM 4": xr.Dataset({"ts": ens, "u10": ens * 0.01})}
    df = M.score_table(ds_y, ds_f, regions=["global", "east_asia"])
    assert set(df.variable) == {"ts", "u10"}
    assert isinstance(df, pd.DataFrame)
    md = M.to_markdown(df, units={"ts": "K"})
    lines = md.splitlines()
    assert "**global**" in lines and "**east_asia**" in lines
    assert "Cells: RMSE / ACC / SSIM / PSNR / CRPS / SSR" in lines
    header = next(l for l in lines if l.startswith("| method"))
    assert header == "| method | ts (K) | u10 |"
    lerp_row = next(l for l in lines if l.startswith("| Lerp"))
    cells = lerp_row.strip("|").split("|")
    assert len(cells) == 3
    assert cells[1].strip().split(" / ")[0] == "0.1000"  # RMSE of a 0.1 offset, 4 significant digits
    assert cells[1].strip().endswith("/ –")  # SSR missing for a deterministic method
    cols = M.to_markdown(df[df.variable == "ts"], style="columns", floatfmt=".2f")
    assert "| method | RMSE | ACC | SSIM | PSNR | CRPS | SSR |" in cols
    assert "| Lerp | 0.10 |" in cols


def test_score_table_rejects_unknown_metric():
    y, ens = _benchmark_like()
    with pytest.raises(ValueError, match="Unknown metrics"):
        M.score_table(y, {"a": y}, metrics=["RMSE", "FOO"])
    with pytest.raises(ValueError, match="climatology"):
        M.score_table(y, {"a": y}, metrics=["ACC_train"])
