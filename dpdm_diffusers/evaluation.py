"""Evaluate a model on the glosea4-ts-x4 test month: the paper's Table 1 plus CRPS and spread-skill.

Runs the pipeline once with the largest ensemble asked for; the N-member scores use its first N
members (member k does not depend on the ensemble size, so this equals separate N-member runs).
Baselines: Lerp (bilinear), bicubic, both corrected by a 6.5 K/km lapse rate with the sub-grid topography
(:func:`dpdm_diffusers.baselines.lapse_rate_baseline`) and, when given, a deterministic regression model.

The benchmark's low-res input is the 4 x 4 block mean of the truth (:func:`dpdm_diffusers.glosea4.load_glosea4_benchmark`
builds it with :func:`dpdm_diffusers.data.coarsen`), so ``conservation=True`` also scores every DPDM row, Lerp,
Lerp + lapse rate and the regression model after :func:`dpdm_diffusers.conservation.conserve` (each member's
4 x 4 block means set to the input's; the L2 projection onto fields consistent with the input).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; expected one of {tuple(SCHEDULERS)}.")
    cls = getattr(diffusers, SCHEDULERS[name])
    # the model's config carries its schedule (ending at t = 959, modeling.NUM_TRAIN_TIMESTEPS) and `leading` spacing
    kwargs = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    return pipe


#: Deterministic baselines of :func:`evaluate_glosea4` by name, with their row labels.
BASELINES = {
    "lerp": "Lerp",
    "bicubic": "Bicubic",
    "lerp_lapse": "Lerp + lapse rate",
    "bicubic_lapse": "Bicubic + lapse rate",
}
CONSERVED = " + conservation"  # suffix of the rows scored after conservation
REGRESSION = "Regression UNet"


def member_label(n: int, conserved: bool = False) -> str:
    """Row label of the DPDM ensemble of ``n`` members ("DPDM 10-member mean + conservation")."""
    label = "DPDM 1 member" if n == 1 else f"DPDM {n}-member mean"
    return label + CONSERVED if conserved else label


@dataclass
class EvaluationResult:
    table: object  # pandas DataFrame from metrics.score_table
    markdown: str
    members: xr.DataArray  # (member, realization, time, lat, lon)
    truth: xr.DataArray
    lerp: xr.DataArray
    land_fraction: xr.DataArray | None = None  # drawn as the 0.5 contour on maps
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    conserved_members: xr.DataArray | None = None  # members after conservation (conservation=True)
    rank_histograms: dict = field(default_factory=dict)  # label -> rank_histogram_summary(), global region
    extremes: object = None  # climate_scores.score of climate_scores.EXTREMES, global region


def rank_histogram_summary(members: xr.DataArray, truth: xr.DataArray, seed: int = 0) -> dict:
    """Rank histogram of ``truth`` among ``members`` pooled over all points and fields, with its flatness.

    Returns ``members`` (M), ``counts`` (M + 1 bins), ``reliability_index`` (:func:`metrics.reliability_index`,
    0 = flat), ``outside_fraction`` (truths outside the ensemble range) and ``outside_expected`` = 2 / (M + 1).
    """
    from dpdm_diffusers import metrics

    hist = metrics.rank_histogram(members, truth, seed=seed)
    m = members.sizes["member"]
    return {
        "members": int(m), "counts": [int(c) for c in hist.values],
        "reliability_index": float(metrics.reliability_index(hist)),
        "outside_fraction": float(metrics.outside_fraction(hist)), "outside_expected": 2.0 / (m + 1),
    }


def rank_histogram_markdown(histograms: dict) -> str:
    """The report's rank-histogram section: the flatness formula, then one line per ensemble."""
    if not histograms:
        return ""
    lines = [
        "**Rank histograms** (global; rank of the truth among the M members at every grid point of every field, "
        "M + 1 bins). Flatness: reliability index RI = sum_k |n_k / N - 1 / (M + 1)| over the bins k = 0..M "
        "(Delle Monache et al. 2006; 0 = flat, about 2 = every truth in one bin; a U shape, i.e. too little "
        "spread, and a dome, too much, both score above 0); outside = (n_0 + n_M) / N, the fraction of truths "
        "outside the ensemble's range, against 2 / (M + 1) for a calibrated ensemble. Bins are shown as "
        "n_k / (N / (M + 1)), 1 = flat.",
        "",
    ]
    for label, h in histograms.items():
        n = sum(h["counts"])
        rel = " ".join(f"{c * len(h['counts']) / n:.2f}" for c in h["counts"]) if n else "–"
        lines.append(f"- {label}: RI {h['reliability_index']:.3f}, outside {h['outside_fraction']:.3f} "
                     f"(calibrated: {h['outside_expected']:.3f}); bins / flat: {rel}")
    return "\n".join(lines) + "\n"


