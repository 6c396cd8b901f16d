"""FieldProcessor (the pipeline's pre/post-processing component) and the Hub layer's dependence on diffusers."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_low_res, make_pipeline

from dpdm_diffusers.field_processor import FieldLayout, FieldProcessor
from dpdm_diffusers.grids import Grid, block_mean


def test_preprocess_canonicalises_and_postprocess_restores_the_callers_layout():
    pipe = make_pipeline()
    low = make_low_res(nlat=4, nlon=6)
    theirs = low.isel(lat=slice(None, None, -1)).rename(tas="air")  # descending latitude, own variable name
    proc = FieldProcessor.from_config(pipe.config)
    prepared = proc.preprocess(theirs, static_fields=np.zeros((2, 16, 24)), variable_map={"air": "tas"})
    assert prepared.values.shape == (2, 1, 4, 6)
    assert np.all(np.diff(prepared.src.lat) > 0)  # ascending for the model
    layout = prepared.layout
    assert isinstance(layout, FieldLayout) and layout.lat_descending and layout.batch_dims == ("time",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.kind = "array"
    # the refined block-repeat of the input comes back in the caller's order, names and units, with CF attrs
    fine = np.repeat(np.repeat(prepared.values, 4, axis=-2), 4, axis=-1)[None]
    members, mean, std = proc.postprocess(fine, prepared, info={"num_members": 1})
    assert set(members.data_vars) == {"air"} and members.lat.values[0] > members.lat.values[-1]
    np.testing.assert_allclose(block_mean(mean.air.sortby("lat").values, 4), low.tas.values, rtol=1e-6)
    assert mean.air.attrs["units"] == "K" and mean.attrs["Conventions"] == "CF-1.8"
    assert mean.attrs["dpdm_num_members"] == 1 and "downscaled x4" in mean.attrs["history"]
    assert float(np.abs(std.air).max()) == 0.0


def test_preprocess_keeps_global_longitude_conventions():
    pipe = make_pipeline()
    lon = np.arange(-180, 180, 10.0) + 5
    low = xr.Dataset({"tas": (("lat", "lon"), 280 + np.random.default_rng(0).normal(0, 1, (4, 36)), {"units": "K"})},
                     coords={"lat": [-15.0, -5.0, 5.0, 15.0], "lon": lon})
    proc = pipe.processor
    prepared = proc.preprocess(low, static_fields=np.zeros((2, 16, 144)))
    assert prepared.periodic and prepared.src.lon.min() >= 0  # canonical 0..360 inside
    members, _, _ = proc.postprocess(prepared.values[None].repeat(4, -2).repeat(4, -1), prepared)
    assert members.lon.values.min() < 0 and np.all(np.diff(members.lon.values) > 0)  # -180..180 again


def test_preprocess_refuses_before_any_work():
    proc = make_pipeline().processor
    with pytest.raises(ValueError, match="Array input must be"):
        proc.preprocess(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="Unknown nan_policy"):
        proc.preprocess(make_low_res(), nan_policy="ignore")
    with pytest.raises(ValueError, match="standard deviations"):
        proc.preprocess((make_low_res() - 273.15).assign_attrs(), static_fields=np.zeros((2, 24, 32)))


def test_the_pipeline_reads_its_processor_from_the_current_config():
    pipe = make_pipeline()
    pipe.register_to_config(norm_mean=[0.0])
    assert pipe.processor.norm_mean == [0.0]


def test_the_private_diffusers_function_the_loader_redirects_still_exists():
    """DownscalingPipeline.from_pretrained redirects one private diffusers function so that loading runs no folder
    code; if diffusers moves it, this fails here (and the loader raises a clear ImportError), not silently."""
    from dpdm_diffusers.pipelines.hub_mixin import PATCHED_DIFFUSERS_FUNCTION

    module, name = PATCHED_DIFFUSERS_FUNCTION.rsplit(".", 1)
    function = getattr(importlib.import_module(module), name, None)
    assert callable(function), f"diffusers moved {PATCHED_DIFFUSERS_FUNCTION}: update pipelines/hub_mixin.py"
    import inspect

    assert next(iter(inspect.signature(function).parameters)) == "class_obj"


def test_the_loader_says_so_when_diffusers_lacks_the_function(monkeypatch, tmp_path):
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    from dpdm_diffusers import DownscalingPipeline

    make_pipeline().save_pretrained(tmp_path)
    monkeypatch.delattr(pipeline_utils, "_get_pipeline_class")
    with pytest.raises(ImportError, match="no longer has"):
        DownscalingPipeline.from_pretrained(tmp_path)


def test_grid_checks_are_shared_by_the_data_layer_and_the_processor():
    from dpdm_diffusers.data import standardize

    low = make_low_res().assign_coords(lat=np.linspace(100e3, 600e3, 6))  # metres, not degrees
    proc = make_pipeline().processor
    for call in (lambda: standardize(low), lambda: proc.preprocess(low)):
        with pytest.raises(ValueError, match="not a lat/lon grid"):
            call()
    assert Grid.from_xarray(make_low_res()).shape == (6, 8)
