"""Five variables, precipitation first: units, transforms, per-variable interpolation, dry threshold, per-variable
spread calibration, training from scratch on your files and scoring any model on any files (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_low_res, make_pipeline, make_static

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.grids import Grid, interpolate, interpolate_variables
from dpdm_diffusers.transforms import forward_transform, inverse_transform
from dpdm_diffusers.units import compatible_units, convert_units, same_units, unit_factor

VARS = ("tas", "pr")


# ---- units -------------------------------------------------------------------------------------
def test_precipitation_units_convert_through_the_density_of_water():
    assert same_units("kg m**-2", "mm") and same_units("kg m-2", "mm")  # GRIB's tp is a depth in mm
    assert unit_factor("m", "mm") == (1000.0, 0.0)  # ERA5 tp
    assert unit_factor("kg m-2 s-1", "mm/day")[0] == pytest.approx(86400.0)
    assert unit_factor("m", "kg m-2")[0] == pytest.approx(1000.0)
    assert not compatible_units("K", "mm")
    da = xr.DataArray(np.array([0.001, 0.002]), dims="x", attrs={"units": "m"}, name="tp")
    np.testing.assert_allclose(convert_units(da, "mm").values, [1.0, 2.0])


def test_an_accumulation_and_a_rate_need_the_period_and_say_so():
    with pytest.raises(ValueError, match="accumulation and the other a rate"):
        unit_factor("kg m-2", "mm/day")
    with pytest.raises(ValueError, match="accumulation period|accumulation and the other"):
        unit_factor("mm", "mm day-1")


# ---- transforms, interpolation, dry threshold ------------------------------------------------------
def test_sqrt_transform_round_trips_and_never_squares_a_negative_back():
    x = torch.tensor([0.0, 0.25, 4.0, 100.0])
    np.testing.assert_allclose(inverse_transform(forward_transform(x, "sqrt"), "sqrt"), x, rtol=1e-6)
    assert forward_transform(torch.tensor([-1e-6]), "sqrt").item() == 0.0  # regridding noise below zero
    assert inverse_transform(torch.tensor([-0.5]), "sqrt").item() == 0.0  # "drier than dry" is 0, not 0.25


def test_interpolation_per_variable_matches_each_method_alone():
    src = Grid(np.arange(6) + 10.5, np.arange(8) + 100.5)
    dst = src.refine(4)
    values = np.random.default_rng(0).random((2, 2, 6, 8))
    out = interpolate_variables(values, src, dst, ["bicubic", "bilinear"])
    np.testing.assert_allclose(out[:, 0], interpolate(values[:, 0], src, dst, "bicubic"))
    np.testing.assert_allclose(out[:, 1], interpolate(values[:, 1], src, dst, "bilinear"))
    with pytest.raises(ValueError, match="2 variables"):
        interpolate_variables(values, src, dst, ["bicubic"])


def _precip_pipeline(dry_threshold=(0.0, 0.5), interpolation=("bicubic", "bilinear"), transform="sqrt"):
    pipe = make_pipeline(variables=VARS, units=["K", "mm"], transforms=["identity", transform])
    cfg = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components}
    cfg.update(norm_mean=[0.0, 1.0], norm_std=[10.0, 1.0], interpolation=list(interpolation),
               dry_threshold=list(dry_threshold))
    out = DownscalingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, **cfg)
    out.set_progress_bar_config(disable=True)
    return out


def _precip_low_res():
    low = make_low_res(variables=VARS, units=["K", "mm"], ntime=1)
    low["pr"] = (low["pr"] - 280.0).clip(min=0).assign_attrs(units="mm")  # 0 .. a few mm, with dry cells
    low["tas"] = (low["tas"] - 280.0).assign_attrs(units="K")  # an anomaly (like a wind): both signs
    return low


def test_precipitation_output_is_non_negative_with_exact_zeros_below_the_dry_threshold(static):
    pipe = _precip_pipeline()
    out = pipe(_precip_low_res(), static_fields=static, num_members=3, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    pr = out.members.pr.values
    assert pr.min() >= 0 and not ((pr > 0) & (pr < 0.5)).any() and (pr == 0).any()
    tas = out.members.tas.values  # a threshold of 0 leaves other variables alone, their negative values too
    assert tas.min() < -1 and tas.max() > 1
    assert pipe.config.interpolation == ["bicubic", "bilinear"]
    with pytest.raises(ValueError, match="dry_threshold"):
        _precip_pipeline(dry_threshold=(0.0, -1.0))
    with pytest.raises(ValueError, match="Unknown interpolation"):
        _precip_pipeline(interpolation=("bicubic", "nearest"))


def test_multiplicative_conservation_for_sqrt_precipitation(static):
    pipe = _precip_pipeline(dry_threshold=(0.0, 0.0))
    low = _precip_low_res()
    out = pipe(low, static_fields=static, num_members=2, num_inference_steps=2, conserve=True,
               generator=torch.Generator().manual_seed(0))
    pr = out.members.pr.isel(time=0).values
    block = pr.reshape(2, 6, 4, 8, 4).mean((2, 4))
    np.testing.assert_allclose(block, np.broadcast_to(low.pr.isel(time=0).values, block.shape), rtol=1e-4, atol=1e-4)
    assert pr.min() >= 0  # multiplicative: no negative precipitation to balance a block


# ---- data: Gaussian grids, longitude boxes, declared units --------------------------------------
def _gaussian_file(tmp_path, units=True):
    lat = np.linspace(59.7, 30.3, 16) + 0.02 * np.sin(np.arange(16))  # near-regular, descending (GRIB order)
    lon = np.arange(24) * 1.5 + 230.0
    rng = np.random.default_rng(1)
    ds = xr.Dataset({"2t": (("latitude", "longitude"), 280 + rng.random((16, 24)), {"units": "K"}),
                     "tp": (("latitude", "longitude"), 5 * rng.random((16, 24)),
                            {"units": "kg m**-2"} if units else {}),
                     "orog": (("latitude", "longitude"), 100 * rng.random((16, 24)), {"units": "m"}),
                     "lsm": (("latitude", "longitude"), rng.random((16, 24)).round(), {"units": "(0 - 1)"})},
                    coords={"latitude": lat, "longitude": lon})
    path = tmp_path / "gauss.nc"
    ds.to_netcdf(path)
    return path


def test_regular_grid_option_reaches_the_files_and_the_static_file(tmp_path):
    from dpdm_diffusers.user_data import load_region

    f = str(_gaussian_file(tmp_path))
    kw = dict(scale_factor=4, variables=["2t", "tp"], static_channels=["topography", "land_sea_mask"],
              static_files={"topography": f, "land_sea_mask": f}, static_map={"orog": "topography",
                                                                              "lsm": "land_sea_mask"})
    with pytest.raises(ValueError, match="irregular.*regular_grid"):
        load_region(f, **kw)
    region = load_region(f, regular_grid=True, declared_units={"tp": "mm"}, lon_box=[230, 262], **kw)
    assert region.pairs.high_res.tp.attrs["units"] == "mm"
    lon = region.pairs.high_res.lon.values
    assert lon[0] == pytest.approx(230.0) and lon[-1] < 263  # the caller's 230..262, not -130..-98
    assert set(region.static.data_vars) == {"topography", "land_sea_mask"}


def test_units_can_be_declared_for_a_file_without_them(tmp_path):
    from dpdm_diffusers.user_data import load_region

    f = str(_gaussian_file(tmp_path, units=False))
    with pytest.raises(ValueError, match="'tp' has no `units`"):
        load_region(f, scale_factor=4, variables=["2t", "tp"], regular_grid=True)
    region = load_region(f, scale_factor=4, variables=["2t", "tp"], regular_grid=True, declared_units={"tp": "mm"})
    assert region.pairs.high_res.tp.attrs["units"] == "mm"
    with pytest.raises(ValueError, match="not among the variables"):
        load_region(f, scale_factor=4, variables=["2t", "tp"], regular_grid=True, declared_units={"pr": "mm"})


def test_a_box_keeps_the_callers_longitude_convention():
    from dpdm_diffusers.data import select_box

    ds = xr.Dataset({"x": (("lat", "lon"), np.zeros((2, 360)))}, coords={"lat": [0.0, 1.0],
                                                                          "lon": np.arange(-180.0, 180.0)})
    assert select_box(ds, lon=(230, 330)).lon.values[[0, -1]].tolist() == [230.0, 330.0]
    assert select_box(ds, lon=(-130, -30)).lon.values[[0, -1]].tolist() == [-130.0, -30.0]
    assert select_box(ds, lon=(170, -170)).lon.values[[0, -1]].tolist() == [170.0, 190.0]


# ---- per-variable spread calibration ---------------------------------------------------------------
def test_each_variable_gets_its_own_spread_factor_and_a_pinned_search_widens(static):
    from dpdm_diffusers.calibration import calibrate_spread

    diff, reg = make_pipeline(variables=("a", "b"), seed=0), make_pipeline(variables=("a", "b"), seed=1)
    cfg = {k: v for k, v in diff.config.items() if not k.startswith("_") and k not in diff.components}
    pipe = DownscalingPipeline(unet=diff.unet, scheduler=diff.scheduler, regression_unet=reg.unet,
                               **{**cfg, "stochastic_std": [0.5, 0.5]})
    pipe.set_progress_bar_config(disable=True)
    low = make_low_res(variables=("a", "b"), ntime=2)
    center = pipe.regression_pipeline()(low, static_fields=static).mean
    sample = pipe(low, static_fields=static, num_inference_steps=2, generator=torch.Generator().manual_seed(99)).members
    sample = sample.isel(member=0)
    # variable a: an error twice the model's spread; b: ten times (beyond the default 0.5..4 range)
    truth = xr.Dataset({"a": center.a + 2.0 * (sample.a - center.a), "b": center.b + 10.0 * (sample.b - center.b)})
    res = calibrate_spread(pipe, low, truth, static_fields=static, num_members=8, num_inference_steps=2)
    fa, fb = res["factors"]["a"], res["factors"]["b"]
    assert 1.3 <= fa <= 3.0 and fb > 4.0 and fb / fa > 2.5  # one factor each, found beyond the default range
    assert res["stochastic_std"] == pytest.approx([0.5 * fa, 0.5 * fb]) and res["pinned"] == []
    assert 0.7 < res["per_variable"]["b"]["ssr"] < 1.4


# ---- field statistics --------------------------------------------------------------------------
def test_precipitation_summary_and_fine_scale_consistency():
    from dpdm_diffusers.field_statistics import fine_scale_correlation, precipitation_summary

    v = xr.DataArray(np.array([0.0, 0.05, 0.5, 2.0, 20.0, -1.0]), dims="x")
    s = precipitation_summary(v, thresholds=(0.1, 1.0))
    assert s["wet>=0.1"] == pytest.approx(3 / 6) and s["wet>=1"] == pytest.approx(2 / 6)
    assert s["negative"] == pytest.approx(1 / 6) and s["mean"] == pytest.approx(21.55 / 6)
    rng = np.random.default_rng(0)
    a = rng.random((8, 8))
    ds = xr.Dataset({"t": (("lat", "lon"), a), "p": (("lat", "lon"), -2 * a + 3),
                     "q": (("lat", "lon"), rng.random((8, 8)))})
    assert fine_scale_correlation(ds, "t", "p", 4) == pytest.approx(-1.0)
    assert abs(fine_scale_correlation(ds, "t", "q", 4)) < 0.5


# ---- training from scratch, scoring on files -----------------------------------------------------
def test_train_config_defaults_two_stage_interpolation_and_dry_threshold(tmp_path):
    from dpdm_diffusers.training.config import resolve_options
    from dpdm_diffusers.training.data import default_interpolation, dry_thresholds
    from dpdm_diffusers.training.finetune import train_config

    cfg = train_config(["x.nc"], output_dir=tmp_path, variables=["2t", "tp"], units=["tp=mm"],
                       dry_threshold=["tp=0.2"])
    assert cfg.two_stage and cfg.init_from is None and cfg.units == {"tp": "mm"} and cfg.dry_threshold == {"tp": 0.2}
    cfg, kind = resolve_options(cfg)
    assert kind is None and cfg.interpolation == "auto"
    assert default_interpolation("auto") == "bicubic" and default_interpolation(None) == "bicubic"
    assert default_interpolation(["bicubic", "bilinear"]) == ["bicubic", "bilinear"]
    assert dry_thresholds({}, ["2t", "tp", "pr"], ["K", "m", "kg m-2"], ["identity", "sqrt", "log1p"]) == \
        pytest.approx([0.0, 1e-4, 0.1])
    with pytest.raises(SystemExit, match="two_stage"):
        resolve_options(train_config(["x.nc"], output_dir=tmp_path, objective="two-stage",
                                     init_from="models/dpdm-glosea4-ts-x4"))


def test_evaluate_any_model_on_any_files(tmp_path, static):
    from typer.testing import CliRunner

    from dpdm_diffusers.cli import app

    diff, reg = _precip_pipeline(), _precip_pipeline()
    cfg = {k: v for k, v in diff.config.items() if not k.startswith("_") and k not in diff.components}
    DownscalingPipeline(unet=diff.unet, scheduler=diff.scheduler, regression_unet=reg.unet,
                        **cfg).save_pretrained(tmp_path / "model")
    low = _precip_low_res()
    fine = Grid.from_xarray(low).refine(4)
    from dpdm_diffusers.data import regrid

    truth = regrid(low, fine, "bilinear").load()
    truth["pr"] = truth.pr.clip(min=0).assign_attrs(units="kg m**-2")  # GRIB's spelling: converted to mm
    truth.to_netcdf(tmp_path / "truth.nc")
    xr.Dataset(static).to_netcdf(tmp_path / "static.nc")
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "truth.nc"), "--model", str(tmp_path / "model"),
                                   "--members", "1,3", "--steps", "2", "--static", f"topography={tmp_path}/static.nc",
                                   "--static", f"land_sea_mask={tmp_path}/static.nc", "--out-dir",
                                   str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "eval" / "scores.md").read_text()
    for text in ("bicubic", "regression stage", "model, 3 members", "Precipitation `pr`", "wet>=0.1", "tas-pr",
                 "Wasserstein",
                 "Rank-histogram", "Command: `dpdm"):
        assert text in report
    res = CliRunner().invoke(app, ["evaluate", "--truth", str(tmp_path / "truth.nc"), "--model", str(tmp_path / "model"),
                                   "--baselines", "nearest"])
    assert res.exit_code != 0 and "Unknown baseline" in res.output


def test_dpdm_train_builds_a_two_stage_model_from_scratch_on_gaussian_files(tmp_path):
    """`dpdm train` on a file with Gaussian latitudes, GRIB units and its own orog/lsm: both stages, bicubic
    interpolation, precipitation with a dry threshold, each variable's spread calibrated on the validation box."""
    from typer.testing import CliRunner

    from dpdm_diffusers.cli import app

    f = str(_gaussian_file(tmp_path))
    out = tmp_path / "model"
    res = CliRunner().invoke(app, [
        "train", f, "-o", str(out), "--variables", "2t,tp", "--unit", "tp=mm", "--regular-grid",
        "--static", f"topography={f}", "--static", f"land_sea_mask={f}", "--static-map", "orog=topography",
        "--static-map", "lsm=land_sea_mask", "--validation-lat-box=46,60", "--validation-lon-box", "230,250",
        "--preset", "tiny", "--steps", "2", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "dpdm train runs: python -m dpdm_diffusers.training.train_dpdm" in res.output
    pipe = DownscalingPipeline.from_pretrained(out)
    cfg = pipe.config
    assert pipe.regression_unet is not None and (out / "stage1-regression" / "model_index.json").exists()
    assert cfg.units == ["K", "mm"] and cfg.transforms == ["identity", "log1p"]
    assert cfg.interpolation == "bicubic" and cfg.dry_threshold == [0.0, pytest.approx(0.1)]
    card = (out / "README.md").read_text()
    assert "- 2t: factor" in card and "- tp: factor" in card  # one spread factor per variable, in the card


def test_the_five_variable_demo_runs_on_the_sample_a_model_ships(tmp_path):
    """`dpdm demo --model <five-variable model>`: the test box shipped beside the weights, scores per variable and
    a precipitation-members figure, no TIGGE file needed."""
    from dpdm_diffusers import tigge
    from dpdm_diffusers.workflows import run_demo

    names, units = tigge.VARIABLES, ["K", "m s**-1", "m s**-1", "Pa", "mm"]
    pipe = make_pipeline(variables=names, units=units, transforms=["identity"] * 4 + ["log1p"])
    cfg = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components}
    cfg.update(norm_mean=[280.0, 0.0, 0.0, 95000.0, 1.0], norm_std=[10.0, 5.0, 5.0, 5000.0, 1.0])
    model = tmp_path / "five"
    DownscalingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, **cfg).save_pretrained(model)
    grid = Grid(np.arange(16) * 0.5 + 20.25, np.arange(24) * 0.5 + 120.25)
    rng = np.random.default_rng(0)
    shape, coords = grid.shape, {"lat": grid.lat, "lon": grid.lon}
    values = {"2t": 285 + rng.normal(0, 2, shape), "10u": rng.normal(0, 3, shape), "10v": rng.normal(0, 3, shape),
              "sp": 95000 + rng.normal(0, 500, shape), "tp": rng.gamma(0.5, 8, shape)}
    truth = xr.Dataset({v: (("lat", "lon"), values[v].astype("float32"), {"units": u}) for v, u in zip(names, units)},
                       coords=coords)
    static = xr.Dataset(make_static(grid))
    tigge.write_test_sample(tigge.TiggeTest(None, truth, static), model / tigge.SAMPLE_FILE)
    res = run_demo(str(model), num_members=3, num_inference_steps=2, out_dir=tmp_path / "out")
    assert res.figure.name == "demo_tp.png" and res.figure.stat().st_size > 10_000
    out = xr.open_dataset(res.netcdf)
    assert out.tp.dims == ("member", "lat", "lon") and out.tp.shape == (3, 16, 24) and float(out.tp.min()) >= 0
    assert {"tp_truth", "2t_mean"} <= set(out.data_vars)
    assert "Precipitation `tp`" in res.markdown and "DPDM, 3 members" in res.markdown


def test_quantile_bias_and_wasserstein_against_known_values():
    from dpdm_diffusers.field_statistics import quantile_bias, wasserstein

    truth = xr.DataArray(np.arange(101.0), dims="x")
    shifted = xr.DataArray(np.arange(101.0) + 2.0, dims="x")
    assert quantile_bias(shifted, truth) == pytest.approx({"q1": 2.0, "q5": 2.0, "q95": 2.0, "q99": 2.0})
    assert wasserstein(shifted, truth) == pytest.approx(2.0)
    # an ensemble (member dim) is pooled: two members at -1 and +1 of the truth move nothing on average but widen
    ens = xr.concat([truth - 1.0, truth + 1.0], dim="member")
    assert quantile_bias(ens, truth, (0.5,)) == pytest.approx({"q50": 0.0})
    assert 0 < wasserstein(ens, truth) <= 1.0
