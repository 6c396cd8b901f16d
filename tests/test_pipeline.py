"""DownscalingPipeline: outputs, reproducibility, tiling, schedulers, save/load and input errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_low_res, make_pipeline, make_static
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from dpdm_diffusers import DownscalingPipeline, DownscalingPipelineOutput
from dpdm_diffusers.grids import Grid
from dpdm_diffusers.patching import PatchTiler

STEPS = 2


def run(pipe, low_res, static, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(low_res, static_fields=static, generator=torch.Generator().manual_seed(seed), **kw)


# --- outputs ---------------------------------------------------------------------------------------
def test_xarray_output_dims_coords_and_cf_attrs(pipe, low_res, static):
    out = run(pipe, low_res, static, num_members=3)
    assert isinstance(out, DownscalingPipelineOutput)
    m = out.members["tas"]
    assert m.dims == ("member", "time", "lat", "lon")
    assert m.shape == (3, 2, 24, 32)
    np.testing.assert_allclose(out.members.lat, Grid.from_xarray(low_res).refine(4).lat)
    assert (out.members.time.values == low_res.time.values).all()
    assert m.attrs["units"] == "K" and m.attrs["long_name"] == "tas field"
    assert out.members.lat.attrs["units"] == "degrees_north"
    assert out.mean["tas"].dims == ("time", "lat", "lon")
    assert out.mean["tas"].attrs["cell_methods"] == "member: mean"
    assert out.std["tas"].attrs["cell_methods"] == "member: standard_deviation"
    assert out.members.attrs["Conventions"] == "CF-1.8" and out.members.attrs["title"].startswith("synthetic low-res downscaled x4")
    assert out.members.attrs["dpdm_num_members"] == 3
    np.testing.assert_allclose(out.mean["tas"], m.mean("member"), rtol=1e-6)
    np.testing.assert_allclose(out.std["tas"], m.std("member", ddof=1), rtol=1e-4)
    assert np.isfinite(m.values).all()
    # output lands in physical units around the input, not in normalised space
    assert abs(float(m.mean()) - float(low_res.tas.mean())) < 20


def test_output_follows_the_interpolated_input_for_residual_models(pipe, low_res, static):
    """The residual is added back: a model whose eps is the noise itself returns the lerp exactly."""
    def oracle(sample, timestep, *args, **kwargs):  # eps-prediction that recovers x0 = 0 residual
        noisy = sample[:, :1]
        ab = pipe.scheduler.alphas_cumprod[int(timestep)]
        return type("O", (), {"sample": noisy / (1 - ab).sqrt()})()

    pipe.unet.forward = oracle
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = run(pipe, low_res, static, num_inference_steps=4)
    from dpdm_diffusers.grids import interpolate

    lerp = interpolate(low_res.tas.values, Grid.from_xarray(low_res), Grid.from_xarray(low_res).refine(4))
    np.testing.assert_allclose(out.mean.tas.values, lerp, atol=1e-3)


def test_dataarray_in_dataarray_out(pipe, low_res, static):
    out = run(pipe, low_res["tas"], static, num_members=2)
    assert isinstance(out.members, xr.DataArray) and out.members.name == "tas"
    assert out.members.dims == ("member", "time", "lat", "lon")
    assert isinstance(out.mean, xr.DataArray)


def test_np_pt_and_tuple_outputs_agree(pipe, low_res, static):
    x = run(pipe, low_res, static, num_members=2)
    n = run(pipe, low_res, static, num_members=2, output_type="np")
    p = run(pipe, low_res, static, num_members=2, output_type="pt", return_dict=False)
    assert n.members.shape == (2, 2, 1, 24, 32) and isinstance(n.members, np.ndarray)
    assert isinstance(p, tuple) and isinstance(p[0], torch.Tensor)
    np.testing.assert_allclose(n.members[:, :, 0], x.members.tas.values, rtol=1e-6)
    np.testing.assert_allclose(p[1].numpy(), n.mean, rtol=1e-6)


def test_tensor_input_gives_tensor_output(pipe, low_res, static):
    values = torch.from_numpy(low_res.tas.values[:, None])  # (time, V, lat, lon)
    s = torch.from_numpy(np.stack([static["topography"].values, static["land_sea_mask"].values])).float()
    out = pipe(values, static_fields=s, num_members=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert isinstance(out.members, torch.Tensor) and out.members.shape == (2, 2, 1, 24, 32)
    # arrays carry no time stamps: their samples are keyed by position, like an xarray batch dim without coordinates
    ref = run(pipe, low_res.drop_vars("time"), static, num_members=2)
    np.testing.assert_allclose(out.members[:, :, 0].numpy(), ref.members.tas.values, atol=1e-4)
    with pytest.raises(ValueError, match="needs xarray input"):
        pipe(values, static_fields=s, num_inference_steps=1, output_type="xarray")


def test_descending_latitude_is_returned_in_the_callers_order(pipe, low_res, static):
    asc = run(pipe, low_res, static, num_members=2)
    desc = run(pipe, low_res.isel(lat=slice(None, None, -1)), static, num_members=2)
    assert desc.members.lat.values[0] > desc.members.lat.values[-1]
    xr.testing.assert_allclose(desc.members.sortby("lat").tas, asc.members.tas, atol=1e-4)


def test_multi_variable_model_with_log1p_precipitation():
    pipe = make_pipeline(variables=("tas", "pr"), units=("K", "mm/day"), transforms=("identity", "log1p"))
    lr = make_low_res(variables=("tas", "pr"), units=("K", "mm/day"))
    lr["pr"] = (lr["pr"] - 278).clip(0, None).assign_attrs(units="mm/day")  # 0..~10 mm/day with dry cells
    st = make_static(Grid.from_xarray(lr).refine(4))
    pipe.register_to_config(norm_mean=[280.0, 1.0], norm_std=[10.0, 1.0])
    out = run(pipe, lr, st, num_members=2)
    assert set(out.members.data_vars) == {"tas", "pr"}
    assert float(out.members.pr.min()) >= 0.0  # inverse log1p is clipped to non-negative
    assert out.members.pr.attrs["units"] == "mm/day"


def test_full_prediction_target_runs(low_res, static):
    pipe = make_pipeline(prediction="full")
    out = run(pipe, low_res, static)
    assert np.isfinite(out.members.tas.values).all()


# --- reproducibility and batching ----------------------------------------------------------------
def test_seeded_runs_are_reproducible_and_seeds_differ(pipe, low_res, static):
    a = run(pipe, low_res, static, num_members=2, seed=0)
    b = run(pipe, low_res, static, num_members=2, seed=0)
    c = run(pipe, low_res, static, num_members=2, seed=1)
    np.testing.assert_array_equal(a.members.tas.values, b.members.tas.values)
    assert np.abs(a.members.tas.values - c.members.tas.values).max() > 1e-3
    # members differ from each other
    assert np.abs(a.members.tas[0] - a.members.tas[1]).max() > 1e-3


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_member_is_independent_of_batch_size_member_count_and_tile_order(scheduler_cls, monkeypatch):
    pipe = make_pipeline()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    lr = make_low_res(nlat=6, nlon=10, ntime=2)  # 24 x 40 px: several tiles
    st = make_static(Grid.from_xarray(lr).refine(4))
    kw = dict(eta=1.0) if scheduler_cls is DDIMScheduler else {}  # stochastic steps draw noise too
    ref = run(pipe, lr, st, num_members=4, tiles_per_call=64, **kw).members.tas.values
    small = run(pipe, lr, st, num_members=4, tiles_per_call=3, **kw).members.tas.values
    fewer = run(pipe, lr, st, num_members=2, tiles_per_call=5, **kw).members.tas.values
    np.testing.assert_allclose(small, ref, atol=1e-4)
    np.testing.assert_allclose(fewer, ref[:2], atol=1e-4)

    class ReversedTiler(PatchTiler):  # same tiles, visited in the opposite order
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.starts, self.index = self.starts[::-1], self.index.flip(0)

    monkeypatch.setattr("dpdm_diffusers.pipelines.pipeline_downscaling.PatchTiler", ReversedTiler)
    rev = run(pipe, lr, st, num_members=4, tiles_per_call=7, **kw).members.tas.values
    np.testing.assert_allclose(rev, ref, atol=1e-4)


def test_generator_list_gives_one_stream_per_member(pipe, low_res, static):
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    a = pipe(low_res, static_fields=static, num_members=2, num_inference_steps=STEPS, generator=gens).members.tas.values
    b = pipe(low_res, static_fields=static, num_members=1, num_inference_steps=STEPS,
             generator=[torch.Generator().manual_seed(6)]).members.tas.values
    np.testing.assert_allclose(a[1], b[0], atol=1e-5)
    with pytest.raises(ValueError, match="generators for 3 members"):
        pipe(low_res, static_fields=static, num_members=3, num_inference_steps=1, generator=gens)


# --- tiling ----------------------------------------------------------------------------------------
def _tile_position_model(pipe, amplitude=5.0):
    """Replace the UNet's forward by a prediction that depends on the position inside the tile.

    It stands in for what real UNets do at tile borders (padding artefacts); stitching tiles without
    blending turns it into visible jumps, so the test below can fail.
    """
    def forward(sample, timestep, *args, **kwargs):
        p = sample.shape[-1]
        ramp = torch.linspace(-amplitude, amplitude, p).view(1, 1, 1, p)
        return type("O", (), {"sample": ramp.expand(sample.shape[0], 1, p, p).clone()})()

    pipe.unet.forward = forward


def _border_jump_ratio(field, tiler, axis_len):
    edges = set()
    for _, x in tiler.starts:
        edges |= {x - 1, x + tiler.patch - 1}
    edges = sorted(e for e in edges if 0 <= e < axis_len - 1)
    d = np.abs(np.diff(field, axis=-1)).reshape(-1, axis_len - 1).mean(0)
    inner = [j for j in range(axis_len - 1) if j not in edges]
    return d[edges].mean() / d[inner].mean()


def test_no_seams_at_tile_borders():
    """With the real scheduler (DDIM) on a smooth input, jumps across tile borders are no larger than inside.

    The same check on tiles that are merely averaged (no smooth weights, ``tile_overlap=0``) finds the seams,
    which shows the check is sensitive.
    """
    pipe = make_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _tile_position_model(pipe)
    lr = make_low_res(nlat=4, nlon=14, ntime=1)
    lr["tas"][:] = 280.0
    st = make_static(Grid.from_xarray(lr).refine(4))
    ratios = {}
    for overlap in (None, 0):
        out = run(pipe, lr, st, num_members=8, num_inference_steps=5, tile_overlap=overlap)
        tiler = PatchTiler(16, 56, 16, overlap)
        ratios[overlap] = _border_jump_ratio(out.mean.tas.values, tiler, 56)
    assert ratios[None] < 1.5, ratios
    assert ratios[0] > 3.0, ratios


def test_small_domains_are_padded_not_refused(pipe):
    lr = make_low_res(nlat=2, nlon=3, ntime=1)  # 8 x 12 px, smaller than the 16-px patch
    st = make_static(Grid.from_xarray(lr).refine(4))
    out = run(pipe, lr, st, num_members=2)
    assert out.members.tas.shape == (2, 1, 8, 12)
    assert np.isfinite(out.members.tas.values).all()


def test_global_grid_wraps_in_longitude():
    pipe = make_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    _tile_position_model(pipe)
    lr = make_low_res(nlat=4, nlon=18, ntime=1, lat0=-20.0, lon0=0.0, step=20.0)  # 18 x 20 deg = 360 deg
    lr["tas"][:] = 280.0
    st = make_static(Grid.from_xarray(lr).refine(4))
    out = run(pipe, lr, st, num_members=4, num_inference_steps=4)
    f = out.mean.tas.values[0]
    wrap_jump = np.abs(f[:, 0] - f[:, -1]).mean()
    inner_jump = np.abs(np.diff(f, axis=-1)).mean()
    assert wrap_jump < 2 * inner_jump  # continuous across the dateline (tiles wrap)


# --- schedulers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheduler_cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]
)
def test_schedulers_swap_in_with_from_config_and_step_once_per_timestep(scheduler_cls, low_res, static):
    pipe = make_pipeline()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    calls = []
    original = pipe.scheduler.step

    def counting_step(model_output, timestep, sample, *a, **k):
        calls.append(tuple(model_output.shape))
        return original(model_output, timestep, sample, *a, **k)

    pipe.scheduler.step = counting_step
    lr = make_low_res(nlat=6, nlon=10, ntime=2)
    st = make_static(Grid.from_xarray(lr).refine(4))
    out = run(pipe, lr, st, num_members=3, num_inference_steps=3, tiles_per_call=4)
    assert np.isfinite(out.members.tas.values).all()
    # one step() per timestep with every member x batch row of the whole canvas (history stays consistent)
    assert len(calls) == 3 and all(c == (6, 1, 24, 40) for c in calls)
    assert out.members.attrs["dpdm_scheduler"] == scheduler_cls.__name__


def test_clipping_schedulers_are_refused_unless_the_range_is_wide(pipe, low_res, static):
    pipe.scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2")  # diffusers default clip_sample=True, range 1
    with pytest.raises(ValueError, match="clip_sample"):
        run(pipe, low_res, static)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, thresholding=True, clip_sample=False)
    with pytest.raises(ValueError, match="thresholds"):
        run(pipe, low_res, static)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, thresholding=False, clip_sample=True, clip_sample_range=10.0)
    assert np.isfinite(run(pipe, low_res, static).members.tas.values).all()


def test_schedule_ends_where_every_sampler_can_start():
    """The cosine schedule's last 40 steps are degenerate (alpha_bar 3.7e-3 -> 2e-9 at t = 999, where an eps error of
    0.1 becomes an x0 of ~2000 stds). The saved schedule stops at t = 959 and carries its betas explicitly, so a sampler
    built with from_config starts at a safe noise level whatever its class or spacing."""
    from diffusers import EulerDiscreteScheduler

    from dpdm_diffusers.modeling import NUM_TRAIN_TIMESTEPS, default_sampler, default_scheduler

    full = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert float(full.alphas_cumprod[999]) < 1e-8
    for sched in (default_scheduler(), default_sampler(), make_pipeline().scheduler):
        assert sched.config.num_train_timesteps == NUM_TRAIN_TIMESTEPS == 960
        # exactly the T = 1000 model's noise levels, up to t = 959
        torch.testing.assert_close(sched.alphas_cumprod, full.alphas_cumprod[:960])
        for spacing in ("leading", "linspace", "trailing"):
            derived = EulerDiscreteScheduler.from_config(sched.config, timestep_spacing=spacing)
            derived.set_timesteps(10)
            assert float(derived.timesteps[0]) <= 959 and float(derived.sigmas[0]) < 17  # 1/sqrt(alpha_bar) <= 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 16, 16, generator=g)
    eps = x + 0.1 * torch.randn(1, 1, 16, 16, generator=g)  # a good but imperfect noise prediction
    sched = default_scheduler()
    sched.set_timesteps(NUM_TRAIN_TIMESTEPS)  # the full-length reference visits every timestep
    out = sched.step(eps, int(sched.timesteps[0]), x, generator=torch.Generator().manual_seed(1))
    assert int(sched.timesteps[0]) == 959 and float(out.pred_original_sample.std()) < 5


# --- save / load / hub -----------------------------------------------------------------------------
def test_save_pretrained_round_trip_is_identical_and_safetensors_only(pipe, low_res, static, tmp_path):
    pipe.save_pretrained(tmp_path)
    files = {os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs}
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # diffusers' generic loader finds the class through the module stub (tests/test_diffusers_common.py)
    assert index["_class_name"] == ["pipeline_downscaling", "DownscalingPipeline"] and index["variables"] == ["tas"]
    assert "pipeline_downscaling.py" in files
    assert index["static_channels"] == ["topography", "land_sea_mask"]
    loaded = DownscalingPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(pipe.config)
    a = run(pipe, low_res, static, num_members=2)
    b = run(loaded, low_res, static, num_members=2)
    np.testing.assert_array_equal(a.members.tas.values, b.members.tas.values)
    with pytest.raises(ValueError, match="safetensors only"):
        DownscalingPipeline.from_pretrained(tmp_path, use_safetensors=False)


def test_two_variable_config_survives_reload(tmp_path):
    """A two-string list (["u10", "v10"]) must stay config, not be mistaken for a component spec."""
    pipe = make_pipeline(variables=("u10", "v10"), units=("m s-1", "m s-1"))
    pipe.save_pretrained(tmp_path)
    loaded = DownscalingPipeline.from_pretrained(tmp_path)
    assert list(loaded.config.variables) == ["u10", "v10"]


def test_pickle_weights_are_refused_at_save_and_at_load(pipe, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "a", safe_serialization=False)
    # a folder with pickle weights written by plain diffusers is not loaded either
    DiffusionPipeline.save_pretrained(pipe, tmp_path / "b", safe_serialization=False)
    with pytest.raises(Exception, match="safetensors"):
        DownscalingPipeline.from_pretrained(tmp_path / "b")


def test_incompatible_checkpoint_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["variables"], index["units"] = ["u10", "v10"], ["m s-1", "m s-1"]
    index["transforms"], index["norm_mean"], index["norm_std"] = ["identity"] * 2, [0, 0], [1, 1]
    index["residual_std"] = [1, 1]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="Incompatible checkpoint"):
        DownscalingPipeline.from_pretrained(tmp_path)


def test_push_to_hub_uploads_a_loadable_folder_with_a_card(pipe, low_res, static, tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    seen = {}

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def fake_create_repo(repo_id, **kwargs):
        seen["created"] = repo_id
        return Repo(repo_id)

    def fake_upload_folder(repo_id, folder_path, path_in_repo=None, **kwargs):
        shutil.copytree(folder_path, hub / repo_id / (path_in_repo or ""), dirs_exist_ok=True)
        seen["uploaded"] = repo_id
        return "https://huggingface.co/" + repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    url = pipe.push_to_hub("team/dpdm-test")
    assert seen == {"created": "team/dpdm-test", "uploaded": "team/dpdm-test"} and url.endswith("team/dpdm-test")
    card = (hub / "team/dpdm-test" / "README.md").read_text()
    assert card.startswith("---") and "library_name: diffusers" in card and "DownscalingPipeline.from_pretrained" in card
    loaded = DownscalingPipeline.from_pretrained(hub / "team/dpdm-test")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded, low_res, static).members.tas.values, run(pipe, low_res, static).members.tas.values)
    pipe.push_to_hub("team/dpdm-test", subfolder="v2")  # diffusers' subfolder: into that folder of the repository
    assert (hub / "team/dpdm-test" / "v2" / "model_index.json").is_file()


def test_sharing_can_be_tried_offline_through_the_hugging_face_cache(pipe, low_res, static, tmp_path):
    """No monkeypatching: push_to_hub(local_cache=...) writes the repository as a download leaves it, and
    huggingface_hub resolves the id from there with HF_HUB_OFFLINE=1 (set by conftest)."""
    with pytest.raises(RuntimeError, match="local_cache=True"):  # offline, a real upload is refused clearly
        pipe.push_to_hub("me/dpdm-offline")
    cache = tmp_path / "cache"
    snapshot = pipe.push_to_hub("me/dpdm-offline", local_cache=cache)
    assert (cache / "models--me--dpdm-offline" / "refs" / "main").is_file() and "snapshots" in str(snapshot)
    loaded = DownscalingPipeline.from_pretrained("me/dpdm-offline", cache_dir=cache)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.hub_id == "me/dpdm-offline"
    assert 'from_pretrained("me/dpdm-offline")' in loaded.model_card  # the card names the real id
    np.testing.assert_array_equal(run(loaded, low_res, static).members.tas.values, run(pipe, low_res, static).members.tas.values)
    pipe.push_to_hub("me/dpdm-offline", local_cache=cache, subfolder="v2")
    again = DownscalingPipeline.from_pretrained("me/dpdm-offline", cache_dir=cache)  # the root is still there
    assert again.config.hub_id == "me/dpdm-offline"


# --- bad input -------------------------------------------------------------------------------------
def test_missing_and_extra_variables_are_named(pipe, low_res, static):
    with pytest.raises(ValueError, match=r"missing \['tas'\]"):
        run(pipe, low_res.rename(tas="t2m"), static)
    with pytest.raises(ValueError, match=r"unexpected \['pr'\]"):
        run(pipe, low_res.assign(pr=low_res.tas), static)


def test_units_are_required_converted_when_compatible_and_refused_otherwise(pipe, low_res, static):
    celsius = low_res.assign(tas=(low_res.tas - 273.15).assign_attrs(units="degC"))
    np.testing.assert_allclose(run(pipe, celsius, static).members.tas.values,
                               run(pipe, low_res, static).members.tas.values, atol=1e-3)
    assert run(pipe, celsius, static).members.tas.attrs["units"] == "K"  # output in the model's units
    spelled = low_res.assign(tas=low_res.tas.assign_attrs(units="kelvin"))
    np.testing.assert_array_equal(run(pipe, spelled, static).members.tas.values, run(pipe, low_res, static).members.tas.values)
    with pytest.raises(ValueError, match="'m s-1'.*cannot be converted to 'K'"):
        run(pipe, low_res.assign(tas=low_res.tas.assign_attrs(units="m s-1")), static)
    no_units = low_res.copy()
    no_units["tas"].attrs.pop("units")
    with pytest.raises(ValueError, match="no `units` attribute.*expects 'K'"):
        run(pipe, no_units, static)


def test_variable_map_renames_in_and_back_out_and_errors_suggest_it(pipe, low_res, static):
    mine = low_res.rename(tas="air_temperature")
    with pytest.raises(ValueError, match=r"variable_map=\{'air_temperature': 'tas'\}.*--variable air_temperature=tas"):
        run(pipe, mine, static)
    out = pipe(mine, static_fields=static, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               variable_map={"air_temperature": "tas"})
    assert list(out.members.data_vars) == ["air_temperature"]
    np.testing.assert_array_equal(out.members.air_temperature.values, run(pipe, low_res, static).members.tas.values)
    with pytest.raises(ValueError, match="variable_map names \\['nope'\\]"):
        pipe(low_res, static_fields=static, num_inference_steps=1, variable_map={"nope": "tas"})


def test_non_monotonic_and_duplicated_coordinates(pipe, low_res, static):
    lat = low_res.lat.values.copy()
    lat[[1, 2]] = lat[[2, 1]]
    with pytest.raises(ValueError, match="not monotonic"):
        run(pipe, low_res.assign_coords(lat=lat), static)
    lat = low_res.lat.values.copy()
    lat[2] = lat[1]
    with pytest.raises(ValueError, match="duplicated"):
        run(pipe, low_res.assign_coords(lat=lat), static)
    lon = low_res.lon.values.copy()
    lon[-1] += 0.7
    with pytest.raises(ValueError, match="irregular"):
        run(pipe, low_res.assign_coords(lon=lon), static)


def test_static_fields_on_the_wrong_grid(pipe, low_res, static):
    shifted = {k: v.assign_coords(lat=v.lat + 1.0) for k, v in static.items()}
    with pytest.raises(ValueError, match="Static field 'topography' is on a 24x32 grid"):
        run(pipe, low_res, shifted)
    with pytest.raises(ValueError, match=r"Static fields \['land_sea_mask'\] are missing"):
        run(pipe, low_res, {"topography": static["topography"]})
    coarse = {k: v.isel(lat=slice(0, None, 2)) for k, v in static.items()}
    with pytest.raises(ValueError, match="12x32 grid"):
        run(pipe, low_res, coarse)


def test_nan_input_raises_or_masks(pipe, low_res, static):
    lr = low_res.copy(deep=True)
    lr["tas"][:, 0, 0] = np.nan
    with pytest.raises(ValueError, match="2 NaN values"):
        run(pipe, lr, static)
    out = run(pipe, lr, static, nan_policy="mask", num_members=2)
    m = out.members.tas.values
    assert np.isnan(m[:, :, 0, 0]).all()  # the undefined corner stays undefined
    assert np.isfinite(m[:, :, -4:, -4:]).all()  # far from it the field is defined
    assert np.isnan(out.mean.tas.values[0, 0, 0])


def test_wrong_scale_factor_of_the_target_grid(pipe, low_res, static):
    g = Grid.from_xarray(low_res).refine(2)
    target = xr.Dataset(coords={"lat": g.lat, "lon": g.lon})
    with pytest.raises(ValueError, match="Wrong scale factor"):
        run(pipe, low_res, static, target_grid=target)
    g4 = Grid.from_xarray(low_res).refine(4)
    ok = run(pipe, low_res, static, target_grid=xr.Dataset(coords={"lat": g4.lat, "lon": g4.lon}))
    assert ok.members.tas.shape[-2:] == (24, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_type="pil"), "Unknown output_type"),
        (dict(num_members=0), "num_members must be >= 1"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
        (dict(tiles_per_call=0), "tiles_per_call must be a positive integer"),
        (dict(nan_policy="ignore"), "Unknown nan_policy"),
    ],
)
def test_bad_arguments(pipe, low_res, static, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, low_res, static, **kwargs)


def test_member_dim_clash_and_wrong_input_type(pipe, low_res, static):
    with pytest.raises(ValueError, match="already has a 'member' dimension"):
        run(pipe, low_res.rename(time="member"), static)
    with pytest.raises(TypeError, match="low_res must be"):
        run(pipe, [1, 2, 3], static)


def test_regression_objective_is_one_deterministic_pass(low_res, static, tmp_path):
    pipe = make_pipeline()
    pipe.register_to_config(objective="regression")
    calls = []
    original = pipe.unet.forward

    def counting(sample, timestep, *a, **k):
        calls.append(int(timestep))
        assert sample[:, :1].abs().max() == 0  # zero noise in the sample channels
        return original(sample, timestep, *a, **k)

    pipe.unet.forward = counting
    out = run(pipe, low_res, static, num_members=3, num_inference_steps=25, seed=0)
    assert set(calls) == {0} and len(calls) == 1  # 2 times x 1 tile in one batch, once
    m = out.members.tas.values
    np.testing.assert_array_equal(m[0], m[2])
    assert float(out.std.tas.max()) == 0.0 and out.members.attrs["dpdm_objective"] == "regression"
    other = run(pipe, low_res, static, num_members=1, seed=7).members.tas.values
    np.testing.assert_array_equal(other[0], m[0])  # the seed plays no role
    pipe.unet.forward = original
    pipe.save_pretrained(tmp_path)
    assert DownscalingPipeline.from_pretrained(tmp_path).config.objective == "regression"


# --- two-stage models: regression mean + residual diffusion (CorrDiff) --------------------------------
def test_regression_mean_plus_scaled_diffusion_sample(low_res, static, tmp_path):
    """members = regression mean + stochastic_std * diffusion sample, in model space; checked against the
    diffusion-only and regression-only pipelines built from the same two UNets."""
    from dpdm_diffusers.grids import interpolate

    diffusion = make_pipeline(seed=0)
    regression = make_pipeline(seed=1)
    regression.register_to_config(objective="regression")
    cfg = {k: v for k, v in diffusion.config.items() if not k.startswith("_") and k not in diffusion.components}
    cfg.update(stochastic_std=[0.5])
    two_stage = DownscalingPipeline(unet=diffusion.unet, scheduler=diffusion.scheduler, regression_unet=regression.unet, **cfg)
    two_stage.set_progress_bar_config(disable=True)
    calls = []
    original = regression.unet.forward
    regression.unet.forward = lambda sample, timestep, *a, **k: calls.append(int(timestep)) or original(sample, timestep, *a, **k)

    a = run(diffusion, low_res, static, num_members=2).members.tas.values
    c = run(regression, low_res, static, num_members=1).members.tas.values
    calls.clear()
    b = run(two_stage, low_res, static, num_members=2)
    assert calls == [0]  # the mean is computed once for every member (2 times x 1 tile in one batch)
    lerp = interpolate(low_res.tas.values, Grid.from_xarray(low_res), Grid.from_xarray(low_res).refine(4))
    np.testing.assert_allclose(b.members.tas.values, c + 0.5 * (a - lerp), atol=2e-4)
    assert "residual diffusion" in b.members.attrs["dpdm_objective"]

    regression.unet.forward = original
    two_stage.save_pretrained(tmp_path)
    assert (tmp_path / "regression_unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = DownscalingPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.regression_unet is not None and loaded.config.stochastic_std == [0.5]
    np.testing.assert_array_equal(run(loaded, low_res, static, num_members=2).members.tas.values, b.members.tas.values)


def test_regression_unet_is_checked(low_res):
    from dpdm_diffusers.modeling import build_unet

    pipe = make_pipeline()
    cfg = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components}
    wrong = build_unet(2, 2, 16, "tiny")  # two variables: wrong channels
    with pytest.raises(ValueError, match="regression_unet has in_channels"):
        DownscalingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, regression_unet=wrong, **cfg)
    with pytest.raises(ValueError, match="needs objective='diffusion'"):
        DownscalingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, regression_unet=make_pipeline(seed=1).unet,
                            **{**cfg, "objective": "regression"})
    with pytest.raises(ValueError, match="stochastic_std"):
        DownscalingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, **{**cfg, "stochastic_std": [0.0]})


def test_empty_time_and_non_integer_counts_get_clear_errors(pipe, low_res, static):
    with pytest.raises(ValueError, match=r"\['time'\] dimension is empty"):
        run(pipe, low_res.isel(time=slice(0, 0)), static)
    with pytest.raises(TypeError, match="num_members must be an integer, got 2.5"):
        run(pipe, low_res, static, num_members=2.5)


def test_a_time_steps_members_do_not_depend_on_the_other_steps_in_the_call(pipe, low_res, static):
    both = run(pipe, low_res, static, num_members=2).members.tas
    second = run(pipe, low_res.isel(time=[1]), static, num_members=2).members.tas
    np.testing.assert_allclose(both.isel(time=[1]).values, second.values, atol=1e-5)  # keyed by the time stamp
    shifted = low_res.assign_coords(time=low_res.time + np.timedelta64(1, "D"))
    other = run(pipe, shifted, static, num_members=2).members.tas
    assert not np.allclose(other.values, both.values)  # another time stamp: other noise


def test_no_silent_nonsense_in_or_out(pipe, low_res, static):
    mislabelled = low_res.assign(tas=(low_res.tas - 273.15).assign_attrs(units="K"))  # degC values labelled K
    with pytest.raises(ValueError, match=r"spans .* K, more than 10 standard deviations.*mean 280"):
        run(pipe, mislabelled, static)
    with pytest.raises(ValueError, match="Wrong units or corrupt"):
        run(pipe, low_res.assign(tas=(low_res.tas * 0 + 1e6).assign_attrs(units="K")), static)
    for dtype in (bool, np.complex64):
        with pytest.raises(TypeError, match="real-valued numeric"):
            run(pipe, low_res.assign(tas=low_res.tas.astype(dtype).assign_attrs(units="K")), static)
    with pytest.raises(ValueError, match="no coordinate values: not a lat/lon grid"):
        run(pipe, low_res.drop_vars("lat"), static)
    projected = low_res.assign_coords(lat=low_res.lat * 1000)
    with pytest.raises(ValueError, match="not a lat/lon grid"):
        run(pipe, projected, static)
    bad_static = dict(static, topography=static["topography"].where(static["topography"] < 400, np.inf))
    with pytest.raises(ValueError, match="NaN or inf"):
        run(pipe, low_res, bad_static)
    broken = make_pipeline()
    with torch.no_grad():
        next(broken.unet.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        run(broken, low_res, static)


@pytest.mark.parametrize("where, key, value, message", [
    ("unet/config.json", "layers_per_block", 100000, "layers_per_block 100000"),
    ("unet/config.json", "block_out_channels", [65536, 65536], "block_out_channels"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 1000000000, "num_train_timesteps"),
    ("model_index.json", "patch_size", 10**6, "patch_size"),
    ("model_index.json", "norm_mean", None, r"lacks \['norm_mean'\]"),
    ("model_index.json", "units", None, r"lacks \['units'\]"),
])
def test_untrusted_configs_are_bounded_and_complete(pipe, tmp_path, where, key, value, message):
    import time as _time

    pipe.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / where).read_text())
    if value is None:
        cfg.pop(key)
    else:
        cfg[key] = value
    (tmp_path / where).write_text(json.dumps(cfg))
    t0 = _time.perf_counter()
    with pytest.raises(ValueError, match=message):
        DownscalingPipeline.from_pretrained(tmp_path)
    assert _time.perf_counter() - t0 < 10  # refused before anything is built


def test_a_global_field_is_the_same_in_either_longitude_convention(pipe):
    grid_lon = np.arange(0, 360, 22.5) + 11.25  # 16 coarse columns: global, periodic
    lat = np.arange(-30, 30, 10.0) + 5
    rng = np.random.default_rng(0)
    vals = (280 + 3 * rng.standard_normal((1, lat.size, grid_lon.size))).astype("float32")
    east = xr.Dataset({"tas": (("time", "lat", "lon"), vals, {"units": "K"})},
                      coords={"time": np.array(["2000-01-01"], dtype="datetime64[ns]"), "lat": lat, "lon": grid_lon})
    west = east.assign_coords(lon=(east.lon + 180) % 360 - 180).sortby("lon")  # -180..180, rolled
    fine = Grid.from_xarray(east).refine(4)
    st = make_static(fine)
    st_west = {k: v.assign_coords(lon=(v.lon + 180) % 360 - 180).sortby("lon") for k, v in st.items()}
    a = run(pipe, east, st, num_members=2).members.tas
    b = run(pipe, west, st_west, num_members=2).members.tas
    assert b.lon.values.min() < 0 and np.all(np.diff(b.lon.values) > 0)  # given back in the caller's convention
    b360 = b.assign_coords(lon=b.lon % 360).sortby("lon")
    np.testing.assert_allclose(b360.values, a.values, atol=1e-4)


def test_a_dateline_region_in_minus180_180_works_and_a_huge_call_is_refused_with_an_estimate(pipe, monkeypatch):
    lon = np.array([170.5, 171.5, 172.5, 173.5, 174.5, 175.5, 176.5, 177.5, 178.5, 179.5, -179.5, -178.5])
    low = make_low_res(nlon=12).assign_coords(lon=lon)  # a region across the dateline, -180..180 convention
    fine = Grid(Grid.from_xarray(low.assign_coords(lon=np.mod(lon, 360)).sortby("lon")).refine(4).lat,
                Grid.from_xarray(low.assign_coords(lon=np.mod(lon, 360)).sortby("lon")).refine(4).lon)
    out = run(pipe, low, make_static(fine), num_members=1).members.tas
    assert np.all(np.diff(out.lon.values) > 0) and out.lon.values.max() > 180  # continuous longitudes across 180
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 2**20})())
    with pytest.raises(MemoryError, match=r"needs about .* GiB .* but 0.0 GiB are free"):
        run(pipe, make_low_res(), make_static(Grid.from_xarray(make_low_res()).refine(4)), num_members=50)


# --- conservation ----------------------------------------------------------------------------------
def test_conserve_makes_every_member_coarsen_back_to_the_input(pipe, low_res, static):
    from dpdm_diffusers.conservation import block_mean, block_repeat

    plain = run(pipe, low_res, static, num_members=3).members.tas
    kept = run(pipe, low_res, static, num_members=3, conserve=True)
    members = kept.members.tas
    coarse = block_mean(members.values, 4)  # (member, time, lat, lon) -> coarse grid
    assert np.abs(coarse - low_res.tas.values[None]).max() < 1e-3  # float32 at 280 K
    assert np.abs(block_mean(plain.values, 4) - low_res.tas.values[None]).max() > 0.05  # it was not so before
    # the correction is constant over each 4 x 4 block: fine-scale structure is the model's
    diff = (members - plain).values
    assert np.abs(diff - block_repeat(block_mean(diff, 4), 4)).max() < 1e-3
    assert kept.members.attrs["dpdm_conserve"] == 1


def test_conserve_needs_the_refined_grid_and_is_multiplicative_for_log1p(low_res, static):
    from dpdm_diffusers.conservation import block_mean

    pipe = make_pipeline()
    target = Grid.from_xarray(low_res).refine(4)
    shifted = Grid(target.lat + 0.1, target.lon)
    with pytest.raises(ValueError, match="default target grid"):
        run(pipe, low_res, make_static(shifted), target_grid=shifted, conserve=True)
    rain = make_pipeline(variables=("pr",), units=["mm/day"], transforms=["log1p"])
    rain.register_to_config(norm_mean=[1.0], norm_std=[1.0])
    low = make_low_res(variables=("pr",), units=["mm/day"])
    low["pr"] = np.abs(low["pr"] - 280.0).assign_attrs(units="mm/day")
    out = rain(low, static_fields=static, num_inference_steps=2, num_members=2, conserve=True,
               generator=torch.Generator().manual_seed(0)).members.pr
    assert float(out.min()) >= 0 and np.abs(block_mean(out.values, 4) - low.pr.values[None]).max() < 1e-3


def test_a_re_saved_folder_records_no_machine_path(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "a")
    DownscalingPipeline.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    saved = [p.read_text() for p in (tmp_path / "b").rglob("*.json")]
    assert saved and not any(str(tmp_path) in text or "_name_or_path" in text for text in saved)
