"""train_dpdm: few-step runs end in loadable pipelines; resume (also after SIGKILL); regression; fine-tune;
two CPU processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.training.checkpoints import COMPLETE_MARKER, list_checkpoints
from dpdm_diffusers.training.train_dpdm import main


@pytest.fixture(scope="module")
def high_res_file(tmp_path_factory):
    """8 monthly 32x32 fields at 0.25 deg with fine-scale structure a 4x block mean loses."""
    rng = np.random.default_rng(0)
    lat = 20 + 0.25 * (np.arange(32) + 0.5)
    lon = 100 + 0.25 * (np.arange(32) + 0.5)
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    fields = [285 + 3 * np.sin(yy * 3 + k) + 2 * np.cos(xx * 5) + rng.normal(0, 0.3, yy.shape) for k in range(8)]
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), np.stack(fields).astype("float32"), {"units": "K"})},
        coords={"time": np.array([f"2001-{m:02d}-01" for m in range(1, 9)], dtype="datetime64[ns]"), "lat": lat, "lon": lon},
    )
    path = tmp_path_factory.mktemp("data") / "tas.nc"
    ds.to_netcdf(path)
    return path


def args(path, out, *extra):
    return [
        "--high_res", str(path), "--scale_factor", "4", "--static_channels=", "--unet_preset", "tiny",
        "--patch_size", "16", "--train_batch_size", "4", "--max_train_steps", "4", "--lr_warmup_steps", "0",
        "--train_time", "2001-01,2001-06", "--validation_time", "2001-07,2001-08",
        "--validation_members", "2", "--validation_inference_steps", "2", "--validation_steps", "0",
        "--checkpointing_steps", "2", "--report_to", "none", "--output_dir", str(out), *extra,
    ]


def unet_weights(folder) -> dict:
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def test_few_step_training_ends_in_a_loadable_pipeline_with_a_card(high_res_file, tmp_path):
    out = main(args(high_res_file, tmp_path / "run", "--checkpoints_total_limit", "1"))
    pipe = DownscalingPipeline.from_pretrained(out)
    assert list(pipe.config.variables) == ["tas"] and pipe.config.objective == "diffusion"
    assert 270 < pipe.config.norm_mean[0] < 300 and pipe.config.residual_std[0] > 0
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "library_name: diffusers" in card and "steps: 4" in card
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["val_rmse_lerp"] > 0 and np.isfinite(summary["val_rmse_mean"])
    # the Hub reads the validation scores from the card's model-index; both ways of loading are shown
    from huggingface_hub import ModelCard

    results = {r.metric_name: r.metric_value for r in ModelCard(card).data.eval_results}
    assert results["RMSE ensemble mean"] == pytest.approx(summary["val_rmse_mean"], abs=1e-4)
    assert "trust_remote_code=True" in card and "DownscalingPipeline.from_pretrained" in card
    assert [s for s, _ in list_checkpoints(out)] == [4]  # total limit 1 keeps the newest only
    pipe.scheduler.set_timesteps(10)  # the saved sampler never starts at t = 999 (alpha_bar 2e-9: x0 blows up)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and int(pipe.scheduler.timesteps[0]) <= 959
    pipe.set_progress_bar_config(disable=True)
    low = xr.open_dataset(high_res_file).coarsen(lat=4, lon=4).mean().isel(time=[0])
    res = pipe(low, num_members=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert res.members.tas.shape == (2, 1, 32, 32) and np.isfinite(res.members.tas.values).all()


def test_resumed_run_matches_an_uninterrupted_one(high_res_file, tmp_path):
    full = main(args(high_res_file, tmp_path / "full", "--validation_time="))
    part = tmp_path / "part"
    main(args(high_res_file, part, "--validation_time=", "--stop_after_steps", "2"))
    assert [s for s, _ in list_checkpoints(part)] == [2] and not (part / "model_index.json").exists()
    main(args(high_res_file, part, "--validation_time=", "--resume_from_checkpoint", "latest"))
    a, b = unet_weights(full), unet_weights(part)
    for k in a:  # optimizer, LR schedule, EMA, RNG and data position all restored
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_regression_objective_trains_the_same_unet_deterministically(high_res_file, tmp_path):
    out = main(args(high_res_file, tmp_path / "reg", "--objective", "regression"))
    pipe = DownscalingPipeline.from_pretrained(out)
    assert pipe.config.objective == "regression"
    summary = json.loads((out / "training_summary.json").read_text())
    assert np.isfinite(summary["val_rmse_mean"])
    assert summary["val_rmse_member0"] == pytest.approx(summary["val_rmse_mean"])  # no spread


@pytest.mark.filterwarnings("ignore:The best spread factor")  # a 4-step model's best spread sits at the grid's edge
def test_two_stage_run_learns_the_regression_residual(high_res_file, tmp_path):
    reg = main(args(high_res_file, tmp_path / "reg", "--objective", "regression", "--max_train_steps", "6"))
    out = main(args(high_res_file, tmp_path / "two", "--regression_model", str(reg), "--stochastic_std_batches", "3",
                    "--calibrate_spread", "true", "--calibration_members", "3"))
    pipe = DownscalingPipeline.from_pretrained(out)
    reg_pipe = DownscalingPipeline.from_pretrained(reg)
    assert pipe.regression_unet is not None and pipe.config.norm_mean == reg_pipe.config.norm_mean
    for k, w in reg_pipe.unet.state_dict().items():  # the mean model is frozen and shipped as trained
        torch.testing.assert_close(pipe.regression_unet.state_dict()[k], w)
    summary = json.loads((out / "training_summary.json").read_text())
    std, cal = summary["stochastic_std"], summary["spread_calibration"]
    assert std == pipe.config.stochastic_std and 0 < std[0] < 5
    assert cal["stochastic_std"] == std and cal["crps"] <= cal["crps_uncalibrated"]  # calibrated on validation
    card = (out / "README.md").read_text()
    assert "two-stage" in card and "## Spread calibration" in card
    with pytest.raises(SystemExit):  # a regression mean only makes sense under a diffusion model
        main(args(high_res_file, tmp_path / "bad", "--regression_model", str(reg), "--objective", "regression"))
    with pytest.raises(SystemExit, match="must be trained with --objective regression"):
        main(args(high_res_file, tmp_path / "bad2", "--regression_model", str(out)))


def test_spread_factor_scales_the_measured_spread_and_both_patch_sources_train(high_res_file, tmp_path, caplog):
    """--spread_factor carries a held-out calibration to a refit; the CPU DataLoader path still trains."""
    reg = main(args(high_res_file, tmp_path / "reg", "--objective", "regression"))
    common = ("--regression_model", str(reg), "--stochastic_std_batches", "3", "--calibrate_spread", "false")
    with caplog.at_level(logging.INFO, logger="dpdm_diffusers.training"):
        one = main(args(high_res_file, tmp_path / "one", *common))
        assert "patches cut on cpu (fields held there)" in caplog.text
        two = main(args(high_res_file, tmp_path / "two", *common, "--spread_factor", "2"))
        loader = main(args(high_res_file, tmp_path / "loader", *common, "--patches_on_device", "false"))
        assert "patches cut by a DataLoader" in caplog.text
    std1, std2 = (DownscalingPipeline.from_pretrained(p).config.stochastic_std for p in (one, two))
    assert std2[0] == pytest.approx(2 * std1[0], rel=1e-6)
    for k, w in unet_weights(one).items():  # the factor scales sampling only: the UNet learns the same thing
        torch.testing.assert_close(unet_weights(two)[k], w)
    assert any(not torch.equal(a, b) for a, b in zip(unet_weights(one).values(), unet_weights(loader).values()))


def test_fine_tune_from_a_saved_model_keeps_or_recomputes_statistics(high_res_file, tmp_path):
    base = main(args(high_res_file, tmp_path / "base"))
    shifted = tmp_path / "shifted.nc"
    ds = xr.open_dataset(high_res_file)
    (ds + 10).assign_attrs(ds.attrs).pipe(lambda d: d.assign(tas=d.tas.assign_attrs(units="K"))).to_netcdf(shifted)
    kept = main(args(shifted, tmp_path / "ft", "--init_from", str(base), "--learning_rate", "1e-5", "--max_train_steps", "2"))
    base_cfg, ft_cfg = DownscalingPipeline.from_pretrained(base).config, DownscalingPipeline.from_pretrained(kept).config
    assert ft_cfg.norm_mean == base_cfg.norm_mean
    card = (kept / "README.md").read_text()
    assert "the local model `base`" in card and str(tmp_path) not in card  # lineage, never a machine's path
    assert "base_model:" not in card  # the front matter names a base only by its Hub id
    w0, w1 = unet_weights(base), unet_weights(kept)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # it did train
    redo = main(args(shifted, tmp_path / "ft2", "--init_from", str(base), "--max_train_steps", "2",
                     "--recompute_statistics", "true"))
    assert DownscalingPipeline.from_pretrained(redo).config.norm_mean[0] == pytest.approx(base_cfg.norm_mean[0] + 10, abs=0.01)


@pytest.mark.heavy
def test_sigkill_mid_run_then_resume_reaches_the_final_step(high_res_file, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dpdm_diffusers.training.train_dpdm",
           *args(high_res_file, out, "--max_train_steps", "400", "--checkpointing_steps", "5", "--validation_time=")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(out):
            time.sleep(0.2)
        assert list_checkpoints(out), "no checkpoint appeared"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = list_checkpoints(out)
    assert done and done[-1][0] < 400
    # a half-written checkpoint (no completion marker) must never be taken as the latest
    fake = out / "checkpoint-399"
    fake.mkdir()
    (fake / "random_states_0.pkl").write_text("garbage")
    assert list_checkpoints(out)[-1][0] == done[-1][0]
    result = main(args(high_res_file, out, "--max_train_steps", "400", "--checkpointing_steps", "5",
                       "--validation_time=", "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2"))
    summary = json.loads((result / "training_summary.json").read_text())
    assert summary["global_step"] == 400
    assert all((p / COMPLETE_MARKER).exists() for _, p in list_checkpoints(out))
    assert DownscalingPipeline.from_pretrained(result).config.variables == ["tas"]


@pytest.mark.heavy
def test_two_cpu_processes_train_one_model_distributed(high_res_file, tmp_path):
    # the README's torchrun line as written (no ACCELERATE_USE_CPU): two ranks join one gloo group
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "dpdm_diffusers.training.train_dpdm", *args(high_res_file, out, "--validation_time=")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    crops = summary["first_crops_per_process"]
    assert len(crops) == 2 and crops[0] != crops[1]  # the batches are shared out: each process its own crops
    weights = summary["weights_per_process"]  # different data, the same weights: gradients were synchronised
    assert len(weights) == 2 and weights[0] == weights[1]
    assert DownscalingPipeline.from_pretrained(out).config.variables == ["tas"]


class _Payload:
    """Unpickling this writes a marker file: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_shared_checkpoint_cannot_run_code_on_resume(high_res_file, tmp_path):
    import pickle

    part = tmp_path / "part"
    main(args(high_res_file, part, "--validation_time=", "--stop_after_steps", "2"))
    ckpt = list_checkpoints(part)[-1][1]
    assert not list(ckpt.glob("custom_checkpoint_*.pkl"))  # no pickled custom state is written any more
    assert (ckpt / "noise_rng_0.safetensors").exists()
    marker = tmp_path / "pwned"
    planted = ckpt / "custom_checkpoint_0.pkl"
    planted.write_bytes(pickle.dumps({"state": _Payload(marker)}))
    with pytest.raises(ValueError, match="Cannot resume"):  # refused (a file nothing registered), never unpickled
        main(args(high_res_file, part, "--validation_time=", "--resume_from_checkpoint", str(ckpt)))
    assert not marker.exists()
    planted.unlink()
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="unreadable or unsafe random_states_0.pkl"):
        main(args(high_res_file, part, "--validation_time=", "--resume_from_checkpoint", str(ckpt)))
    assert not marker.exists()  # refused by weights_only loading, not executed
    # a tampered UNet config would hang the resume building a network of 100000 layers per block: refused first
    config = ckpt / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layers_per_block": 100000}))
    with pytest.raises(ValueError, match=r"Cannot resume.*layers_per_block 100000"):
        main(args(high_res_file, part, "--validation_time=", "--resume_from_checkpoint", str(ckpt)))


