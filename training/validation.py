# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Validation of a training run through the real pipeline, scored with :mod:`dpdm_diffusers.metrics`."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

__all__ = ["validate"]

FORECASTS = ("mean", "lerp", "member0")


def _pooled_rmse(forecast: xr.Dataset, truth: xr.Dataset, scale: dict) -> float:
    """RMSE over every point of every variable, each variable divided by ``scale[variable]`` first."""
    from dpdm_diffusers.metrics import rmse

    variables = list(scale)
    f = xr.concat([forecast[v] / scale[v] for v in variables], dim="variable")
    y = xr.concat([truth[v] / scale[v] for v in variables], dim="variable")
    return float(rmse(f, y))


def validate(pipe, val, cfg, seed: int) -> dict:
    """Score the ensemble mean, one member and the interpolated input against the truth.

    Missing truth points are left out (``metrics.rmse`` skips NaN); missing inputs are masked by the pipeline.

    Args:
        pipe: The pipeline to score (EMA weights, when the run keeps them).
        val: ``(low_res, truth, static)`` of a few validation samples
            (:func:`dpdm_diffusers.user_data.validation_inputs`).
        cfg: The run's config (``validation_members``, ``validation_inference_steps``).
        seed: Seed of the ensemble.

    Returns:
        ``val_rmse_mean``, ``val_rmse_member0``, ``val_rmse_lerp`` (the model's own interpolation) and
        ``val_rmse_ratio`` (mean / lerp). With one variable they are in its units. With several, the pooled keys
        are in units of each variable's standard deviation over the validation truth (its squared errors divided by
        its variance before pooling, so that no variable dominates by its units, e.g. surface pressure in Pa), and ``val_rmse_<name>/<variable>``
        gives each variable's scores in its own units.
    """
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.metrics import rmse

    low, truth, static = val
    variables = list(pipe.config.variables)
    gaps = any(bool(np.isnan(low[v].values).any()) for v in variables)
    out = pipe(
        low, static_fields=static, num_members=cfg.validation_members, nan_policy="mask" if gaps else "raise",
        num_inference_steps=cfg.validation_inference_steps, generator=torch.Generator().manual_seed(seed),
    )
    forecasts = {
        "mean": out.mean,
        "lerp": regrid(low[variables], Grid.from_xarray(truth), method=pipe.config.interpolation),
        "member0": out.members.isel(member=0),
    }
    per_variable = {v: {name: float(rmse(f[v], truth[v])) for name, f in forecasts.items()} for v in variables}
    if len(variables) == 1:
        pooled = per_variable[variables[0]]
    else:
        # each variable's RMSE in units of the truth's own spread, so Pa do not outweigh K and mm
        scale = {v: float(truth[v].std()) or 1.0 for v in variables}
        pooled = {name: _pooled_rmse(f, truth, scale) for name, f in forecasts.items()}

    def with_ratio(scores: dict) -> dict:
        ratio = scores["mean"] / scores["lerp"] if scores["lerp"] > 0 else float("nan")
        return {**scores, "ratio": ratio}

    out_scores = {f"val_rmse_{name}": value for name, value in with_ratio(pooled).items()}
    if len(variables) > 1:
        for v, scores in per_variable.items():
            out_scores.update({f"val_rmse_{name}/{v}": value for name, value in with_ratio(scores).items()})
    return out_scores
