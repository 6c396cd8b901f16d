"""Evaluate a model on the glosea4-ts-x4 test month: the paper's Table 1 plus CRPS and spread-skill.

Runs the pipeline once with the largest ensemble asked for; the N-member scores use its first N
members (member k does not depend on the ensemble size, so this equals separate N-member runs).
Baselines: Lerp (bilinear), bicubic and, when given, a deterministic regression model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xarray as xr

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def set_scheduler(pipe, name: str):
    """Swap the pipeline's sampler by short name (``from_config`` keeps the trained noise schedule)."""
    import diffusers

    from dpdm_diffusers.pipelines.pipeline_downscaling import MIN_CLIP_RANGE

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; expected one of {tuple(SCHEDULERS)}.")
    cls = getattr(diffusers, SCHEDULERS[name])
    # few-step samplers start at t = 900, not at t = 999 where the x0 estimate blows up (modeling.default_sampler)
    kwargs = {"timestep_spacing": "leading"}
    if name == "dpmsolver++":
        kwargs["algorithm_type"] = "dpmsolver++"
    if name == "ddpm":  # all 1000 steps visit t = 999, where the x0 prediction blows up unless clipped wide
        kwargs = {"clip_sample": True, "clip_sample_range": MIN_CLIP_RANGE}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    return pipe


@dataclass
class EvaluationResult:
    table: "object"  # pandas DataFrame from metrics.score_table
    markdown: str
    members: xr.DataArray  # (member, realization, time, lat, lon)
    truth: xr.DataArray
    lerp: xr.DataArray
    land_fraction: xr.DataArray | None = None  # drawn as the 0.5 contour on maps
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def evaluate_glosea4(
    model: str,
    members: Sequence[int] = (1, 10),
    baselines: Sequence[str] = ("lerp", "bicubic"),
    regression_model: str | None = None,
    scheduler: str = "dpmsolver++",
    num_inference_steps: int = 10,
    seed: int = 0,
    max_fields: int | None = None,
    batch_size: int = 16,
    regions: Sequence[str] = ("global", "east_asia", "gulf_coast", "northern_australia"),
    progress: bool = True,
) -> EvaluationResult:
    """Score ``model`` (folder or Hub id) on the glosea4-ts-x4 test month (2012-01, 13 fields)."""
    from dpdm_diffusers import DownscalingPipeline, metrics
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.glosea4 import VARIABLE, load_glosea4_benchmark

    if not members or min(members) < 1:
        raise ValueError(f"members must be positive ensemble sizes, got {list(members)}.")
    bench = load_glosea4_benchmark()
    truth, low = bench.split("test")
    train_truth, _ = bench.split("train")
    # the benchmark's own `member` (GloSea4 realisation) would clash with the ensemble dim
    truth, low = truth.rename(member="realization"), low.rename(member="realization")
    if max_fields:
        truth, low = truth.isel(realization=slice(0, max_fields)), low.isel(realization=slice(0, max_fields))
    static = {k: bench.static[k] for k in bench.static.data_vars}

    pipe = DownscalingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=not progress)
    set_scheduler(pipe, scheduler)
    timings = {}
    t0 = time.perf_counter()
    out = pipe(
        low, static_fields=static, num_members=max(members), num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
    )
    timings["pipeline_s"] = time.perf_counter() - t0
    ens = out.members[VARIABLE]
    y = truth[VARIABLE]

    forecasts = {}
    lerp = regrid(low, bench.grid, method="bilinear")[VARIABLE]
    if "lerp" in baselines:
        forecasts["Lerp"] = lerp
    if "bicubic" in baselines:
        forecasts["Bicubic"] = regrid(low, bench.grid, method="bicubic")[VARIABLE]
    if regression_model:
        reg = DownscalingPipeline.from_pretrained(regression_model)
        reg.set_progress_bar_config(disable=True)
        forecasts["Regression UNet"] = reg(low, static_fields=static, batch_size=batch_size).mean[VARIABLE]
    member_labels = {}
    for n in sorted(set(members)):
        label = "DPDM 1 member" if n == 1 else f"DPDM {n}-member mean"
        forecasts[label] = ens.isel(member=0) if n == 1 else ens.isel(member=slice(0, n))
        member_labels[label] = n

    clim = train_truth[VARIABLE].mean(("member", "time"))
    table = metrics.score_table(y, forecasts, regions=regions, climatology=clim)
    md = metrics.to_markdown(table, units={VARIABLE: "K"})
    config = {
        "model": str(model), "regression_model": regression_model, "scheduler": scheduler,
        "num_inference_steps": num_inference_steps, "members": list(members), "seed": seed,
        "fields": int(y.sizes["realization"] * y.sizes["time"]), "benchmark": "glosea4-ts-x4 test month 2012-01",
        "member_labels": member_labels,
    }
    return EvaluationResult(table=table, markdown=md, members=ens, truth=y, lerp=lerp, timings=timings, config=config,
                            land_fraction=bench.static["land_sea_mask"] if "land_sea_mask" in bench.static else None)


