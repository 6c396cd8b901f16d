# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""The models of a training run: the base model, the frozen regression mean of a two-stage model, the pipeline
assembled from the trained UNet, its spread calibration, and the two-stage fine-tuning recipe.

A two-stage (CorrDiff) model is a regression UNet that predicts the mean plus a diffusion UNet that generates
what the mean misses, divided by its RMS (``stochastic_std``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "build_pipeline",
    "calibrate",
    "finetune_two_stage",
    "load_base_models",
    "load_regression_model",
    "regression_forward",
    "regression_residual_rms",
    "residual_scale",
]

logger = logging.getLogger("dpdm_diffusers.training")


def load_regression_model(path: str, base=None):
    """The frozen mean model of a two-stage run.

    Args:
        path: A regression pipeline folder or Hub id.
        base: The base pipeline when fine-tuning: both must share one data layout.

    Raises:
        ValueError: The model is not a regression model, or its data layout differs from ``base``'s.
    """
    from dpdm_diffusers import DownscalingPipeline

    reg = DownscalingPipeline.from_pretrained(path)
    if reg.config.objective != "regression":
        raise ValueError(f"--regression_model {path} has objective {reg.config.objective!r}; train it with "
                         "--objective regression.")
    if base is not None:
        keys = ("variables", "static_channels", "scale_factor", "patch_size", "prediction", "interpolation")
        diff = [k for k in keys if list(np.atleast_1d(base.config[k])) != list(np.atleast_1d(reg.config[k]))]
        if diff:
            raise ValueError(f"--regression_model {path} and --init_from differ in {diff}; they must share one data "
                             "layout.")
    return reg


def load_base_models(cfg):
    """The base pipeline (fine-tuning) and the regression pipeline of a two-stage run, each ``None`` if absent.

    Fine-tuning a two-stage model with ``objective="regression"`` fine-tunes its first stage (its mean): the base
    is then that stage alone.
    """
    from dpdm_diffusers import DownscalingPipeline

    base = None
    if cfg.init_from:
        base = DownscalingPipeline.from_pretrained(cfg.init_from)
        if cfg.objective == "regression" and base.regression_unet is not None:
            base = base.regression_pipeline()
    reg = load_regression_model(cfg.regression_model, base) if cfg.regression_model else None
    return base, reg


def regression_forward(unet, target, cond):
    """A regression UNet's prediction: one pass at t = 0 on zero noise (how the pipeline runs it too)."""
    t0 = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    return unet(torch.cat([torch.zeros_like(target), cond], dim=1), t0).sample


@torch.no_grad()
def regression_residual_rms(reg_unet, dataset, num_batches: int, batch_size: int, device) -> list[float]:
    """Per-variable RMS of (model-space target - regression prediction) over training patches.

    This is the scale of what the diffusion stage generates. Deterministic (epoch-0 crops), so a resumed run gets
    the same; points outside the loss mask (missing values, a validation box) do not count.
    """
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    sq, n = None, None
    for _, batch in zip(range(num_batches), loader):
        target, cond = batch["target"].to(device), batch["condition"].to(device)
        mask = batch["mask"].float().to(device)
        mean = regression_forward(reg_unet, target, cond)
        err = (target - mean.float()) ** 2 * mask
        sq = err.sum((0, 2, 3)) if sq is None else sq + err.sum((0, 2, 3))
        n = mask.sum((0, 2, 3)) if n is None else n + mask.sum((0, 2, 3))
    return [float(x) for x in (sq / n.clamp_min(1)).sqrt().cpu()]


def residual_scale(cfg, base, reg_unet, dataset, device) -> list[float]:
    """The ``stochastic_std`` the diffusion stage learns in units of: the base model's when fine-tuning keeps its
    statistics and regression stage, else measured on the training patches."""
    keep = (base is not None and base.regression_unet is not None and not cfg.regression_model
            and not cfg.recompute_statistics)
    if keep:
        std = list(base.config.stochastic_std)
    else:
        std = regression_residual_rms(reg_unet, dataset, cfg.stochastic_std_batches, cfg.train_batch_size, device)
    logger.info("two-stage model: the diffusion UNet learns the regression residual / %s", std)
    return std


