"""Each `dpdm` command's logic as a library call, tested without typer (dpdm_diffusers.workflows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_low_res, make_pipeline, make_static

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.grids import Grid
from dpdm_diffusers.modeling import build_unet, default_scheduler
from dpdm_diffusers.workflows import calibrate_model, downscale_file, evaluate_benchmark, open_low_res


def test_open_low_res_keeps_the_models_variables_in_your_names(tmp_path):
    ds = make_low_res().rename(tas="air").assign(other=lambda d: d.air * 0)
    ds.to_netcdf(tmp_path / "in.nc")
    out = open_low_res(tmp_path / "in.nc", ["tas"], {"air": "tas"})
    assert list(out.data_vars) == ["air"]
    with pytest.raises(ValueError, match="in.nc.*lacks the model's variables"):
        open_low_res(tmp_path / "in.nc", ["tas"])


def test_downscale_file_streams_a_record_with_your_names_and_static_file(tmp_path):
    make_pipeline().save_pretrained(tmp_path / "model")
    low = make_low_res(ntime=3).rename(tas="air")
    low.to_netcdf(tmp_path / "in.nc")
    grid = Grid.from_xarray(low).refine(4)
    xr.Dataset({k: v for k, v in make_static(grid).items()}).rename(topography="orog").to_netcdf(tmp_path / "st.nc")
    res = downscale_file(tmp_path / "in.nc", tmp_path / "out.nc", model=str(tmp_path / "model"), num_members=2,
                         num_inference_steps=2, chunk_size=2, static=tmp_path / "st.nc", variable_map={"air": "tas"},
                         static_map={"orog": "topography"}, progress=False)
    assert res.chunks_total == 2
    out = xr.open_dataset(tmp_path / "out.nc")
    assert {"air", "air_mean", "air_std"} <= set(out.data_vars) and out.air.shape == (2, 3, 24, 32)
    with pytest.raises(FileExistsError, match="overwrite"):
        downscale_file(tmp_path / "in.nc", tmp_path / "out.nc", model=str(tmp_path / "model"))


def test_downscale_file_refuses_bad_input_before_writing(tmp_path):
    make_pipeline().save_pretrained(tmp_path / "model")
    (make_low_res() - 273.15).to_netcdf(tmp_path / "in.nc")  # degC labelled K
    with pytest.raises(ValueError, match="standard deviations"):
        downscale_file(tmp_path / "in.nc", tmp_path / "out.zarr", model=str(tmp_path / "model"), progress=False)
    assert not list(tmp_path.glob("*out*"))  # no store was created


def test_evaluate_benchmark_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown baselines"):
        evaluate_benchmark(baselines=["nearest"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        evaluate_benchmark(benchmark="era5")


def test_calibrate_model_on_your_files_writes_the_spread(tmp_path):
    kw = dict(variables=["tas"], units=["K"], transforms=["identity"], norm_mean=[280.0], norm_std=[10.0],
              residual_std=[0.5], static_channels=[], static_mean=[], static_std=[], scale_factor=4, patch_size=16)
    torch.manual_seed(0)
    pipe = DownscalingPipeline(unet=build_unet(1, 0, 16, "tiny"), scheduler=default_scheduler(),
                               regression_unet=build_unet(1, 0, 16, "tiny"), stochastic_std=[0.3], **kw)
    pipe.save_pretrained(tmp_path / "model")
    high = make_low_res(nlat=12, nlon=16, ntime=3, step=0.25)
    high.to_netcdf(tmp_path / "high.nc")
    res = calibrate_model(str(tmp_path / "model"), [str(tmp_path / "high.nc")], num_members=2,
                          num_inference_steps=1, write=True, max_samples=2)
    assert res["written"].endswith("model_index.json") and res["stochastic_std"][0] != 0.3
    assert np.isclose(DownscalingPipeline.from_pretrained(tmp_path / "model").config.stochastic_std[0],
                      res["stochastic_std"][0])
    with pytest.raises(FileNotFoundError, match="local pipeline folder"):
        calibrate_model("someone/model", [str(tmp_path / "high.nc")], write=True)
