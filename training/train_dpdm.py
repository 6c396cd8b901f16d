#!/usr/bin/env python
# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Train or fine-tune a DPDM downscaling model with Accelerate (in the style of diffusers' examples).

    accelerate launch -m dpdm_diffusers.training.train_dpdm --config training/configs/glosea4_ts_x4.yaml
    accelerate launch -m dpdm_diffusers.training.train_dpdm --config my_region.yaml --init_from path/or/hub-id
    torchrun --nproc_per_node 2 -m dpdm_diffusers.training.train_dpdm --config ...   # 2 CPU processes (gloo)

Every option of the YAML config can be overridden on the command line (``--max_train_steps 500``).
The run leaves a ``DownscalingPipeline.save_pretrained`` folder in ``output_dir`` (EMA weights, model
card) and ``checkpoint-N`` folders that ``--resume_from_checkpoint latest`` continues from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

logger = logging.getLogger("dpdm_diffusers.training")

COMPLETE_MARKER = "checkpoint_complete.json"


@dataclass
class TrainingConfig:
    # data ---------------------------------------------------------------------------------------
    dataset: str = "files"  # "files" or "glosea4-ts-x4"
    high_res: list[str] = field(default_factory=list)  # netCDF/zarr paths or globs (dataset=files)
    low_res: list[str] = field(default_factory=list)  # optional real low-res source; default: block-mean
    variables: list[str] = field(default_factory=list)  # default: every variable of the files
    transforms: list[str] = field(default_factory=list)  # default: log1p for precipitation, else identity
    scale_factor: int = 4
    train_time: list[str] = field(default_factory=list)  # [start, end], inclusive
    validation_time: list[str] = field(default_factory=list)
    lat_box: list[float] = field(default_factory=list)  # [south, north]
    lon_box: list[float] = field(default_factory=list)  # [west, east], may cross the dateline
    static_channels: list[str] = field(default_factory=lambda: ["topography", "land_sea_mask"])
    static_files: dict = field(default_factory=dict)  # {channel: path}; default: packaged global data
    # model --------------------------------------------------------------------------------------
    unet_preset: str = "small"
    patch_size: int = 64
    prediction: str = "residual"
    interpolation: str = "bilinear"
    objective: str = "diffusion"  # or "regression" (deterministic baseline, same UNet)
    # two-stage (CorrDiff) model: a trained regression pipeline whose prediction is the mean; the diffusion
    # UNet learns what it misses, divided by its RMS (stochastic_std, from `stochastic_std_batches` batches)
    regression_model: str | None = None
    stochastic_std_batches: int = 32
    # after training, scale stochastic_std to the lowest fair CRPS on the validation split (dpdm_diffusers.calibration)
    calibrate_spread: bool = False
    calibration_members: int = 8
    calibration_max_samples: int = 16
    init_from: str | None = None  # pretrained pipeline folder or Hub id to fine-tune
    recompute_statistics: bool = False  # fine-tuning: keep the base model's statistics unless set
    # optimisation -------------------------------------------------------------------------------
    max_train_steps: int = 1000
    train_batch_size: int = 16
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    use_ema: bool = True
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay grows as 1 - (1 + step)^-3/4 up to ema_decay, so early weights fade fast
    seed: int = 0
    dataloader_num_workers: int = 0
    # checkpoints, validation, logging -----------------------------------------------------------
    output_dir: str = "runs/dpdm"
    checkpointing_steps: int = 250
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 250
    validation_members: int = 4
    validation_inference_steps: int = 10
    validation_max_samples: int = 4
    report_to: str = "tensorboard"  # "tensorboard" | "none" (tensorboard only when installed)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    model_card_title: str = "DPDM downscaling model"
    stop_after_steps: int | None = None  # end this invocation early (pieces of a long run); resume later


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _parse_value(raw: str, annotation: str):
    if "bool" in annotation:
        return raw.lower() in ("1", "true", "yes", "y")
    if annotation.startswith("list"):
        items = [x for x in raw.split(",") if x != ""]
        return [float(x) for x in items] if "float" in annotation else items
    if annotation.startswith("dict"):
        return json.loads(raw)
    if "int" in annotation and raw.lower() != "none":
        return int(raw)
    if "float" in annotation:
        return float(raw)
    return None if raw.lower() == "none" else raw


