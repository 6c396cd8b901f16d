"""Climate scores, ETCCDI indices and noise correlated in time, against values known by construction."""

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import make_low_res, make_static

from dpdm_diffusers import climate_scores as cs
from dpdm_diffusers import metrics, seeding


def field(nt=40, ny=6, nx=8, seed=0, start="1961"):
    rng = np.random.default_rng(seed)
    time = xr.date_range(start, periods=nt, freq="YS", use_cftime=True)
    return xr.DataArray(rng.normal(280, 2, (nt, ny, nx)), dims=("time", "lat", "lon"),
                        coords={"time": time, "lat": np.arange(ny), "lon": np.arange(nx)}, attrs={"units": "K"})


def ar1(phi, nt=4000, ny=3, nx=3, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((nt, ny, nx))
    for t in range(1, nt):
        x[t] = phi * x[t - 1] + rng.normal(size=(ny, nx))
    time = xr.date_range("1000", periods=nt, freq="YS", use_cftime=True)
    return xr.DataArray(x, dims=("time", "lat", "lon"), coords={"time": time})


def test_distribution_scores_of_a_shift_are_the_shift():
    y = field()
    f = y + 2.0
    assert cs.quantile_bias(f, y, 0.01) == pytest.approx(2.0)
    assert cs.quantile_bias(f, y, 0.99) == pytest.approx(2.0)
    assert cs.wasserstein(f, y) == pytest.approx(2.0)
    shift = xr.DataArray(np.arange(6.0)[:, None] * np.ones(8), dims=("lat", "lon"))
    per_point = cs.wasserstein_per_point(y + shift, y)
    np.testing.assert_allclose(per_point.values, shift.values, atol=1e-9)
    # a spread-out distribution with the right mean: its tails are wrong, its mean error is not
    wide = y.mean() + 2 * (y - y.mean())
    assert cs.quantile_bias(wide, y, 0.99) > 0 > cs.quantile_bias(wide, y, 0.01)


def test_ralsd_is_the_log_power_ratio_in_db():
    y = field()
    assert cs.ralsd(y, y) == pytest.approx(0.0, abs=1e-9)
    assert cs.ralsd(y.mean() + 2 * (y - y.mean()), y) == pytest.approx(10 * np.log10(4), rel=1e-6)
    smooth = y.rolling(lon=3, center=True, min_periods=1).mean()
    assert cs.ralsd(smooth, y) > 1.0  # smoothing removes power at high wavenumbers


def test_lag1_autocorrelation_recovers_an_ar1_and_ignores_a_trend():
    x = ar1(0.6)
    assert float(cs.lag1_autocorrelation(x).mean()) == pytest.approx(0.6, abs=0.04)
    trend = xr.DataArray(np.linspace(0, 50, x.sizes["time"]), dims="time", coords={"time": x.time})
    assert float(cs.lag1_autocorrelation(x + trend).mean()) == pytest.approx(0.6, abs=0.04)
    # without detrending a trend looks like persistence
    assert float(cs.lag1_autocorrelation(x + trend, detrend=False).mean()) > 0.95
    white = ar1(0.0, seed=1)
    assert cs.lag1_autocorrelation_bias(white, x) == pytest.approx(-0.6, abs=0.06)
    # two periods scored together (a gap and a 10 K jump between them): neither the jump nor the gap is persistence
    early, late = x.isel(time=slice(0, 1500)), x.isel(time=slice(2500, 4000)) + 10.0
    both = xr.concat([early, late], dim="time")
    assert float(cs.lag1_autocorrelation(both).mean()) == pytest.approx(0.6, abs=0.04)
    np.testing.assert_allclose(cs.anomalies(both).isel(time=slice(1500, None)).values,
                               cs.anomalies(late).values, atol=1e-9)


def test_interannual_variability_of_monthly_data_uses_annual_means():
    y = field(nt=30)
    f = y.mean("time") + 1.5 * (y - y.mean("time"))
    assert cs.interannual_variability_ratio(f, y) == pytest.approx(1.5)
    time = xr.date_range("2000-01-01", periods=24, freq="MS", use_cftime=True)
    monthly = xr.DataArray(np.r_[np.zeros(12), np.ones(12)][:, None, None] + np.zeros((24, 2, 2)), dims=("time", "y", "x"),
                           coords={"time": time})
    assert cs._years(monthly).sizes["time"] == 2


def test_change_signal_and_its_bias():
    y = field(nt=140, start="1960")
    step = xr.where(y.time.dt.year >= 2070, 3.0, 0.0)
    truth = y * 0 + 280 + step
    np.testing.assert_allclose(cs.change_signal(truth, ("1961", "1990"), ("2070", "2099")).values, 3.0)
    warmer = truth + xr.where(y.time.dt.year >= 2070, 0.5, 0.0)
    bias = cs.change_signal_bias(warmer, truth, ("1961", "1990"), ("2070", "2099"))
    np.testing.assert_allclose(bias.values, 0.5)
    with pytest.raises(ValueError, match="No time step"):
        cs.change_signal(truth, ("1800", "1810"), ("2070", "2099"))


def test_intervariable_correlation():
    y = field()
    ds = xr.Dataset({"a": y, "b": -2 * y + 1})
    np.testing.assert_allclose(cs.intervariable_correlation(ds, "a", "b").values, -1.0)


def test_tail_scores_against_their_definitions():
    y = field(nt=10)
    rng = np.random.default_rng(3)
    ens = xr.concat([y + rng.normal(0, 1, y.shape) for _ in range(5)], dim="member")
    # below every value the weighting is the identity: the twCRPS is the CRPS
    assert cs.threshold_weighted_crps(ens, y, -1e9) == pytest.approx(float(metrics.crps(ens, y, fair=False)), rel=1e-9)
    assert cs.threshold_weighted_crps(ens, y, 1e9) == pytest.approx(0.0, abs=1e-12)
    assert cs.brier_score(ens * 0 + 300, y * 0 + 300, 290) == pytest.approx(0.0)
    assert cs.brier_score(ens * 0 + 300, y * 0 + 280, 290) == pytest.approx(1.0)
    half = xr.concat([y * 0 + 280, y * 0 + 300], dim="member")
    assert cs.brier_score(half, y * 0 + 300, 290) == pytest.approx(0.25)


def test_score_gives_member_mean_and_spread_and_skips_what_the_data_cannot_support():
    y = field(nt=6)
    ens = xr.concat([y + k for k in range(4)], dim="member")
    table = cs.score(y.to_dataset(name="t"), {"ens": ens.to_dataset(name="t"), "det": (y + 1).to_dataset(name="t")},
                     ["bias", "q99_bias", "CRPS", "change_signal_bias"])
    row = table[(table.method == "ens") & (table.metric == "bias")].iloc[0]
    assert row.value == pytest.approx(1.5) and row.member_spread == pytest.approx(np.std([0, 1, 2, 3]))
    assert row.members == 4 and row.units == "K"
    assert set(table[table.method == "det"].metric) == {"bias", "q99_bias"}  # CRPS needs an ensemble
    assert "change_signal_bias" in table.attrs["skipped"]  # no periods given
    no_time = cs.score(y.isel(time=0, drop=True), {"x": y.isel(time=0, drop=True)}, ["lag1_autocorrelation_bias"])
    assert no_time.empty and "time" in no_time.attrs["skipped"]["lag1_autocorrelation_bias"]
    with pytest.raises(KeyError, match="Unknown metric"):
        cs.score(y, {"x": y}, ["nope"])
    assert "| ens |" in cs.markdown_table(table, "t") and "±" in cs.markdown_table(table, "t")


def test_a_new_metric_is_one_registry_entry():
    name = "max_error_test"
    cs.register(name, cs.Metric(lambda f, t, **_: float(abs(f - t).max()), description="largest error"))
    try:
        y = field(nt=3)
        table = cs.score(y, {"x": y + 4}, [name])
        assert float(table.value.iloc[0]) == pytest.approx(4.0)
        with pytest.raises(ValueError, match="registered already"):
            cs.register(name, cs.REGISTRY[name])
    finally:
        cs.REGISTRY.pop(name)


# ---------------------------------------------------------------------------------------------------
# ETCCDI indices (xclim)
# ---------------------------------------------------------------------------------------------------
def daily(values_per_year: list[np.ndarray], units: str, name: str) -> xr.DataArray:
    vals = np.concatenate(values_per_year)
    time = pd.date_range("2001-01-01", periods=vals.size, freq="D")
    return xr.DataArray(vals[:, None, None], dims=("time", "lat", "lon"), name=name,
                        coords={"time": time, "lat": [0.0], "lon": [0.0]}, attrs={"units": units})


def rain_year(days: dict, n=365) -> np.ndarray:
    x = np.zeros(n)
    for d, v in days.items():
        x[d] = v
    return x


def test_precipitation_indices_have_their_hand_computed_values():
    from dpdm_diffusers import climate_indices as ci

    y1 = rain_year({9: 2.0, 10: 3.0, 11: 4.0, 99: 50.0})
    y2 = rain_year({9: 2.0, 10: 3.0, 11: 4.0, 99: 10.0})
    y3 = rain_year({9: 2.0, 10: 3.0, 11: 4.0, 99: 10.0})
    pr = daily([y1, y2, y3], "mm", "pr")  # daily totals in mm: read as mm/day
    assert ci.is_daily(pr)
    one = lambda name: ci.compute_index(name, {"pr": pr}).values[:, 0, 0]  # noqa: E731
    np.testing.assert_allclose(one("Rx1day"), [50, 10, 10])
    np.testing.assert_allclose(one("SDII"), [59 / 4, 19 / 4, 19 / 4])
    np.testing.assert_allclose(one("CWD"), [3, 3, 3])
    assert one("CDD")[0] == 365 - 100  # the dry spell after the last wet day of the year
    # R95pTOT: the 95th percentile of the 12 wet days is 10 + 0.45 * 40 = 28 mm; only the 50 mm day exceeds it
    np.testing.assert_allclose(one("R95pTOT"), [50 / 59, 0, 0], atol=1e-6)


def test_index_scores_per_member_and_spread():
    from dpdm_diffusers import climate_indices as ci

    pr = daily([rain_year({9: 2.0, 99: 20.0}), rain_year({9: 2.0, 99: 10.0})], "mm", "pr")
    tas = daily([np.r_[np.full(10, 300.0), np.full(355, 280.0)], np.full(365, 280.0)], "K", "tas")
    assert ci.compute_index("SU", {"tas": tas}).values[:, 0, 0].tolist() == [10, 0]  # 300 K = 26.85 degC
    assert ci.compute_index("TXx", {"tas": tas}).values[:, 0, 0].tolist() == [300, 280]
    ens = xr.concat([pr, 2 * pr], dim="member")
    rows = ci.index_scores("Rx1day", {"pr": pr}, {"same": {"pr": pr}, "ens": {"pr": ens}})
    same, e = rows
    assert same["mean_bias"] == 0 and same["member_index_spread"] == 0 and same["ratio"] == 1
    # members' Rx1day: (20, 10) and (40, 20); truth (20, 10): biases 0 and 15 -> mean 7.5, spread 7.5
    assert e["mean_bias"] == pytest.approx(7.5) and e["member_bias_spread"] == pytest.approx(7.5)
    assert e["member_index_spread"] == pytest.approx((10 + 5) / 2)
    wd = ci.index_scores("warm_dry", {"pr": pr, "tas": tas}, {"same": {"pr": pr, "tas": tas}})
    assert wd[0]["mean_bias"] == 0
    assert ci.roles(xr.Dataset({"tp": pr, "t2m": tas})) == {"pr": "tp", "tas": "t2m"}
    assert ci.indices_for(["pr"]) == ["Rx1day", "SDII", "CDD", "CWD", "R95pTOT"]
    with pytest.raises(ValueError, match="needs"):
        ci.compute_index("warm_dry", {"pr": pr})
    with pytest.raises(ValueError, match="no units"):
        ci.compute_index("Rx1day", {"pr": pr.assign_attrs(units="")})


# ---------------------------------------------------------------------------------------------------
# Noise correlated in time
# ---------------------------------------------------------------------------------------------------
def test_time_correlated_noise_has_its_lag1_correlation_and_unit_variance():
    samples = [("", t) for t in range(300)]
    z = seeding.time_correlated_noise([7], samples, (1, 6, 6), 0.7).reshape(300, -1).numpy()
    assert z.std() == pytest.approx(1.0, abs=0.05)
    lag1 = np.mean([np.corrcoef(z[:-1, i], z[1:, i])[0, 1] for i in range(z.shape[1])])
    assert lag1 == pytest.approx(0.7, abs=0.05)
    # a sample's noise depends on its own time index only, never on its neighbours in the call
    alone = seeding.time_correlated_noise([7], samples[150:151], (1, 6, 6), 0.7)
    torch.testing.assert_close(alone[0], torch.from_numpy(z[150]).reshape(1, 6, 6).float())
    with pytest.raises(ValueError, match="noise_time_correlation"):
        seeding.time_correlated_noise([7], samples, (1, 2, 2), 0.99)


def test_time_index_counts_steps_in_the_data_calendar():
    import cftime

    assert seeding.time_index(cftime.Datetime360Day(2000, 2, 30), "day") + 1 == \
        seeding.time_index(cftime.Datetime360Day(2000, 3, 1), "day")
    assert seeding.time_index(np.datetime64("2000-12-01"), "month") + 1 == \
        seeding.time_index(np.datetime64("2001-01-01"), "month")
    assert seeding.infer_time_unit(xr.date_range("2000", periods=3, freq="YS", use_cftime=True).values) == "year"
    with pytest.raises(ValueError, match="noise_time_unit"):
        seeding.infer_time_unit(np.array(["2000-01-01"], dtype="datetime64[ns]"))


def test_pipeline_noise_correlated_in_time_is_exact_across_chunks(pipe):
    low = make_low_res(ntime=6)
    from dpdm_diffusers.grids import Grid

    static = make_static(Grid.from_xarray(low).refine(4))
    kw = dict(static_fields=static, num_members=2, num_inference_steps=2, noise_time_correlation=0.6)
    whole = pipe(low, generator=torch.Generator().manual_seed(0), **kw).members
    parts = [pipe(low.isel(time=s), generator=torch.Generator().manual_seed(0), noise_time_unit="month", **kw).members
             for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    xr.testing.assert_allclose(whole, xr.concat(parts, "time"), atol=1e-5, rtol=0)
    independent = pipe(low, generator=torch.Generator().manual_seed(0), **{**kw, "noise_time_correlation": 0.0}).members
    assert not np.allclose(whole["tas"].values, independent["tas"].values)
    with pytest.raises(ValueError, match="noise_time_unit"):
        pipe(low.isel(time=[0]), **kw)
    with pytest.raises(ValueError, match="noise_time_correlation must be"):
        pipe(low, **{**kw, "noise_time_correlation": 1.0})


# ---------------------------------------------------------------------------------------------------
# dpdm evaluate on any files
# ---------------------------------------------------------------------------------------------------
def write_daily_case(tmp_path):
    """Daily truth (temperature and precipitation) on 8 x 8 points, its 4 x 4 block means and a 3-member ensemble
    that is the truth plus 1 K and 20% more rain."""
    rng = np.random.default_rng(0)
    time = pd.date_range("2001-01-01", periods=3 * 365, freq="D")
    lat, lon = 10 + np.arange(8) * 0.25, 100 + np.arange(8) * 0.25
    shape = (time.size, 8, 8)
    seasonal = 10 * np.sin(2 * np.pi * np.arange(time.size) / 365)[:, None, None]
    tas = 290 + seasonal + rng.normal(0, 2, shape)
    pr = np.where(rng.random(shape) < 0.3, rng.gamma(0.8, 6, shape), 0.0)
    coords = {"time": time, "lat": ("lat", lat, {"units": "degrees_north"}),
              "lon": ("lon", lon, {"units": "degrees_east"})}
    truth = xr.Dataset({"tas": (("time", "lat", "lon"), tas, {"units": "K"}),
                        "pr": (("time", "lat", "lon"), pr, {"units": "mm"})}, coords=coords)
    truth.to_netcdf(tmp_path / "truth.nc")
    from dpdm_diffusers.data import coarsen

    coarsen(truth, 4).to_netcdf(tmp_path / "low.nc")
    ens = xr.concat([truth.assign(tas=truth.tas + 1 + 0.1 * k, pr=truth.pr * 1.2) for k in range(3)], dim="member")
    ens.to_netcdf(tmp_path / "ens.nc")
    return truth


def test_dpdm_evaluate_scores_forecast_files_with_baselines_indices_and_figures(tmp_path):
    import json

    from typer.testing import CliRunner

    from dpdm_diffusers.cli import app

    write_daily_case(tmp_path)
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, [
        "evaluate", "--truth", str(tmp_path / "truth.nc"), "--forecast", f"dpdm={tmp_path / 'ens.nc'}",
        "--low-res", str(tmp_path / "low.nc"), "--reference", "2001,2001", "--future", "2003,2003",
        "--out-dir", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "scores.json").read_text())
    climate = pd.DataFrame(report["climate"])
    pick = lambda m, v, k: climate[(climate.method == m) & (climate.variable == v) & (climate.metric == k)].iloc[0]  # noqa: E731
    assert pick("dpdm", "tas", "bias").value == pytest.approx(1.1)  # members +1.0, +1.1, +1.2
    assert pick("dpdm", "tas", "bias").member_spread == pytest.approx(np.std([1.0, 1.1, 1.2]))
    assert pick("dpdm", "tas", "change_signal_bias").value == pytest.approx(0.0, abs=1e-9)
    assert pick("dpdm", "pr", "q99_bias").value > 0 and pick("bicubic", "tas", "RALSD").value > 1
    assert {"bilinear", "bicubic", "dpdm"} <= set(climate.method)
    indices = pd.DataFrame(report["indices"])
    rx = indices[(indices["index"] == "Rx1day") & (indices.method == "dpdm")].iloc[0]
    assert rx.ratio == pytest.approx(1.2)
    su = indices[(indices["index"] == "TXx") & (indices.method == "dpdm")].iloc[0]
    assert su.mean_bias == pytest.approx(1.1)
    for kind in ("spectra", "qq", "rank", "bias_maps"):
        assert (out / f"scores_tas_{kind}.png").stat().st_size > 1000
    assert "ETCCDI" in (out / "scores.md").read_text()
    # shifting temperature and scaling rain keep their link over time: no correlation bias, for every member
    link = [r for r in report["consistency"] if r["pair"] == "tas-pr" and r["method"] == "dpdm"][0]
    assert link["time_correlation_bias"] == pytest.approx(0.0, abs=1e-9) and link["time_correlation_spread"] < 1e-9
    # a forecast on another grid is refused, naming the problem
    xr.open_dataset(tmp_path / "ens.nc").isel(lat=slice(0, 4)).to_netcdf(tmp_path / "cut.nc")
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "truth.nc"), "--forecast",
                                   str(tmp_path / "cut.nc"), "--out-dir", str(out)])
    assert res.exit_code != 0 and "not on the truth's grid" in res.output