def build_pipeline(unet, cfg, stats: dict, regression_unet=None, stochastic_std=None):
    """A ``DownscalingPipeline`` around a trained UNet, sampling with DPM-Solver++ on the training schedule, never
    starting at t = 999 (see ``modeling.default_sampler``)."""
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.modeling import default_sampler

    pipe = DownscalingPipeline(
        unet=unet, scheduler=default_sampler(), **stats, scale_factor=cfg.scale_factor, patch_size=cfg.patch_size,
        prediction=cfg.prediction, interpolation=cfg.interpolation, objective=cfg.objective,
        regression_unet=regression_unet, stochastic_std=stochastic_std,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibrate(pipe, region, cfg) -> dict:
    """Scale a two-stage pipeline's ``stochastic_std`` on the validation split (registered on ``pipe``).

    Returns:
        :func:`dpdm_diffusers.calibration.calibrate_spread`'s result.
    """
    from dpdm_diffusers.calibration import calibrate_spread
    from dpdm_diffusers.user_data import validation_inputs

    low, truth, static = validation_inputs(region, cfg.calibration_max_samples)
    calibration = calibrate_spread(pipe, low, truth, static_fields=static, num_members=cfg.calibration_members,
                                   num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed,
                                   target=cfg.calibration_target)
    pipe.register_to_config(stochastic_std=calibration["stochastic_std"])
    for v, r in calibration["per_variable"].items():
        logger.info("spread calibration of %s on the validation split: factor %.3f, CRPS %.4g -> %.4g, SSR %.2f -> "
                    "%.2f%s", v, r["factor"], r["crps_uncalibrated"], r["crps"], r["ssr_uncalibrated"], r["ssr"],
                    " (at the edge of the search)" if r["at_edge"] else "")
    return calibration


MIN_PERSISTENCE_STEPS = 10  # fewer time steps cannot tell a lag-1 autocorrelation from noise


def measure_noise_time_correlation(pipe, region, max_fields: int = 400) -> dict | None:
    """The persistence of the truth's fine-scale residual on the training split: the lag-1 autocorrelation in time
    (detrended, per point, mean over points and variables) of truth minus the regression stage's mean, in units of
    each variable's transform. Registered as the pipeline's ``noise_time_correlation`` (clipped to 0..0.95) with its
    ``noise_time_unit``, so that members keep the truth's step-to-step persistence (benchmarks/climate_signal.py).

    Returns ``{"noise_time_correlation", "noise_time_unit", "measured"}``, or ``None`` (nothing registered) when the
    training split has no regular time axis of at least :data:`MIN_PERSISTENCE_STEPS` steps along a single
    series (e.g. a few months of an ensemble)."""
    from dpdm_diffusers.climate_scores import lag1_autocorrelation
    from dpdm_diffusers.seeding import MAX_TIME_CORRELATION, infer_time_unit
    from dpdm_diffusers.transforms import forward_transform

    pairs = region.pairs.sel(**region.train) if region.train else region.pairs
    truth, low = pairs.high_res[list(pipe.config.variables)], pairs.low_res
    if "time" not in truth.dims or truth.sizes["time"] < MIN_PERSISTENCE_STEPS or truth.sizes["time"] > max_fields:
        return None
    try:
        unit = infer_time_unit(truth["time"].values[:2])
    except ValueError:
        return None
    mean = pipe.regression_pipeline()(low.load(), static_fields=region.static).mean
    values = []
    for v, transform in zip(pipe.config.variables, pipe.config.transforms):
        residual = forward_transform(truth[v].load(), transform) - forward_transform(mean[v], transform)
        values.append(float(lag1_autocorrelation(residual, annual=False).mean()))
    measured = float(np.nanmean(values))
    rho = round(float(np.clip(measured, 0.0, MAX_TIME_CORRELATION)), 2)
    pipe.register_to_config(noise_time_correlation=rho, noise_time_unit=unit)
    logger.info("fine-scale residual persistence on the training split: lag-1 autocorrelation %.3f per %s -> "
                "noise_time_correlation %.2f", measured, unit, rho)
    return {"noise_time_correlation": rho, "noise_time_unit": unit, "measured": measured}


def finetune_two_stage(cfg, train: Callable[..., Path]) -> Path:
    """Fine-tune both stages of a two-stage model on new data, in one run that resumes like any other.

    1. Stage 1: the base's regression UNet (the mean, which carries most of the skill) is fine-tuned with the
       regression objective for ``regression_steps`` steps into ``output_dir/stage1-regression``.
    2. Stage 2: the base's diffusion UNet is fine-tuned on the residual of that *new* regression, with
       ``stochastic_std`` re-estimated from it, then the spread is calibrated on the validation split.

    A finished stage 1 (its folder holds ``model_index.json``) is not trained again on rerun.

    Args:
        cfg: The resolved config of the whole run (``init_from`` a two-stage model).
        train: Runs one stage: ``train(cfg, base_kind)`` (:func:`dpdm_diffusers.training.train_dpdm.train`).

    Returns:
        The output folder: the fine-tuned pipeline's, or stage 1's when stopped early (``stop_after_steps``).
    """
    from accelerate import PartialState

    out = Path(cfg.output_dir)
    stage1 = out / "stage1-regression"
    resume = cfg.resume_from_checkpoint
    in_stage1 = resume not in (None, "latest") and Path(resume).resolve().parent == stage1.resolve()
    if not (stage1 / "model_index.json").exists():
        cfg1 = dataclasses.replace(
            cfg, objective="regression", output_dir=str(stage1),
            max_train_steps=cfg.regression_steps or cfg.max_train_steps, calibrate_spread=False,
            regression_steps=None, push_to_hub=False,
            resume_from_checkpoint=resume if (in_stage1 or resume == "latest") else None,
            model_card_title=f"{cfg.model_card_title} (stage 1: regression mean)",
        )
        train(cfg1, "two-stage")
        PartialState().wait_for_everyone()
        if not (stage1 / "model_index.json").exists():  # stopped early (--stop_after_steps): resume later
            return stage1
    else:
        logger.info("stage 1 (regression) is complete in %s; fine-tuning stage 2", stage1)
    cfg2 = dataclasses.replace(
        cfg, regression_model=str(stage1), recompute_statistics=False, regression_steps=None,
        resume_from_checkpoint=None if in_stage1 else resume,
    )
    return train(cfg2, "two-stage")
