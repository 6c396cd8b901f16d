"""Your own data, your own region: small domains, missing values, names, units, grids, validation boxes,
two-stage fine-tuning in one run, calibration on your data, lineage and sharing (tiny models, seconds each)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from dpdm_diffusers import DownscalingPipeline, data
from dpdm_diffusers.cli import app
from dpdm_diffusers.grids import Grid, interpolate
from dpdm_diffusers.modeling import build_unet, default_sampler
from dpdm_diffusers.samples import RandomPatchDataset, normalize_fields
from dpdm_diffusers.training.train_dpdm import main
from dpdm_diffusers.transforms import Normalizer

runner = CliRunner()
STATS = dict(variables=["tas"], units=["K"], transforms=["identity"], norm_mean=[285.0], norm_std=[5.0],
             residual_std=[0.5], static_channels=[], static_mean=[], static_std=[], scale_factor=4, patch_size=16)


def region_dataset(ny=12, nx=20, ntime=10, name="air_temperature", units="degC", offset=-273.15, seed=0):
    """A small region (smaller than one 16-px patch in latitude) with fine structure a block mean loses."""
    rng = np.random.default_rng(seed)
    lat = 30 + 0.5 * (np.arange(ny) + 0.5)
    lon = 260 + 0.5 * (np.arange(nx) + 0.5)
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    fields = [285 + 3 * np.sin(yy * 2 + k) + 2 * np.cos(xx * 3) + rng.normal(0, 0.2, yy.shape) + offset for k in range(ntime)]
    time = np.array([f"{1990 + k}-06-01" for k in range(ntime)], dtype="datetime64[ns]")
    return xr.Dataset({name: (("time", "lat", "lon"), np.stack(fields).astype("float32"), {"units": units})},
                      coords={"time": time, "lat": lat, "lon": lon})


@pytest.fixture(scope="module")
def region_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("region") / "air.nc"
    region_dataset().to_netcdf(path)
    return path


def two_stage_base(folder: Path, hub_id: str | None = None) -> Path:
    torch.manual_seed(0)
    pipe = DownscalingPipeline(unet=build_unet(1, 0, 16, "tiny"), regression_unet=build_unet(1, 0, 16, "tiny"),
                               scheduler=default_sampler(), stochastic_std=[0.4], hub_id=hub_id, **STATS)
    pipe.save_pretrained(folder)
    return folder


def common(path, out, *extra):
    return ["--high_res", str(path), "--train_batch_size", "4", "--max_train_steps", "3", "--lr_warmup_steps", "0",
            "--validation_members", "2", "--validation_inference_steps", "2", "--validation_steps", "0",
            "--checkpointing_steps", "0", "--report_to", "none", "--stochastic_std_batches", "2",
            "--calibration_members", "3", "--output_dir", str(out), *extra]


def weights(pipe, name):
    return {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}


def changed(a, b) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# --- one command fine-tunes both stages ---------------------------------------------------------------
def test_init_from_a_two_stage_model_fine_tunes_both_stages_re_estimates_and_calibrates(region_file, tmp_path):
    base_dir = two_stage_base(tmp_path / "base", hub_id="someone/dpdm-base")
    base = DownscalingPipeline.from_pretrained(base_dir)
    out = main(common(region_file, tmp_path / "ft", "--init_from", str(base_dir), "--variable_map",
                      "air_temperature=tas", "--train_time", "1990,1997", "--validation_time", "1998,1999"))
    tuned = DownscalingPipeline.from_pretrained(out)
    stage1 = DownscalingPipeline.from_pretrained(out / "stage1-regression")
    assert stage1.config.objective == "regression"
    assert changed(weights(base, "regression_unet"), weights(tuned, "regression_unet"))  # the mean was fine-tuned
    assert changed(weights(base, "unet"), weights(tuned, "unet"))  # and the diffusion stage on it
    for k, w in stage1.unet.state_dict().items():  # stage 2 is built on exactly the stage-1 result
        torch.testing.assert_close(tuned.regression_unet.state_dict()[k], w)
    summary = json.loads((out / "training_summary.json").read_text())
    cal = summary["spread_calibration"]
    assert cal is not None and tuned.config.stochastic_std == cal["stochastic_std"] != [0.4]  # re-estimated + calibrated
    card = (out / "README.md").read_text()
    assert "base_model: someone/dpdm-base" in card and str(tmp_path) not in card
    assert "preset `tiny`" in card and "## Spread calibration" in card  # architecture read off the weights
    assert np.isfinite(summary["val_rmse_mean"])


def test_init_from_two_stage_with_regression_objective_trains_the_regression_unet(region_file, tmp_path):
    base_dir = two_stage_base(tmp_path / "base")
    base = DownscalingPipeline.from_pretrained(base_dir)
    out = main(common(region_file, tmp_path / "reg", "--init_from", str(base_dir), "--objective", "regression",
                      "--variable_map", "air_temperature=tas", "--validation_time", "1998,1999", "--learning_rate", "0"))
    reg = DownscalingPipeline.from_pretrained(out)
    assert reg.config.objective == "regression" and reg.regression_unet is None
    for k, w in base.regression_unet.state_dict().items():  # learning rate 0: exactly the base's regression UNet
        torch.testing.assert_close(reg.unet.state_dict()[k], w)


@pytest.mark.parametrize("extra, message", [
    (["--patch_size", "32"], "--patch_size 32 differs from the 16"),
    (["--objective", "regression", "--calibrate_spread", "true", "--validation_time", "1998,1999"],
     "this run trains no two-stage model"),
    (["--calibrate_spread", "true"], "needs a validation split"),
    (["--unet_preset", "small"], "--unet_preset small differs"),
])
def test_inconsistent_options_are_refused_at_start_up(region_file, tmp_path, extra, message):
    base_dir = two_stage_base(tmp_path / "base")
    with pytest.raises(SystemExit, match=message):
        main(common(region_file, tmp_path / "x", "--init_from", str(base_dir), "--variable_map", "air_temperature=tas", *extra))
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_regression_objective_on_a_plain_diffusion_base_is_refused(region_file, tmp_path):
    pipe = DownscalingPipeline(unet=build_unet(1, 0, 16, "tiny"), scheduler=default_sampler(), **STATS)
    pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(SystemExit, match="has no regression UNet"):
        main(common(region_file, tmp_path / "x", "--init_from", str(tmp_path / "plain"), "--objective", "regression"))


# --- small regions and missing values ------------------------------------------------------------------
def test_regions_smaller_than_a_patch_are_padded_like_the_pipeline_and_masked():
    ds = region_dataset(units="K", offset=0.0, name="tas").isel(time=[0, 1])
    pairs = data.make_pairs(ds, scale_factor=4)
    nz = Normalizer.from_config({**STATS, "prediction": "residual"})
    fields = normalize_fields(pairs.high_res, pairs.lerp(), nz)
    item = RandomPatchDataset(fields, 16, seed=0)[0]
    assert item["target"].shape == (1, 16, 20) or item["target"].shape == (1, 16, 16)
    mask = item["mask"][0].numpy()
    assert mask[:12].all() and not mask[12:].any()  # the padded rows never count in the loss
    cond = item["condition"][0].numpy()
    np.testing.assert_array_equal(cond[12:], np.repeat(cond[11:12], 4, axis=0))  # edge-replicated, as at inference


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_interpolation_with_missing_values_masks_instead_of_crashing(method):
    src = Grid(np.arange(6) + 0.5, np.arange(8) + 0.5)
    values = np.add.outer(np.arange(6.0), np.arange(8.0))[None].astype("float32")
    values[0, 2, 3] = np.nan
    out = interpolate(values, src, src.refine(4), method)
    assert np.isnan(out).any() and np.isfinite(out).sum() > 0.8 * out.size
    gaps = np.isnan(out[0])
    assert gaps[8:12, 12:16].all() and not gaps[:4].any()  # the missing cell's area is masked, far away is not
    same = interpolate(values, src, src.refine(4), "bilinear")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(same))  # one mask for every interpolation


def test_training_on_data_with_missing_values_ignores_them(tmp_path):
    ds = region_dataset(units="K", offset=0.0, name="tas")
    ds["tas"][:, :4, :8] = np.nan  # e.g. ocean points of a land-only dataset
    ds.to_netcdf(tmp_path / "gaps.nc")
    out = main(common(tmp_path / "gaps.nc", tmp_path / "run", "--static_channels=", "--unet_preset", "tiny",
                      "--patch_size", "16", "--interpolation", "bicubic", "--train_time", "1990,1997",
                      "--validation_time", "1998,1999"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert np.isfinite(summary["val_rmse_mean"]) and np.isfinite(summary["val_rmse_lerp"])
    pipe = DownscalingPipeline.from_pretrained(out)
    low = data.coarsen(ds.isel(time=[9]), 4)
    res = pipe(low, nan_policy="mask", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.isnan(res.members.tas.values[0, 0, :4, :8]).all() and np.isfinite(res.members.tas.values[0, 0, 8:]).all()


# --- names, units, grids --------------------------------------------------------------------------------
def test_variable_names_need_a_mapping_and_the_error_shows_it(region_file, tmp_path):
    base_dir = two_stage_base(tmp_path / "base")
    with pytest.raises(KeyError, match=r"--variable air_temperature=tas.*variable_map: \{air_temperature: tas\}"):
        main(common(region_file, tmp_path / "x", "--init_from", str(base_dir), "--objective", "regression"))


def test_units_are_required_and_converted(tmp_path):
    from dpdm_diffusers.user_data import load_region

    ds = region_dataset()  # degC
    region = load_region(ds, scale_factor=4, variables=["tas"], variable_map={"air_temperature": "tas"}, units={"tas": "K"})
    np.testing.assert_allclose(region.pairs.high_res.tas.values, ds.air_temperature.values + 273.15, rtol=1e-6)
    assert region.pairs.high_res.tas.attrs["units"] == "K"
    bare = ds.copy()
    bare["air_temperature"].attrs.pop("units")
    with pytest.raises(ValueError, match="'air_temperature' has no `units` attribute"):
        load_region(bare, scale_factor=4, validation_time=["1998", "1999"])
    with pytest.raises(ValueError, match="cannot be converted to 'K'"):
        load_region(ds.assign(air_temperature=ds.air_temperature.assign_attrs(units="hPa")), scale_factor=4,
                    variable_map={"air_temperature": "tas"}, variables=["tas"], units={"tas": "K"})


def test_boxes_are_trimmed_to_whole_cells_with_a_log_line(caplog):
    from dpdm_diffusers.user_data import load_region

    ds = region_dataset(ny=14, nx=22)
    with caplog.at_level(logging.WARNING, logger="dpdm_diffusers.user_data"):
        region = load_region(ds, scale_factor=4, validation_time=["1998", "1999"])
    assert region.pairs.grid.shape == (12, 20) and "trimmed the 14x22 high-res grid to 12x20" in caplog.text


def test_near_regular_gaussian_latitudes_are_regularised_conservatively():
    lat = np.degrees(np.arcsin(np.polynomial.legendre.leggauss(24)[0]))
    lon = np.arange(0, 360, 7.5)
    field = (250 + 30 * np.cos(np.radians(lat)))[:, None] * np.ones(lon.size)
    ds = xr.Dataset({"t": (("lat", "lon"), field.astype("float32"), {"units": "K"})}, coords={"lat": lat, "lon": lon})
    with pytest.raises(ValueError, match="regularize"):
        data.standardize(ds)
    out = data.standardize(ds, regular_grid=True)
    Grid.from_xarray(out)  # regular now
    w_in, w_out = np.cos(np.radians(lat)), np.cos(np.radians(out.lat.values))
    mean_in = float((ds.t.mean("lon") * w_in).sum() / w_in.sum())
    mean_out = float((out.t.mean("lon") * w_out).sum() / w_out.sum())
    assert abs(mean_in - mean_out) < 0.05  # area mean kept (conservative)


def test_single_time_data_warns_without_validation_and_trains_with_a_validation_box(tmp_path):
    ds = region_dataset(ny=24, nx=32, name="tas", units="K", offset=0.0).isel(time=[0])
    ds.to_netcdf(tmp_path / "one.nc")
    from dpdm_diffusers.user_data import load_region

    with pytest.warns(UserWarning, match="No validation split"):
        load_region(tmp_path / "one.nc" if False else str(tmp_path / "one.nc"), scale_factor=4)
    out = main(common(tmp_path / "one.nc", tmp_path / "run", "--static_channels=", "--unet_preset", "tiny",
                      "--patch_size", "16", "--validation_lat_box", "36,42", "--validation_lon_box", "270,276"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert np.isfinite(summary["val_rmse_mean"]) and summary["val_rmse_lerp"] > 0
    assert "box lat" in (out / "README.md").read_text()


# --- calibration on your data; sharing ------------------------------------------------------------------
def test_cli_calibrate_runs_on_user_files(region_file, tmp_path):
    base_dir = two_stage_base(tmp_path / "base")
    res = runner.invoke(app, ["calibrate", str(region_file), "--model", str(base_dir), "--variable", "air_temperature=tas",
                              "--validation-time", "1998,1999", "--members", "2", "--steps", "1", "--write"])
    assert res.exit_code == 0, res.output
    assert json.loads((base_dir / "model_index.json").read_text())["stochastic_std"] != [0.4]
    bad = runner.invoke(app, ["calibrate", str(region_file), "--model", str(base_dir), "--members", "2"])
    assert bad.exit_code != 0 and "--variable air_temperature=tas" in " ".join(bad.output.replace("│", " ").split())


def test_save_pretrained_keeps_the_card_and_push_to_hub_uploads_it(tmp_path, monkeypatch):
    """push_to_hub against a local stand-in for the Hub API (create_repo + upload_folder write to a folder)."""
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    def create_repo(repo_id, **kw):
        calls.append(("create_repo", repo_id, kw.get("private")))
        (hub / repo_id).mkdir(parents=True, exist_ok=True)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(repo_id, folder_path, **kw):
        import shutil

        calls.append(("upload_folder", repo_id, kw.get("commit_message")))
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    base_dir = two_stage_base(tmp_path / "base")
    pipe = DownscalingPipeline.from_pretrained(base_dir)
    pipe.model_card = pipe.model_card.replace("# DPDM downscaling model", "# My regional model")
    pipe.save_pretrained(tmp_path / "resaved")
    assert "# My regional model" in (tmp_path / "resaved" / "README.md").read_text()  # re-saving keeps the card
    pipe.push_to_hub("me/gulf-coast", private=True)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"] and calls[0][2] is True
    card = huggingface_hub.ModelCard.load(hub / "me/gulf-coast" / "README.md")
    assert card.data.library_name == "diffusers" and "downscaling" in card.data.tags
    assert 'from_pretrained("me/gulf-coast")' in card.text and "# My regional model" in card.text
    uploaded = DownscalingPipeline.from_pretrained(hub / "me/gulf-coast")
    assert uploaded.config.hub_id == "me/gulf-coast"  # the id travels with the folder: lineage for fine-tunes
    assert not list((hub / "me/gulf-coast").rglob("*.bin"))  # safetensors only
    # diffusers' save_pretrained(push_to_hub=True) path uploads the same project card, not a blank template
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/second")
    assert "# My regional model" in (hub / "me/second" / "README.md").read_text()
    assert 'from_pretrained("me/second")' in (hub / "me/second" / "README.md").read_text()


def test_finetune_cli_refuses_bad_names_with_a_message_not_a_traceback(region_file, tmp_path):
    base_dir = two_stage_base(tmp_path / "base")
    res = runner.invoke(app, ["finetune", str(region_file), "-o", str(tmp_path / "x"), "--model", str(base_dir), "--steps", "1"])
    assert res.exit_code != 0 and "--variable air_temperature=tas" in " ".join(res.output.replace("│", " ").split())
    assert not isinstance(res.exception, KeyError)


def test_cli_static_file_with_own_names_needs_a_static_map(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_low_res, make_pipeline, make_static

    make_pipeline().save_pretrained(tmp_path / "model")
    low = make_low_res()
    low.to_netcdf(tmp_path / "low.nc")
    st = make_static(Grid.from_xarray(low).refine(4))
    xr.Dataset({"hgt_m": st["topography"], "landfrac": st["land_sea_mask"]}).to_netcdf(tmp_path / "static.nc")
    base = ["downscale", str(tmp_path / "low.nc"), "--model", str(tmp_path / "model"), "--members", "2", "--steps", "1",
            "--static", str(tmp_path / "static.nc"), "--quiet"]
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "a.nc")])
    assert bad.exit_code != 0 and "static_map" in " ".join(bad.output.replace("│", " ").split())
    ok = runner.invoke(app, [*base, "-o", str(tmp_path / "b.nc"), "--static-map", "hgt_m=topography",
                             "--static-map", "landfrac=land_sea_mask"])
    assert ok.exit_code == 0, ok.output
    assert xr.open_dataset(tmp_path / "b.nc").tas.shape == (2, 2, 24, 32)


def test_finetune_command_passes_southern_boxes_and_maps_intact():
    from dpdm_diffusers.training.config import parse_args, to_argv
    from dpdm_diffusers.training.finetune import finetune_config

    argv = to_argv(finetune_config(["x.nc"], model="m", output_dir="o", variable=["air_temperature=tas"],
                                   lat_box="-20,-10", lon_box="120,150", validation_lat_box="-15,-12",
                                   train_time="1860,2000"))
    cfg = parse_args(argv)
    assert cfg.lat_box == [-20.0, -10.0] and cfg.validation_lat_box == [-15.0, -12.0] and cfg.lon_box == [120.0, 150.0]
    assert cfg.variable_map == {"air_temperature": "tas"} and cfg.train_time == ["1860", "2000"] and cfg.init_from == "m"


def test_a_validation_box_is_masked_out_of_the_loss_not_written_into_the_data():
    from dpdm_diffusers.device_patches import DevicePatchSampler

    ds = region_dataset(ny=16, nx=32, units="K", offset=0.0, name="tas").isel(time=[0, 1])
    pairs = data.make_pairs(ds, scale_factor=4)
    nz = Normalizer.from_config({**STATS, "prediction": "residual"})
    keep = np.ones((16, 32), dtype=bool)
    keep[4:12, 8:16] = False  # the box
    fields = normalize_fields(pairs.high_res, pairs.lerp(), nz, loss_mask=keep)
    assert np.isfinite(fields.target).all()  # the data are left as they are
    dataset = RandomPatchDataset(fields, 16, seed=0)
    sampler = DevicePatchSampler(dataset, 8, "cpu")
    batches = [dataset[i] for i in range(len(dataset))] + [sampler.batch(0)]
    for item in batches:
        mask, target = item["mask"].numpy(), item["target"].numpy()
        xs = np.asarray(item["x"]).reshape(-1)
        for k, x0 in enumerate(xs):  # the 16 x 16 patch spans every row; columns x0 .. x0 + 15
            m = mask.reshape(-1, 1, 16, 16)[k, 0]
            t = target.reshape(-1, 1, 16, 16)[k, 0]
            cols = np.arange(x0, x0 + 16)
            inside = (cols >= 8) & (cols < 16)
            assert not m[4:12][:, inside].any() and m[:4].all() and m[12:].all() and m[:, ~inside].all()
            assert (t[4:12][:, inside] == 0).all()  # zero where masked: never an input to the UNet either


def test_finetune_runs_from_python_and_from_the_cli_with_the_base_models_objective(region_file, tmp_path):
    import shlex

    from dpdm_diffusers.training.config import parse_args
    from dpdm_diffusers.training.finetune import finetune

    torch.manual_seed(0)
    DownscalingPipeline(unet=build_unet(1, 0, 16, "tiny"), scheduler=default_sampler(), objective="regression",
                        **STATS).save_pretrained(tmp_path / "reg")
    small = dict(lr_warmup_steps=0, validation_members=2, validation_inference_steps=2, validation_steps=0,
                 checkpointing_steps=0)
    out = finetune([str(region_file)], output_dir=tmp_path / "py", model=str(tmp_path / "reg"), steps=2, batch_size=4,
                   variable=["air_temperature=tas"], train_time="1990,1997", validation_time="1998,1999", **small)
    assert DownscalingPipeline.from_pretrained(out).config.objective == "regression"  # read off the base model
    assert np.isfinite(json.loads((out / "training_summary.json").read_text())["val_rmse_mean"])
    config = tmp_path / "small.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in small.items()))
    res = runner.invoke(app, ["finetune", str(region_file), "-o", str(tmp_path / "cli"), "--model", str(tmp_path / "reg"),
                              "--variable", "air_temperature=tas", "--steps", "1", "--batch-size", "4",
                              "--validation-time", "1998,1999", "--config", str(config)])
    assert res.exit_code == 0, res.output
    printed = next(line for line in res.output.splitlines() if line.startswith("dpdm finetune runs: "))
    cfg = parse_args(shlex.split(printed)[6:])  # the printed command rebuilds the config that ran
    assert cfg.objective == "regression" and cfg.validation_members == 2 and cfg.max_train_steps == 1
    assert cfg.variable_map == {"air_temperature": "tas"} and cfg.validation_time == ["1998", "1999"]
    assert (tmp_path / "cli" / "model_index.json").exists()