def two_stage(noise_time_correlation=0.0, noise_time_unit=None):
    from conftest import make_pipeline

    from dpdm_diffusers import DownscalingPipeline

    diff, reg = make_pipeline(seed=0), make_pipeline(seed=1)
    return DownscalingPipeline(unet=diff.unet, scheduler=diff.scheduler, regression_unet=reg.unet,
                               **{k: v for k, v in diff.config.items() if not k.startswith("_") and k not in
                                  ("noise_time_correlation", "noise_time_unit", *diff.components)},
                               noise_time_correlation=noise_time_correlation, noise_time_unit=noise_time_unit)


def test_a_model_carries_its_noise_correlation_and_the_call_can_override_it(tmp_path):
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.grids import Grid

    low = make_low_res(ntime=4)
    static = make_static(Grid.from_xarray(low).refine(4))
    pipe = two_stage(0.6, "month")
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "m")
    pipe = DownscalingPipeline.from_pretrained(tmp_path / "m")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.noise_time_correlation == 0.6 and pipe.config.noise_time_unit == "month"
    kw = dict(static_fields=static, num_members=2, num_inference_steps=2)
    run = lambda **k: pipe(low, generator=torch.Generator().manual_seed(0), **kw, **k).members["tas"].values  # noqa: E731
    np.testing.assert_allclose(run(), run(noise_time_correlation=0.6), atol=1e-6)
    assert not np.allclose(run(), run(noise_time_correlation=0.0))
    # one time step: the model's unit serves; array input has no time axis and draws independently, silently
    one = pipe(low.isel(time=[2]), generator=torch.Generator().manual_seed(0), **kw).members["tas"].values
    np.testing.assert_allclose(one[:, 0], run()[:, 2], atol=1e-5)
    with pytest.raises(ValueError, match="noise_time_correlation must be"):
        two_stage(1.5)


def test_training_measures_the_residual_persistence_of_its_data():
    from dpdm_diffusers.data import PairedData, coarsen
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.training.stages import measure_noise_time_correlation
    from dpdm_diffusers.user_data import RegionData

    high = make_low_res(nlat=24, nlon=32, ntime=12, step=0.25)
    region = RegionData(pairs=PairedData(high, coarsen(high, 4), 4),
                        static=xr.Dataset(make_static(Grid.from_xarray(high))), train={}, validation=None)
    pipe = two_stage()
    pipe.set_progress_bar_config(disable=True)
    out = measure_noise_time_correlation(pipe, region)
    assert out["noise_time_unit"] == "month"
    assert out["noise_time_correlation"] == round(min(max(out["measured"], 0.0), 0.95), 2)
    assert pipe.config.noise_time_correlation == out["noise_time_correlation"]
    short = RegionData(pairs=PairedData(high.isel(time=slice(0, 5)), coarsen(high, 4).isel(time=slice(0, 5)), 4),
                       static=region.static, train={}, validation=None)
    assert measure_noise_time_correlation(two_stage(), short) is None  # 5 steps cannot tell