def evaluate_glosea4(
    model: str,
    members: Sequence[int] = (1, 10),
    baselines: Sequence[str] = tuple(BASELINES),
    regression_model: str | None = None,
    scheduler: str = "dpmsolver++",
    num_inference_steps: int = 10,
    seed: int = 0,
    max_fields: int | None = None,
    tiles_per_call: int = 16,
    regions: Sequence[str] = ("global", "east_asia", "gulf_coast", "northern_australia"),
    conservation: bool = True,
    progress: bool = True,
    few_step: int | None = None,
    few_step_spread: float = 1.0,
) -> EvaluationResult:
    """Score ``model`` (folder or Hub id) on the glosea4-ts-x4 test month (2012-01, 13 fields).

    ``baselines``: names in :data:`BASELINES`. ``conservation``: also score the rows ``... + conservation``
    (module docs). The result carries the global rank histogram of the largest ensemble (and of its
    conserved version) when it has at least two members. ``few_step``: also sample the largest ensemble with
    that many steps, its ``stochastic_std`` times ``few_step_spread`` (the factor calibrated for that step count
    relative to ``num_inference_steps``, e.g. from benchmarks/samplers.py), as the rows "..., N steps".
    """
    if not members or min(members) < 1:
        raise ValueError(f"members must be positive ensemble sizes, got {list(members)}.")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"Unknown baselines {unknown}; expected names from {tuple(BASELINES)}.")
    from dpdm_diffusers import DownscalingPipeline, metrics
    from dpdm_diffusers.baselines import lapse_rate_baseline
    from dpdm_diffusers.conservation import conserve_dataarray
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.glosea4 import SCALE_FACTOR, VARIABLE, load_glosea4_benchmark

    bench = load_glosea4_benchmark()
    truth, low = bench.split("test")
    train_truth, _ = bench.split("train")
    if max_fields:
        truth, low = (x.isel(realization=slice(0, max_fields)) for x in (truth, low))
    static = bench.static

    pipe = DownscalingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=not progress)
    set_scheduler(pipe, scheduler)
    timings = {}
    t0 = time.perf_counter()
    out = pipe(
        low, static_fields=static, num_members=max(members), num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed), tiles_per_call=tiles_per_call,
    )
    timings["pipeline_s"] = time.perf_counter() - t0
    ens = out.members[VARIABLE]
    y = truth[VARIABLE]

    forecasts = {}
    lerp = regrid(low, bench.grid, method="bilinear")[VARIABLE]
    for name in (b for b in BASELINES if b in baselines):
        method = "bicubic" if name.startswith("bicubic") else "bilinear"
        if name.endswith("_lapse"):
            fc = lapse_rate_baseline(low[VARIABLE], bench.static["topography"], SCALE_FACTOR, interpolation=method)
        else:
            fc = lerp if method == "bilinear" else regrid(low, bench.grid, method=method)[VARIABLE]
        forecasts[BASELINES[name]] = fc
    if regression_model:
        reg = DownscalingPipeline.from_pretrained(regression_model)
        reg.set_progress_bar_config(disable=True)
        forecasts[REGRESSION] = reg(low, static_fields=static, tiles_per_call=tiles_per_call).mean[VARIABLE]
    member_labels = {member_label(n): n for n in sorted(set(members))}
    forecasts.update(ensemble_forecasts(ens, members))
    few = None
    if few_step:
        if pipe.regression_unet is None and few_step_spread != 1.0:
            raise ValueError("few_step_spread scales a two-stage model's stochastic_std; this model has none.")
        few_pipe = pipe.with_config(stochastic_std=[float(x) * few_step_spread for x in pipe.config.stochastic_std])
        t0 = time.perf_counter()
        few = few_pipe(low, static_fields=static, num_members=max(members), num_inference_steps=few_step,
                       generator=torch.Generator().manual_seed(seed), tiles_per_call=tiles_per_call).members[VARIABLE]
        timings["few_step_pipeline_s"] = time.perf_counter() - t0
        forecasts[few_step_label(max(members), few_step)] = few

    conserved = None
    conserved_labels = {}
    if conservation:
        # the input is the 4x4 block mean of the truth (glosea4.load_glosea4_benchmark), so conserve applies
        t0 = time.perf_counter()
        conserved = conserve_dataarray(ens, low[VARIABLE], SCALE_FACTOR)
        for name in (BASELINES["lerp"], BASELINES["lerp_lapse"], REGRESSION):
            if name in forecasts:
                forecasts[name + CONSERVED] = conserve_dataarray(forecasts[name], low[VARIABLE], SCALE_FACTOR)
        timings["conservation_s"] = time.perf_counter() - t0
        conserved_labels = {member_label(n, True): n for n in sorted(set(members))}
        forecasts.update(ensemble_forecasts(conserved, members, conserved=True))
        if few is not None:
            forecasts[few_step_label(max(members), few_step) + CONSERVED] = conserve_dataarray(few, low[VARIABLE], SCALE_FACTOR)

    histograms = {}  # of the largest ensemble (the pipeline ran with max(members) members)
    if max(members) > 1:
        for ensemble, suffix in ((ens, ""), (conserved, CONSERVED)):
            if ensemble is not None:
                histograms[f"DPDM {max(members)} members{suffix}"] = rank_histogram_summary(ensemble, y, seed=seed)

    clim = train_truth[VARIABLE].mean(("realization", "time"))
    table = metrics.score_table(y, forecasts, regions=regions, climatology=clim)
    from dpdm_diffusers import climate_scores

    t0 = time.perf_counter()
    extremes = climate_scores.score(y.to_dataset(name=VARIABLE), {k: f.to_dataset(name=VARIABLE) for k, f in
                                                                  forecasts.items()}, climate_scores.EXTREMES)
    timings["extremes_s"] = time.perf_counter() - t0
    md = metrics.to_markdown(table, units={VARIABLE: "K"})
    config = {
        "model": str(model), "regression_model": regression_model, "scheduler": scheduler,
        "num_inference_steps": num_inference_steps, "members": list(members), "seed": seed,
        "fields": int(y.sizes["realization"] * y.sizes["time"]), "benchmark": "glosea4-ts-x4 test month 2012-01",
        "member_labels": member_labels, "conserved_member_labels": conserved_labels,
        "baselines": [b for b in BASELINES if b in baselines], "conservation": bool(conservation),
        "few_step": few_step, "few_step_spread": few_step_spread if few_step else None,
    }
    return EvaluationResult(table=table, markdown=md, members=ens, truth=y, lerp=lerp, timings=timings, config=config,
                            land_fraction=bench.static["land_sea_mask"] if "land_sea_mask" in bench.static else None,
                            conserved_members=conserved, rank_histograms=histograms, extremes=extremes)