def test_empty_reversed_or_overlapping_time_selections_are_refused_before_training(high_res_file, tmp_path):
    cases = (("--train_time", "1700,1750", "selects no time step: the data runs from 2001-01-01"),
             ("--train_time", "2001-06,2001-01", "is reversed"),
             ("--validation_time", "1999-01,1999-02", "--validation-time 1999-01,1999-02 selects no time step"),
             ("--validation_time", "2001-05,2001-08", "share 2 time step"))
    for option, value, message in cases:
        with pytest.raises(ValueError, match=message):
            main(args(high_res_file, tmp_path / "run", option, value))
        assert not list((tmp_path / "run").glob("checkpoint-*"))  # refused before any step


def test_without_a_training_range_training_leaves_out_the_validation_range(high_res_file):
    from dpdm_diffusers.user_data import load_region

    region = load_region(str(high_res_file), scale_factor=4, variables=["tas"], validation_time=["2001-07", "2001-08"])
    trained = region.pairs.high_res.sel(**region.train).time.values
    assert len(trained) == 6 and trained.max() < np.datetime64("2001-07-01")
    assert region.describe["train"] == "all but validation"


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(high_res_file, tmp_path, caplog):
    run = tmp_path / "run"
    main(args(high_res_file, run, "--validation_time=", "--stop_after_steps", "4", "--checkpointing_steps", "2",
              "--checkpoints_total_limit", "2", "--max_train_steps", "6"))
    (first, _), (_, latest) = list_checkpoints(run)
    (latest / "noise_rng_0.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="dpdm_diffusers.training"):
        out = main(args(high_res_file, run, "--validation_time=", "--resume_from_checkpoint", "latest",
                        "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--max_train_steps", "6"))
    assert "is unreadable" in caplog.text and f"falling back to {run / f'checkpoint-{first}'}" in caplog.text
    assert json.loads((out / "training_summary.json").read_text())["global_step"] == 6


def test_training_options_are_type_checked_by_pydantic(tmp_path, capsys):
    from dpdm_diffusers.training.config import parse_args

    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 1e-4\nuse_ema: 'false'\nmax_train_steps: 10\n")  # PyYAML reads 1e-4 as a string
    cfg = parse_args(["--config", str(good)])
    assert cfg.learning_rate == 1e-4 and cfg.use_ema is False and cfg.max_train_steps == 10
    for text, message in (("train_batch_size: 0\n", "train_batch_size: Input should be greater than 0"),
                          ("use_ema: sometimes\n", "use_ema: Input should be a valid boolean"),
                          ("patch_size: -64\n", "patch_size: Input should be greater than 0"),
                          ("objective: diffusionn\n", "objective: Input should be 'diffusion' or 'regression'")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(SystemExit):
            parse_args(["--config", str(bad)])
        assert message in capsys.readouterr().err


def test_a_config_built_in_python_renders_the_command_that_rebuilds_it():
    from dpdm_diffusers.training.config import TrainingConfig, parse_args, render_command, to_argv

    cfg = TrainingConfig(high_res=["a.nc", "b*.nc"], variable_map={"t2m": "tas"}, lat_box=[-20.0, -10.5],
                         static_channels=[], checkpoints_total_limit=None, use_ema=False, learning_rate=2e-5,
                         output_dir="my runs/x")
    assert parse_args(to_argv(cfg)) == cfg
    assert to_argv(TrainingConfig()) == []  # defaults are left out
    command = render_command(cfg)
    assert command.startswith("python -m dpdm_diffusers.training.train_dpdm ") and "--lat_box=-20.0,-10.5" in command
    assert "'my runs/x'" in command


def test_validation_scores_pool_variables_in_units_of_their_spread():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_low_res, make_pipeline

    from dpdm_diffusers.data import coarsen
    from dpdm_diffusers.training.config import TrainingConfig
    from dpdm_diffusers.training.validation import validate

    pipe = make_pipeline(variables=("tas", "tas2"), static=())
    truth = make_low_res(nlat=16, nlon=16, ntime=2, step=0.25, variables=("tas", "tas2")).rename(time="sample")
    truth = truth.drop_vars("sample")
    cfg = TrainingConfig(validation_members=2, validation_inference_steps=1)
    scores = validate(pipe, (coarsen(truth, 4), truth, None), cfg, seed=0)
    for name in ("mean", "lerp", "member0", "ratio"):
        assert {f"val_rmse_{name}", f"val_rmse_{name}/tas", f"val_rmse_{name}/tas2"} <= set(scores)
    for name in ("mean", "lerp", "member0"):  # each variable in units of the truth's own spread (Pa never dominate)
        per_var = [scores[f"val_rmse_{name}/{v}"] / float(truth[v].std()) for v in ("tas", "tas2")]
        assert scores[f"val_rmse_{name}"] == pytest.approx(np.sqrt(np.mean(np.square(per_var))), rel=1e-5)
    one = make_pipeline(variables=("tas",), static=())
    single = validate(one, (coarsen(truth[["tas"]], 4), truth[["tas"]], None), cfg, seed=0)
    assert set(single) == {"val_rmse_mean", "val_rmse_lerp", "val_rmse_member0", "val_rmse_ratio"}  # in K, as before
    assert single["val_rmse_lerp"] == pytest.approx(scores["val_rmse_lerp/tas"])