def parse_args(argv=None) -> TrainingConfig:
    """YAML config first, then command-line overrides for any field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file with any of the options below.")
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    for name, f in fields.items():
        parser.add_argument(f"--{name}", type=str, default=None, help=f"{f.type} (default from config/{name})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            parser.error(f"unknown option(s) in {args.config}: {unknown}")
        values.update(loaded)
    for name, f in fields.items():
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _parse_value(raw, str(f.type))
    cfg = TrainingConfig(**values)
    if cfg.objective not in ("diffusion", "regression"):
        parser.error(f"--objective must be 'diffusion' or 'regression', got {cfg.objective!r}")
    if cfg.regression_model and cfg.objective != "diffusion":
        parser.error("--regression_model is the mean of a two-stage diffusion model; it needs --objective diffusion")
    if cfg.regression_model and cfg.recompute_statistics:
        parser.error("--regression_model fixes the statistics (the regression model's); fine-tune it first to change them")
    return cfg


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _time_slice(bounds):
    return slice(*bounds) if bounds else None


def load_pairs(cfg: TrainingConfig):
    """High-res truth, its low-res input and static fields (xarray), with train/validation selections."""
    from dpdm_diffusers import data

    if cfg.dataset == "glosea4-ts-x4":
        from dpdm_diffusers import glosea4

        bench = glosea4.load_glosea4_benchmark(static=bool(cfg.static_channels))
        pairs = bench
        split = {k: {"time": slice(*v)} for k, v in glosea4.SPLITS.items()}
        describe = {
            "source": "GloSea4 surface_temperature, 13 members x 6 months (iris-sample-data, Open Government Licence)",
            "benchmark": f"{glosea4.NAME} (DATA.md): 144x192 N96 truth, 4x4 block-mean low-res 36x48",
            "train": "2011-08 .. 2011-11 (52 fields)", "validation": "2011-12 (13 fields)", "test": "2012-01 (13 fields)",
            "static fields": "topography (pvlib Altitude.h5) and land fraction (global-land-mask), area-averaged",
        }
        static = bench.static[cfg.static_channels] if bench.static is not None else None
        return pairs, static, split["train"], split["validation"], describe
    if cfg.dataset != "files":
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; use 'files' or 'glosea4-ts-x4'.")
    if not cfg.high_res:
        raise ValueError("dataset=files needs --high_res paths (netCDF or zarr, globs allowed).")
    box = dict(lat=tuple(cfg.lat_box) or None, lon=tuple(cfg.lon_box) or None)
    high_res = data.open_dataset(cfg.high_res, variables=cfg.variables or None, **box)
    low_res = data.open_dataset(cfg.low_res, variables=list(high_res.data_vars)) if cfg.low_res else None
    pairs = data.make_pairs(high_res, scale_factor=cfg.scale_factor, low_res=low_res)
    static = None
    if cfg.static_channels:
        from dpdm_diffusers.static_fields import get_static_fields

        static = get_static_fields(pairs.grid, cfg.static_channels, sources=cfg.static_files or None)
    train = {"time": _time_slice(cfg.train_time)} if cfg.train_time else {}
    validation = {"time": _time_slice(cfg.validation_time)} if cfg.validation_time else {}
    describe = {
        "source": ", ".join(cfg.high_res),
        "low_res": ", ".join(cfg.low_res) if cfg.low_res else f"{cfg.scale_factor}x{cfg.scale_factor} block mean",
        "train": str(cfg.train_time or "all"),
        "validation": str(cfg.validation_time or "none"),
    }
    return pairs, static, train, validation, describe


def build_statistics(cfg, pairs, static, train, base_config=None) -> dict:
    """Statistics on the training split, or the base model's when fine-tuning keeps them."""
    from dpdm_diffusers.statistics import compute_statistics

    if base_config is not None and not cfg.recompute_statistics:
        keys = ("variables", "units", "transforms", "norm_mean", "norm_std", "residual_std",
                "static_channels", "static_mean", "static_std")
        stats = {k: list(base_config[k]) for k in keys}
        missing = [v for v in stats["variables"] if v not in pairs.high_res.data_vars]
        if missing:
            raise ValueError(f"The base model downscales {stats['variables']}, the data lacks {missing}.")
        return stats
    lerp = pairs.lerp(cfg.interpolation)
    stats = compute_statistics(
        pairs.high_res, lerp, variables=list(pairs.high_res.data_vars), transforms=cfg.transforms or None,
        train=train or None, static=static, static_channels=cfg.static_channels or None,
    )
    stats.setdefault("static_channels", [])
    stats.setdefault("static_mean", [])
    stats.setdefault("static_std", [])
    return stats