def write_report(result: EvaluationResult, out_dir: str | Path, name: str = "quality_glosea4", command: str = "") -> dict:
    """Markdown + JSON tables and PNG figures (maps, skill vs members, power spectra)."""
    import platform

    from dpdm_diffusers import metrics, plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    header = (
        f"# {name}\n\n{result.config['benchmark']}, {result.config['fields']} fields, global and per region; "
        f"K. Sampler `{result.config['scheduler']}` with {result.config['num_inference_steps']} steps, seed "
        f"{result.config['seed']}.\n\nMetrics per cell: RMSE / ACC / SSIM / PSNR / CRPS / SSR / ACC_train. "
        "ACC uses anomalies against the mean of the 13 test-month truth fields (member-to-member); ACC_train "
        "against the Aug-Nov training climatology (mostly seasonal cycle, so near 1 for every method). SSIM and "
        "PSNR use the per-field max - min of the truth inside each region as data range. CRPS is the fair "
        "ensemble CRPS (equal to MAE for deterministic methods); SSR = spread / RMSE of the mean.\n\n"
        f"Command: `{command}`\n\nMachine: {machine}; pipeline wall time {result.timings.get('pipeline_s', 0):.1f} s.\n\n"
    )
    (out / f"{name}.md").write_text(header + result.markdown + "\n")
    records = result.table.to_dict(orient="records")
    from dpdm_diffusers.io import portable_path

    (out / f"{name}.json").write_text(json.dumps({"config": portable_path(result.config), "timings": result.timings,
                                                  "machine": machine, "command": command, "scores": records}, indent=2))
    figs = {}
    r, t = 0, 0
    ens = result.members
    one = dict(realization=r, time=t)
    figs["maps"] = plots.plot_maps(
        result.truth.isel(one), result.lerp.isel(one), ens.isel(member=0, **one), ens.isel(**one).mean("member"),
        ens.isel(**one).std("member", ddof=1) if ens.sizes["member"] > 1 else None,
        out / f"{name}_maps.png", title="GloSea4 surface temperature, 2012-01, realization 0", units="K",
        land_fraction=result.land_fraction,
    )
    glob = result.table[result.table["region"] == "global"]
    labels = result.config["member_labels"]
    curve = glob[glob["method"].isin(list(labels))].assign(members=lambda d: d["method"].map(labels))
    curve = curve[curve["metric"].isin(["RMSE", "ACC", "SSIM", "PSNR", "CRPS", "SSR"])]
    refs = {
        m: {r["metric"]: r["value"] for r in glob[glob["method"] == m].to_dict(orient="records")}
        for m in glob["method"].unique() if m not in labels
    }
    figs["skill"] = plots.plot_skill_vs_members(curve, out / f"{name}_skill_vs_members.png", baselines=refs)
    spectra = {
        "Truth": metrics.power_spectrum(result.truth.isel(one)),
        "Lerp": metrics.power_spectrum(result.lerp.isel(one)),
        "One member": metrics.power_spectrum(ens.isel(member=0, **one)),
        "Ensemble mean": metrics.power_spectrum(ens.isel(**one).mean("member")),
    }
    figs["spectra"] = plots.plot_power_spectra(spectra, out / f"{name}_spectra.png", title="Radially averaged power spectrum")
    return {k: str(v) for k, v in figs.items()}