def few_step_label(n: int, steps: int) -> str:
    """Row label of the few-step ensemble ("DPDM 33-member mean, 4 steps")."""
    return f"{member_label(n)}, {steps} steps"


def ensemble_forecasts(members: xr.DataArray, sizes: Sequence[int], conserved: bool = False) -> dict[str, xr.DataArray]:
    """The DPDM rows: label -> the first N members (member 0 alone for N = 1) for each ensemble size N."""
    return {member_label(n, conserved): members.isel(member=0) if n == 1 else members.isel(member=slice(0, n))
            for n in sorted(set(sizes))}


def write_report(result: EvaluationResult, out_dir: str | Path, name: str = "quality_glosea4",
                 command: str | Sequence[str] = "") -> dict:
    """Markdown + JSON tables and PNG figures (maps, skill vs members, power spectra).

    Paths in the files (model folders, the command line) are recorded by :func:`io.portable_path`, relative to
    the repository or working directory, never as a machine's absolute paths.
    """
    import platform

    from dpdm_diffusers import metrics, plots
    from dpdm_diffusers.io import portable_command, portable_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = portable_command(command) if command else ""
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    rows = (
        "Rows: `+ lapse rate` = the interpolation corrected by 6.5 K/km x (fine topography - the interpolated 4 x 4 "
        "block-mean topography the coarse input sees); `+ conservation` = every member (or field) shifted per 4 x 4 "
        "block so that its block mean equals the low-res input, which in this benchmark is the 4 x 4 block mean of "
        "the truth, so the shift is the L2 projection onto fields consistent with the input. N-member rows score "
        "the ensemble mean (CRPS and SSR the members)."
    )
    if result.config.get("few_step"):
        rows += (f" `, {result.config['few_step']} steps` = the largest ensemble sampled with "
                 f"{result.config['few_step']} steps of the same sampler, its spread scaled by "
                 f"{result.config['few_step_spread']:.4f} (the factor calibrated for that step count relative to "
                 f"{result.config['num_inference_steps']} steps by benchmarks/samplers.py, never on the test month).")
    rows += "\n\n"
    header = (
        f"# {name}\n\n{result.config['benchmark']}, {result.config['fields']} fields, global and per region; "
        f"K. Sampler `{result.config['scheduler']}` with {result.config['num_inference_steps']} steps, seed "
        f"{result.config['seed']}.\n\nMetrics per cell: RMSE / ACC / SSIM / PSNR / CRPS / SSR / ACC_train. "
        f"ACC uses anomalies against the mean of the {result.config['fields']} test-month truth fields (member-to-member); ACC_train "
        "against the Aug-Nov training climatology (mostly seasonal cycle, so near 1 for every method). SSIM and "
        "PSNR use the per-field max - min of the truth inside each region as data range. CRPS is the fair "
        "ensemble CRPS (equal to MAE for deterministic methods); SSR = spread / RMSE of the mean.\n\n"
        + rows
        + f"Command: `{command}`\n\nMachine: {machine}; pipeline wall time {result.timings.get('pipeline_s', 0):.1f} s.\n\n"
    )
    ranks = rank_histogram_markdown(result.rank_histograms)
    extremes = ""
    if result.extremes is not None and not result.extremes.empty:
        from dpdm_diffusers.climate_scores import markdown_table
        from dpdm_diffusers.glosea4 import VARIABLE

        extremes = ("\n**Distribution and extremes (global; every field pooled)**\n\n1st / 99th percentile biases, "
                    "the Wasserstein distance of all values, RALSD (radially averaged log spectral distance) and the "
                    "twCRPS above the truth's 99th percentile. An N-member row's member-wise scores are of its "
                    "members (mean ± spread over them), not of their mean; twCRPS scores the ensemble.\n\n"
                    + markdown_table(result.extremes, VARIABLE, floatfmt=".3f") + "\n")
    (out / f"{name}.md").write_text(header + result.markdown + ("\n" + ranks if ranks else "") + extremes + "\n")
    records = result.table.to_dict(orient="records")
    (out / f"{name}.json").write_text(json.dumps({
        "config": portable_path(result.config), "timings": result.timings, "machine": machine, "command": command,
        "scores": records, "rank_histograms": result.rank_histograms,
        "extremes": [] if result.extremes is None else result.extremes.to_dict(orient="records")}, indent=2))
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
    plain, cons = result.config["member_labels"], result.config.get("conserved_member_labels", {})
    labels = {**plain, **cons}
    # one line per variant: the `variable` column names the line in plot_skill_vs_members
    curve = glob[glob["method"].isin(list(labels))].assign(
        members=lambda d: d["method"].map(labels),
        variable=lambda d: np.where(d["method"].isin(list(cons)), "DPDM" + CONSERVED, "DPDM"))
    curve = curve[curve["metric"].isin(["RMSE", "ACC", "SSIM", "PSNR", "CRPS", "SSR"])]
    # reference lines, at most the plot's four line styles: the strongest baselines without conservation
    ref_names = [m for m in (REGRESSION, BASELINES["lerp_lapse"], BASELINES["lerp"], BASELINES["bicubic"])
                 if m in set(glob["method"])]
    refs = {m: {r["metric"]: r["value"] for r in glob[glob["method"] == m].to_dict(orient="records")} for m in ref_names}
    figs["skill"] = plots.plot_skill_vs_members(curve, out / f"{name}_skill_vs_members.png", baselines=refs)
    spectra = {
        "Truth": metrics.power_spectrum(result.truth.isel(one)),
        "Lerp": metrics.power_spectrum(result.lerp.isel(one)),
        "One member": metrics.power_spectrum(ens.isel(member=0, **one)),
        "Ensemble mean": metrics.power_spectrum(ens.isel(**one).mean("member")),
    }
    figs["spectra"] = plots.plot_power_spectra(spectra, out / f"{name}_spectra.png", title="Radially averaged power spectrum")
    return {k: str(v) for k, v in figs.items()}