def load_regression_model(path: str, base=None):
    """The frozen mean model of a two-stage run; it must share the diffusion model's data settings."""
    from dpdm_diffusers import DownscalingPipeline

    reg = DownscalingPipeline.from_pretrained(path)
    if reg.config.objective != "regression":
        raise ValueError(f"--regression_model {path} has objective {reg.config.objective!r}; train it with --objective regression.")
    if base is not None:
        keys = ("variables", "static_channels", "scale_factor", "patch_size", "prediction", "interpolation",
                "norm_mean", "norm_std", "residual_std")
        diff = [k for k in keys if list(np.atleast_1d(base.config[k])) != list(np.atleast_1d(reg.config[k]))]
        if diff:
            raise ValueError(f"--regression_model {path} and --init_from differ in {diff}; they must share one model space.")
    return reg


def regression_forward(unet, target, cond):
    """A regression UNet's prediction: one pass at t = 0 on zero noise (how the pipeline runs it too)."""
    t0 = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    return unet(torch.cat([torch.zeros_like(target), cond], dim=1), t0).sample


@torch.no_grad()
def regression_residual_rms(reg_unet, dataset, num_batches: int, batch_size: int, device) -> list[float]:
    """Per-variable RMS of (model-space target - regression prediction) over training patches: the scale
    of what the diffusion stage generates. Deterministic (epoch-0 crops), so a resumed run gets the same."""
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    sq, n = None, None
    for _, batch in zip(range(num_batches), loader):
        target, cond, mask = batch["target"].to(device), batch["condition"].to(device), batch["mask"].float().to(device)
        mean = regression_forward(reg_unet, target, cond)
        err = (target - mean.float()) ** 2 * mask
        sq = err.sum((0, 2, 3)) if sq is None else sq + err.sum((0, 2, 3))
        n = mask.sum((0, 2, 3)) if n is None else n + mask.sum((0, 2, 3))
    return [float(x) for x in (sq / n.clamp_min(1)).sqrt().cpu()]


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class NoiseRNG:
    """A dedicated generator for diffusion noise and timesteps, saved in every checkpoint.

    The global torch RNG is also consumed by DataLoader iterators (created at different points in a
    fresh and a resumed run), so a resumed run only repeats an uninterrupted one with its own stream.
    """

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"].cpu() if hasattr(state["state"], "cpu") else state["state"])


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` folders, oldest first. Half-written ones (no marker) never count."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None):
    """Write ``checkpoint-N`` atomically: save to a temporary folder, mark complete, then rename."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for _, old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# validation through the real pipeline
# ----------------------------------------------------------------------------------------------
def validate(pipe, val, cfg, seed: int) -> dict:
    """RMSE of the ensemble mean, one member and the interpolated input against the truth on (a few)
    validation samples; ``val_rmse_lerp`` uses the model's own interpolation."""
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.grids import Grid

    low, truth, static = val
    variables = list(pipe.config.variables)
    out = pipe(
        low, static_fields=static, num_members=cfg.validation_members,
        num_inference_steps=cfg.validation_inference_steps, generator=torch.Generator().manual_seed(seed),
    )
    lerp = regrid(low[variables], Grid.from_xarray(truth), method=pipe.config.interpolation)

    def rmse(forecast) -> float:
        return float(np.sqrt(np.nanmean([((forecast[v].values - truth[v].values) ** 2) for v in variables])))

    scores = {"val_rmse_mean": rmse(out.mean), "val_rmse_lerp": rmse(lerp), "val_rmse_member0": rmse(out.members.isel(member=0))}
    scores["val_rmse_ratio"] = scores["val_rmse_mean"] / scores["val_rmse_lerp"] if scores["val_rmse_lerp"] > 0 else float("nan")
    return scores


def validation_inputs(pairs, static, validation, max_samples: int):
    """Low-res input, truth and static fields for validation, flattened to a ``sample`` dim."""
    if not validation:
        return None
    low = pairs.low_res.sel(**validation)
    truth = pairs.high_res.sel(**validation)
    dims = [d for d in low[list(low.data_vars)[0]].dims if d not in ("lat", "lon")]
    if dims:
        low = low.stack(sample=dims).isel(sample=slice(0, max_samples)).drop_vars(["sample", *dims], errors="ignore")
        truth = truth.stack(sample=dims).isel(sample=slice(0, max_samples)).drop_vars(["sample", *dims], errors="ignore")
        low, truth = low.transpose("sample", "lat", "lon"), truth.transpose("sample", "lat", "lon")
    if low.sizes.get("sample", 1) == 0:
        return None
    st = None if static is None else {k: static[k] for k in static.data_vars}
    return low.load(), truth.load(), st


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> Path:
    cfg = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from dpdm_diffusers import DownscalingPipeline, __version__
    from dpdm_diffusers.model_card import render_model_card
    from dpdm_diffusers.modeling import build_unet, default_sampler, default_scheduler
    from dpdm_diffusers.samples import RandomPatchDataset, normalize_fields
    from dpdm_diffusers.transforms import Normalizer

    t_start = time.time()
    output_dir = Path(cfg.output_dir)
    log_with = None
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("state: %s", accelerator.state)
    set_seed(cfg.seed, device_specific=True)  # different crops on every process
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for partial in output_dir.glob(".checkpoint-*.partial"):  # left by a killed run
            shutil.rmtree(partial, ignore_errors=True)
        (output_dir / "training_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    # 1. Base model (fine-tuning) and data
    base = None
    if cfg.init_from:
        base = DownscalingPipeline.from_pretrained(cfg.init_from)
        cfg.patch_size = base.config.patch_size
        cfg.prediction, cfg.interpolation = base.config.prediction, base.config.interpolation
        cfg.static_channels = list(base.config.static_channels)
        if cfg.scale_factor != base.config.scale_factor:
            raise ValueError(f"The base model is x{base.config.scale_factor}, the data is set to x{cfg.scale_factor}.")
    reg = None
    if cfg.regression_model:
        reg = load_regression_model(cfg.regression_model, base)
        if base is None:  # the diffusion stage lives in the regression model's space
            cfg.patch_size = reg.config.patch_size
            cfg.prediction, cfg.interpolation = reg.config.prediction, reg.config.interpolation
            cfg.static_channels = list(reg.config.static_channels)
    reg_unet = reg.unet if reg is not None else (base.regression_unet if base is not None else None)
    pairs, static, train, validation, data_info = load_pairs(cfg)
    stats_from = base if base is not None else reg
    stats = build_statistics(cfg, pairs, static, train, None if stats_from is None else dict(stats_from.config))
    normalizer = Normalizer.from_config({**stats, "prediction": cfg.prediction})
    variables = stats["variables"]
    fields = normalize_fields(
        pairs.high_res[variables].sel(**train), pairs.lerp(cfg.interpolation)[variables].sel(**train),
        normalizer, static,
    )
    dataset = RandomPatchDataset(fields, cfg.patch_size, seed=cfg.seed)
    val = validation_inputs(pairs, static, validation, cfg.validation_max_samples)
    logger.info("training on %d fields of %s, %d patches per epoch", fields.num_samples, fields.shape, len(dataset))
    stochastic_std = None
    if reg_unet is not None:
        reg_unet.requires_grad_(False).eval().to(accelerator.device)
        if base is not None and base.regression_unet is not None and not cfg.regression_model and not cfg.recompute_statistics:
            stochastic_std = list(base.config.stochastic_std)
        else:
            stochastic_std = regression_residual_rms(
                reg_unet, dataset, cfg.stochastic_std_batches, cfg.train_batch_size, accelerator.device)
        logger.info("two-stage model: the diffusion UNet learns the regression residual / %s", stochastic_std)
        stochastic_scale = torch.tensor(stochastic_std, device=accelerator.device).view(1, -1, 1, 1)

    # 2. Model, EMA, optimiser
    if base is not None:
        unet = base.unet
    else:
        unet = build_unet(len(variables), len(stats["static_channels"]), cfg.patch_size, cfg.unet_preset)
    unet.train()
    noise_scheduler = default_scheduler()
    ema = None
    if cfg.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, inv_gamma=1.0,
                       power=3 / 4, model_cls=UNet2DModel, model_config=unet.config)

    def save_model_hook(models, weights, out):
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(out, "unet_ema"))
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(out, "unet"))
                weights.pop()

    def load_model_hook(models, inp):
        if ema is not None:
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # EMA's own config keys are not UNet config: diffusers warns
            try:
                loaded = EMAModel.from_pretrained(os.path.join(inp, "unet_ema"), UNet2DModel)
            finally:
                dlogging.set_verbosity(level)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        for _ in range(len(models)):
            m = models.pop()
            loaded = UNet2DModel.from_pretrained(inp, subfolder="unet")
            m.register_to_config(**loaded.config)
            m.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train_batch_size, shuffle=False, num_workers=cfg.dataloader_num_workers,
        drop_last=True,
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    noise_rng = NoiseRNG(cfg.seed * 1000 + accelerator.process_index, accelerator.device)
    accelerator.register_for_checkpointing(noise_rng)
    steps_per_epoch = max(1, math.ceil(len(dataloader) / cfg.gradient_accumulation_steps))

    # 3. Resume
    global_step = 0
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            found = list_checkpoints(output_dir)
            path = found[-1][1] if found else None
        else:
            path = Path(cfg.resume_from_checkpoint)
            if not (path / COMPLETE_MARKER).exists():
                raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}).")
        if path is None:
            logger.info("no complete checkpoint in %s: starting a new run", output_dir)
        else:
            accelerator.load_state(str(path))
            global_step = int(path.name.split("-")[1])
            logger.info("resumed from %s at step %d", path, global_step)
    if accelerator.is_main_process and log_with:
        accelerator.init_trackers("dpdm", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    def pipeline_from(model) -> DownscalingPipeline:
        # DPM-Solver++ on the training schedule, never starting at t = 999 (see modeling.default_sampler)
        pipe = DownscalingPipeline(
            unet=model, scheduler=default_sampler(), **stats, scale_factor=cfg.scale_factor,
            patch_size=cfg.patch_size, prediction=cfg.prediction, interpolation=cfg.interpolation,
            objective=cfg.objective, regression_unet=reg_unet, stochastic_std=stochastic_std,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run_validation(step) -> dict:
        if val is None:
            return {}
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        try:
            metrics = validate(pipeline_from(model), val, cfg, seed=cfg.seed)
        finally:
            model.train()
            if ema is not None:
                ema.restore(model.parameters())
        logger.info("step %d validation: %s", step, metrics)
        accelerator.log(metrics, step=step)
        return metrics

    # 4. Train
    stop_at = cfg.max_train_steps if cfg.stop_after_steps is None else min(cfg.max_train_steps, global_step + cfg.stop_after_steps)
    progress = tqdm(range(cfg.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process, desc="train")
    alphas = noise_scheduler.alphas_cumprod
    samples_seen, t_loop, last_val, first_crops = 0, time.time(), {}, None
    while global_step < stop_at:
        epoch = global_step // steps_per_epoch
        dataset.set_epoch(epoch)  # fresh random crops each epoch; resumable: crops depend on (seed, epoch, i)
        skip = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            with accelerator.accumulate(unet):
                target, cond, mask = batch["target"], batch["condition"], batch["mask"].float()
                if reg_unet is not None:  # two-stage: learn what the frozen regression mean misses
                    with torch.no_grad():
                        mean = regression_forward(reg_unet, target, cond)
                    target = (target - mean.to(target.dtype)) / stochastic_scale
                if cfg.objective == "diffusion":
                    gen = noise_rng.generator
                    noise = torch.randn(target.shape, generator=gen, device=gen.device).to(target.device, target.dtype)
                    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (target.shape[0],), generator=gen,
                                      device=gen.device).to(target.device)
                    noisy = noise_scheduler.add_noise(target, noise, t)
                    pred = unet(torch.cat([noisy, cond], dim=1), t).sample
                    goal = noise
                else:  # deterministic baseline: zero noise, t = 0, predict the target itself
                    pred = regression_forward(unet, target, cond)
                    goal = target
                # L2 over valid (unmasked) points only
                loss = (F.mse_loss(pred.float(), goal.float(), reduction="none") * mask).sum() / mask.sum().clamp_min(1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            samples_seen += target.shape[0] * accelerator.num_processes
            if first_crops is None:  # which crops each process drew first: distinct data per process
                crops = torch.stack([batch["sample"], batch["y"], batch["x"]], dim=1).to(accelerator.device)
                first_crops = accelerator.gather(crops).view(accelerator.num_processes, -1, 3).tolist()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unet.parameters())
            global_step += 1
            progress.update(1)
            logs = {"loss": float(loss.detach()), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
            if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                last_val = run_validation(global_step)
            if global_step >= stop_at:
                break
    throughput = samples_seen / max(time.time() - t_loop, 1e-9)
    progress.close()

    # 5. Save the final pipeline (EMA weights) with its model card
    accelerator.wait_for_everyone()
    if global_step < cfg.max_train_steps:
        if not (cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0):
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
        logger.info("stopped at step %d of %d; continue with --resume_from_checkpoint latest", global_step, cfg.max_train_steps)
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        if not last_val:
            last_val = run_validation(global_step)
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(model.parameters())
        pipe = pipeline_from(model)
        calibration = None
        if cfg.calibrate_spread and reg_unet is not None and validation:
            from dpdm_diffusers.calibration import calibrate_spread

            low, truth, val_static = validation_inputs(pairs, static, validation, cfg.calibration_max_samples)
            calibration = calibrate_spread(pipe, low, truth, static_fields=val_static, num_members=cfg.calibration_members,
                                           num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed)
            stochastic_std = calibration["stochastic_std"]
            pipe.register_to_config(stochastic_std=stochastic_std)
            logger.info("spread calibration on the validation split: factor %.3f, CRPS %.4f -> %.4f, SSR %.2f -> %.2f",
                        calibration["factor"], calibration["crps_uncalibrated"], calibration["crps"],
                        calibration["ssr_uncalibrated"], calibration["ssr"])
        pipe.save_pretrained(output_dir, safe_serialization=True)
        wall = time.time() - t_start
        card = render_model_card(
            dict(pipe.config), title=cfg.model_card_title, base_model=cfg.init_from,
            repo_id=cfg.hub_model_id,
            summary=f"Trained with `dpdm_diffusers.training.train_dpdm` (dpdm-diffusers {__version__}), "
            f"objective `{cfg.objective}`"
            + (f", two-stage: residual diffusion on the regression model `{cfg.regression_model or cfg.init_from}`"
               f" (stochastic_std {', '.join(f'{x:.3f}' for x in stochastic_std)})." if reg_unet is not None else "."),
            sections={
                "Training data": "\n".join(f"- {k}: {v}" for k, v in data_info.items())
                + f"\n- high-res grid: {fields.shape[0]} x {fields.shape[1]}, {fields.num_samples} training fields",
                "Training procedure": "\n".join([
                    f"- steps: {global_step}, batch {cfg.train_batch_size} x {accelerator.num_processes} processes "
                    f"x {cfg.gradient_accumulation_steps} accumulation, patches {cfg.patch_size} px",
                    f"- UNet preset `{cfg.unet_preset}` ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)",
                    f"- AdamW lr {cfg.learning_rate}, {cfg.lr_scheduler} schedule, EMA {cfg.use_ema} (decay {cfg.ema_decay})",
                    f"- seed {cfg.seed}, mixed precision {cfg.mixed_precision}, wall time of this invocation {wall / 60:.1f} min",
                    f"- command: `{' '.join(sys.argv)}`",
                    "- config:\n\n```yaml\n" + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False) + "```",
                ]),
                "Validation": "\n".join(f"- {k}: {v:.4f}" for k, v in last_val.items()) or "no validation split",
                **({"Spread calibration": (
                    f"`stochastic_std` multiplied by {calibration['factor']:.3f}, the factor with the lowest fair CRPS on the "
                    f"validation split ({calibration['num_members']} members): CRPS {calibration['crps_uncalibrated']:.4f} -> "
                    f"{calibration['crps']:.4f}, spread-skill {calibration['ssr_uncalibrated']:.2f} -> {calibration['ssr']:.2f}."
                )} if calibration else {}),
            },
        )
        (output_dir / "README.md").write_text(card)
        (output_dir / "training_summary.json").write_text(json.dumps(
            {"global_step": global_step, "train_samples_per_s": throughput, "wall_time_s": wall,
             "num_processes": accelerator.num_processes, "first_crops_per_process": first_crops,
             "stochastic_std": stochastic_std,
             "spread_calibration": {k: v for k, v in calibration.items() if k != "curve"} if calibration else None,
             **last_val}, indent=2))
        if cfg.push_to_hub:
            if not cfg.hub_model_id:
                raise ValueError("--push_to_hub needs --hub_model_id.")
            pipe.push_to_hub(cfg.hub_model_id, model_card=card)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
