"""Spread calibration of two-stage pipelines on held-out data.

A two-stage pipeline's members are ``mean + stochastic_std * z`` in model space (``z`` from the
diffusion UNet), so multiplying ``stochastic_std`` by ``k`` moves every member's deviation from the
regression mean by exactly ``k`` in transformed space. Training sets ``stochastic_std`` to the RMS of the
regression's error on *training* patches; on held-out data the regression errs more (e.g. an unseen
season), so the ensemble comes out under-dispersed. :func:`calibrate_spread` picks the ``k`` with the
lowest fair CRPS (a proper score, so it rewards calibration and sharpness together) on validation data,
from one ensemble run: the members for every ``k`` are rebuilt from that run, nothing is sampled again.
Calibrate on a validation split, never on the test data you report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from dpdm_diffusers import metrics
from dpdm_diffusers.transforms import forward_transform, inverse_transform

DEFAULT_FACTORS = tuple(np.round(np.geomspace(0.5, 4.0, 31), 4))
TARGETS = ("ssr", "crps")
MAX_WIDENING = 8  # rounds of widening a pinned search: x2^8 (about 0.002 .. 1000 from the default range)


def _as_dataset(obj, variables) -> xr.Dataset:
    return obj.to_dataset(name=variables[0]) if isinstance(obj, xr.DataArray) else obj


def calibrate_spread(
    pipe,
    low_res,
    truth,
    static_fields=None,
    num_members: int = 8,
    num_inference_steps: int = 10,
    seed: int = 0,
    tiles_per_call: int = 32,
    factors: Sequence[float] = DEFAULT_FACTORS,
    member_dim: str = "member",
    target: str = "ssr",
    target_ssr: float = 1.0,
) -> dict:
    """Find the factor for ``pipe.config.stochastic_std`` that minimises the fair CRPS on ``truth``
    (``target="crps"``), or that brings the spread-skill ratio closest to 1 (``target="ssr"``).

    The two differ when the ensemble's spread is not where its errors are: the CRPS then prefers a narrower
    ensemble (spread-skill below 1) on the validation data. Under a distribution shift (a warmer climate than
    the validation years) errors grow and a narrow ensemble becomes over-confident, so ``"ssr"`` is the more
    robust choice there (measured in benchmarks/results/regions.md).

    Args:
        pipe: a two-stage :class:`DownscalingPipeline` (with a ``regression_unet``).
        low_res, static_fields: inputs as for the pipeline call (xarray with lat/lon and batch dims).
        truth: the high-res truth (xarray with the model's variables) on the pipeline's output grid.
        factors: candidate multipliers of the current ``stochastic_std``.
        target_ssr: the spread-skill ratio aimed at with ``target="ssr"``. 1 on held-out data; another value
            carries a calibration measured elsewhere to data the model was trained on
            (:func:`transfer_spread`).

    Each variable gets its own factor; a search whose best factor is at an edge widens its range rather than
    pin there, and warns (``pinned``) if it still is.

    Returns a dict with ``factors`` (per variable; ``factor`` is their geometric mean), the new ``stochastic_std``,
    ``crps``/``ssr`` before and after (pooled over variables in units of each one's spread over the truth),
    ``per_variable`` scores in each variable's own units with their search ``curve``, and ``curve`` (one variable).
    The pipeline is not changed: apply with ``pipe.register_to_config(stochastic_std=result["stochastic_std"])``.
    """
    if pipe.regression_unet is None:
        raise ValueError("calibrate_spread needs a two-stage pipeline (with a regression_unet): the spread of a "
                         "plain diffusion model is not a separate scale.")
    cfg = pipe.config
    variables, transforms = list(cfg.variables), list(cfg.transforms)
    if target not in TARGETS:
        raise ValueError(f"Unknown calibration target {target!r}; use one of {TARGETS}.")
    if target == "ssr" and not target_ssr > 0:
        raise ValueError(f"target_ssr must be positive, got {target_ssr}.")
    out = pipe(low_res, static_fields=static_fields, num_members=num_members, num_inference_steps=num_inference_steps,
               generator=torch.Generator().manual_seed(seed), tiles_per_call=tiles_per_call, member_dim=member_dim)
    center = pipe.regression_pipeline()(low_res, static_fields=static_fields, tiles_per_call=tiles_per_call).mean
    members, center, truth = (_as_dataset(x, variables) for x in (out.members, center, truth))

    def to_t(da, name):  # physical -> transformed space, where members are linear in the factor
        return forward_transform(torch.from_numpy(np.asarray(da.values, dtype=np.float64)), name).numpy()

    spaces = {v: (to_t(members[v], t), to_t(center[v], t)) for v, t in zip(variables, transforms)}

    def score(v, t, k) -> dict:
        m, c = spaces[v]
        ens = members[v].copy(data=inverse_transform(torch.from_numpy(c + k * (m - c)), t).numpy().astype(np.float32))
        return {"factor": float(k), "crps": float(metrics.crps(ens, truth[v], members_dim=member_dim)),
                "ssr": float(metrics.spread_skill_ratio(ens, truth[v], members_dim=member_dim))}

    def pick(curve):
        if target == "crps":
            return min(curve, key=lambda r: r["crps"])
        return min(curve, key=lambda r: abs(np.log(r["ssr"] / target_ssr)) if r["ssr"] > 0 else np.inf)

    # each variable its own factor (members are linear in it per variable); a best factor at the edge of the range
    # widens the range (x2 per round, up to MAX_WIDENING) instead of silently pinning there
    per_variable, pinned = {}, []
    for v, t in zip(variables, transforms):
        grid = sorted(float(k) for k in factors)
        curve = [score(v, t, k) for k in grid]
        for _ in range(MAX_WIDENING if len(grid) > 1 else 0):
            best = pick(curve)
            if best["factor"] == grid[0]:
                extra = [grid[0] * f for f in (0.5, 0.7071)]
            elif best["factor"] == grid[-1]:
                extra = [grid[-1] * f for f in (1.4142, 2.0)]
            else:
                break
            curve = sorted(curve + [score(v, t, k) for k in extra], key=lambda r: r["factor"])
            grid = [r["factor"] for r in curve]
        best, one = pick(curve), min(curve, key=lambda r: abs(r["factor"] - 1.0))
        at_edge = len(grid) > 1 and best["factor"] in (grid[0], grid[-1])
        if at_edge:
            pinned.append(v)
        per_variable[v] = {"factor": best["factor"], "crps": best["crps"], "ssr": best["ssr"],
                          "crps_uncalibrated": one["crps"], "ssr_uncalibrated": one["ssr"], "at_edge": at_edge,
                          "curve": curve}
    if pinned:
        import warnings

        warnings.warn(f"The spread factor of {pinned} is at the edge of the searched range even after widening it to "
                      f"{[per_variable[v]['factor'] for v in pinned]}: the spread cannot be calibrated there (is the "
                      "ensemble collapsed, or the validation data unlike the training data?).", stacklevel=2)
    # pooled over variables: CRPS in units of each variable's spread over the truth, so no unit dominates
    scale = {v: (float(truth[v].std()) or 1.0) if len(variables) > 1 else 1.0 for v in variables}

    def pooled(key):
        if key.startswith("crps"):
            return float(np.mean([per_variable[v][key] / scale[v] for v in variables]))
        return float(np.mean([per_variable[v][key] for v in variables]))

    chosen = [per_variable[v]["factor"] for v in variables]
    return {
        "factor": float(np.exp(np.mean(np.log(chosen)))),  # the geometric mean: one number for a log line
        "factors": dict(zip(variables, chosen)),
        "stochastic_std": [float(s) * k for s, k in zip(cfg.stochastic_std, chosen)],
        "crps": pooled("crps"), "ssr": pooled("ssr"), "crps_uncalibrated": pooled("crps_uncalibrated"),
        "ssr_uncalibrated": pooled("ssr_uncalibrated"), "per_variable": per_variable, "pinned": pinned,
        "num_members": num_members, "num_inference_steps": num_inference_steps, "target": target,
        "target_ssr": target_ssr if target == "ssr" else None,
        "curve": per_variable[variables[0]]["curve"] if len(variables) == 1 else None,
    }


def transfer_spread(pipe_a, a_in_sample, pipe_b, b_in_sample, **kwargs) -> dict:
    """Calibrate a refit model B on data it was trained on, borrowing the in-sample spread-skill of model A.

    The recipe for a refit that keeps no held-out data: model A (the same recipe on fewer months) was calibrated
    on held-out data (spread-skill 1 there). On its own *training* data A's spread-skill then reads ``s``, usually
    not 1: in-sample, the regression stage errs less and the diffusion stage has learnt how little it errs.
    B is scaled so that its spread-skill on its own training data is the same ``s``. Pick months in the same
    relation to each model's held-out month (e.g. each model's last training month).

    Args:
        pipe_a: model A, its ``stochastic_std`` already calibrated on held-out data.
        a_in_sample, b_in_sample: ``(low_res, truth, static_fields)`` from each model's training data.
        kwargs: passed to :func:`calibrate_spread` (``num_members``, ``num_inference_steps``, ``seed``, ...).

    Returns :func:`calibrate_spread`'s dict for B, plus ``reference_ssr`` (A's in-sample spread-skill).
    """
    low_a, truth_a, static_a = a_in_sample
    ref = calibrate_spread(pipe_a, low_a, truth_a, static_fields=static_a, factors=(1.0,), target="ssr", **kwargs)
    low_b, truth_b, static_b = b_in_sample
    res = calibrate_spread(pipe_b, low_b, truth_b, static_fields=static_b, target="ssr", target_ssr=ref["ssr"], **kwargs)
    return {**res, "reference_ssr": ref["ssr"], "reference_crps": ref["crps"]}


def write_stochastic_std(folder, stochastic_std: Sequence[float]) -> Path:
    """Store a calibrated ``stochastic_std`` in a local pipeline folder's ``model_index.json``, atomically (the
    folder is never left with a half-written config). Returns the file's path."""
    index = Path(folder) / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} is not a local pipeline folder (no model_index.json).")
    cfg = json.loads(index.read_text())
    cfg["stochastic_std"] = [float(x) for x in stochastic_std]
    tmp = index.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index)
    return index
