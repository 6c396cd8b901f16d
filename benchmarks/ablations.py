"""The paper's ablations at equal training budget on glosea4-ts-x4: static channels and patch size.

    python benchmarks/ablations.py                      # every run (about 8 CPU-minutes each here), then the table
    python benchmarks/ablations.py --runs both,none     # some runs; finished runs are reused, stopped ones resumed
    python benchmarks/ablations.py --score-only         # re-score the finished runs

Ling et al. (2024) report that topography speeds convergence, that 128 px patches beat 32 and 64 px, and that 256
px patches do not converge. Each run here trains the default recipe (training/configs/glosea4_ts_x4.yaml: residual
diffusion, fast UNet, bicubic base) for the same number of steps, and every step sees the same number of pixels
(16 x 64 x 64 = 65,536: batch 64 at 32 px, 4 at 128 px, 1 at 256 px), so runs cost about the same compute:

    both       topography + land-sea mask, 64 px (the default)
    none       no static channel
    topo       topography only
    lsm        land-sea mask only
    patch32    both channels, 32 px patches
    patch128   both channels, 128 px patches
    patch256   both channels, 256 px patches: wider than the 192-point global grid, which cannot be padded
               periodically to it, so the trainer refuses it (recorded in the table)

Validation RMSE (the pipeline's 4-member mean on two December fields) is recorded against step
(training_summary.json "history"); the test month (January 2012, 13 fields) is scored with 4 members and 10
DPM-Solver++ steps: RMSE of the mean, CRPS, spread-skill, the 1st/99th percentile bias, the Wasserstein distance and
the RALSD of single members (dpdm_diffusers.climate_scores).

GPU recipe (not run here): `python benchmarks/ablations.py --steps 3000 --device-batch-multiplier 4
--run-dir runs/ablations-gpu --out-dir benchmarks/results/ablations-gpu` trains each run for the default recipe's
3000 steps at 4x the batch (64 at 64 px): about 190,000 samples, 2-3 minutes per run on one H100 at the
1,200-2,300 samples/s of train_throughput_cuda.md.

Writes benchmarks/results/ablations.{md,json} and ablations_curves.png; runs in runs/ablations/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIXELS_PER_STEP = 16 * 64 * 64
RUNS = {
    "both": {"static_channels": ["topography", "land_sea_mask"], "patch_size": 64},
    "none": {"static_channels": [], "patch_size": 64},
    "topo": {"static_channels": ["topography"], "patch_size": 64},
    "lsm": {"static_channels": ["land_sea_mask"], "patch_size": 64},
    "patch32": {"static_channels": ["topography", "land_sea_mask"], "patch_size": 32},
    "patch128": {"static_channels": ["topography", "land_sea_mask"], "patch_size": 128},
    "patch256": {"static_channels": ["topography", "land_sea_mask"], "patch_size": 256},
}


def config(name: str, steps: int, run_dir: Path, multiplier: int = 1):
    from dpdm_diffusers.training.config import TrainingConfig, load_yaml_options

    opts = load_yaml_options(ROOT / "training" / "configs" / "glosea4_ts_x4.yaml")
    spec = RUNS[name]
    batch = max(1, PIXELS_PER_STEP * multiplier // spec["patch_size"] ** 2)
    opts.update(spec, train_batch_size=batch, max_train_steps=steps, lr_warmup_steps=max(1, steps // 15),
                validation_steps=max(1, steps // 6), checkpointing_steps=max(1, steps // 6),
                output_dir=str(run_dir / name), report_to="none", model_card_title=f"ablation {name}")
    return TrainingConfig(**opts)


def train(name: str, steps: int, run_dir: Path, multiplier: int) -> float:
    from dpdm_diffusers.training import train_dpdm

    cfg = config(name, steps, run_dir, multiplier)
    out = Path(cfg.output_dir)
    if (out / "training_summary.json").exists():
        return json.loads((out / "training_summary.json").read_text()).get("wall_time_s", float("nan"))
    if any(out.glob("checkpoint-*")):
        cfg.resume_from_checkpoint = "latest"
    t0 = time.perf_counter()
    train_dpdm.run(cfg)
    return time.perf_counter() - t0


def test_scores(model_dir: Path, members: int, steps: int, max_fields: int | None) -> dict:
    import torch

    from dpdm_diffusers import DownscalingPipeline, climate_scores, metrics
    from dpdm_diffusers.evaluation import set_scheduler
    from dpdm_diffusers.glosea4 import VARIABLE, load_glosea4_benchmark

    bench = load_glosea4_benchmark()
    truth, low = bench.split("test")
    if max_fields:
        truth, low = truth.isel(realization=slice(0, max_fields)), low.isel(realization=slice(0, max_fields))
    pipe = DownscalingPipeline.from_pretrained(model_dir)
    set_scheduler(pipe, "dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    static = bench.static[list(pipe.config.static_channels)] if pipe.config.static_channels else None
    t0 = time.perf_counter()
    ens = pipe(low, static_fields=static, num_members=members, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0)).members[VARIABLE]
    sample_s = time.perf_counter() - t0
    y = truth[VARIABLE]
    return field_scores(ens, y, climate_scores, metrics) | {"sample_s": sample_s}


def field_scores(ens, y, climate_scores, metrics) -> dict:
    table = climate_scores.score(y.to_dataset(name="ts"), {"x": ens.to_dataset(name="ts")},
                                 ["q1_bias", "q99_bias", "wasserstein", "RALSD"])
    out = {r.metric: r.value for r in table.itertuples()}
    mean = ens.mean("member") if "member" in ens.dims else ens
    out.update(rmse_mean=float(metrics.rmse(mean, y)), crps=float(metrics.crps(ens, y)))
    if "member" in ens.dims:
        out.update(rmse_member=float(metrics.rmse(ens.isel(member=0), y)),
                   ssr=float(metrics.spread_skill_ratio(ens, y)))
    return out


def baselines(max_fields: int | None) -> dict:
    from dpdm_diffusers import climate_scores, metrics
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.glosea4 import VARIABLE, load_glosea4_benchmark

    bench = load_glosea4_benchmark()
    truth, low = bench.split("test")
    if max_fields:
        truth, low = truth.isel(realization=slice(0, max_fields)), low.isel(realization=slice(0, max_fields))
    return {m: field_scores(regrid(low, bench.grid, method=m)[VARIABLE], truth[VARIABLE], climate_scores, metrics)
            for m in ("bilinear", "bicubic")}


def curves_figure(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        h = r.get("history") or {}
        if h.get("validation"):
            axes[0].plot([v["step"] for v in h["validation"]], [v["val_rmse_mean"] for v in h["validation"]],
                         marker="o", label=name)
        if h.get("loss"):
            steps = [v["step"] for v in h["loss"]]
            axes[1].plot(steps, [v["loss"] for v in h["loss"]], label=name, lw=0.8)
    axes[0].axhline(results.get("validation_lerp", float("nan")), color="k", ls=":", label="interpolation")
    axes[0].set(xlabel="training step", ylabel="validation RMSE of the 4-member mean (K)",
                title="Validation (December 2011)")
    axes[1].set(xlabel="training step", ylabel="training loss (noise MSE)", yscale="log", title="Training loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    cols = [("rmse_mean", "RMSE of the mean (K)"), ("rmse_member", "RMSE of one member (K)"), ("crps", "CRPS (K)"),
            ("ssr", "spread-skill"), ("q1_bias", "1st pct bias (K)"), ("q99_bias", "99th pct bias (K)"),
            ("wasserstein", "Wasserstein (K)"), ("RALSD", "RALSD (dB)")]
    out = ["# Ablations on glosea4-ts-x4 at equal training budget", "",
           f"Command: `{results['command']}`. {results['steps']} steps per run, every step "
           f"{PIXELS_PER_STEP:,} pixels (batch x patch^2); runs on a 2-core CPU (torch threads 2), one at a time.",
           "", "Test month January 2012 (13 fields, 144 x 192), "
           f"{results['members']} members, DPM-Solver++ {results['sampler_steps']} steps. Validation: the 4-member "
           "mean's RMSE on two December 2011 fields against step (`ablations_curves.png`).", "",
           "| run | static channels | patch | batch | wall (min) | first step below interpolation | final val RMSE (K) | "
           + " | ".join(c for _, c in cols) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(cols)]
    for name, b in results["baselines"].items():
        out.append(f"| {name} | – | – | – | – | – | – | " + " | ".join(
            f"{b[k]:.3f}" if k in b else "–" for k, _ in cols) + " |")
    for name, r in results["runs"].items():
        if "error" in r:
            out.append(f"| {name} | {', '.join(r['static_channels']) or 'none'} | {r['patch_size']} | {r['batch']} | "
                       f"did not train: {r['error']} |" + " |" * (len(cols) + 2))
            continue
        val = (r.get("history") or {}).get("validation") or []
        t = r.get("test", {})
        below = first_below(r, results.get("validation_lerp"))
        best_txt = str(below) if below else f"not in {results['steps']}"
        final_txt = f"{val[-1]['val_rmse_mean']:.3f}" if val else "–"
        out.append(f"| {name} | {', '.join(r['static_channels']) or 'none'} | {r['patch_size']} | {r['batch']} | "
                   f"{r['wall_s'] / 60:.1f} | {best_txt} | {final_txt} | "
                   + " | ".join(f"{t[k]:.3f}" if k in t else "–" for k, _ in cols) + " |")
    out += ["", "First step below interpolation: the first validation (every " f"{max(1, results['steps'] // 6)} steps) "
            "whose 4-member mean beats the interpolated input on the validation fields "
            f"({results.get('validation_lerp', float('nan')):.3f} K); a convergence speed.", ""]
    out += [f"- {n}" for n in findings(results) + results.get("notes", [])]
    return "\n".join(out) + "\n"


def first_below(run: dict, lerp: float | None) -> int | None:
    for v in (run.get("history") or {}).get("validation") or []:
        if lerp is not None and v["val_rmse_mean"] < lerp:
            return v["step"]
    return None


def findings(results: dict) -> list[str]:
    """The paper's claims against the table (read off the numbers)."""
    runs, out = results["runs"], []
    rmse = {n: r["test"]["rmse_mean"] for n, r in runs.items() if "test" in r}
    if {"both", "none"} <= set(rmse):
        static = [n for n in ("both", "topo", "lsm", "none") if n in rmse]
        speed = {n: first_below(runs[n], results.get("validation_lerp")) for n in static}
        out.append("Static channels (paper: topography speeds convergence): test RMSE of the mean "
                   + ", ".join(f"{n} {rmse[n]:.3f} K" for n in static) + "; first validation step below "
                   "interpolation " + ", ".join(f"{n} {speed[n] or 'never'}" for n in static) + ". "
                   + ("Holds here." if rmse["both"] < rmse["none"] and (speed["none"] is None or
                                                                       (speed["both"] or 1e9) < speed["none"])
                      else "Does not hold here."))
    patches = [n for n in ("patch32", "both", "patch128") if n in rmse]
    if len(patches) == 3:
        best = min(patches, key=rmse.get)
        out.append("Patch size (paper: 128 beats 32 and 64): test RMSE of the mean "
                   + ", ".join(f"{runs[n]['patch_size']} px {rmse[n]:.3f} K" for n in patches) + ". "
                   + ("Holds here." if best == "patch128" else f"Does not hold here ({runs[best]['patch_size']} px best)."))
    if "error" in runs.get("patch256", {}):
        out.append("256 px (paper: does not converge): cannot be tried on this 144 x 192 global grid, which is "
                   "narrower than the patch (the trainer refuses it: `" + runs["patch256"]["error"] + "`).")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--device-batch-multiplier", type=int, default=1, help="scale every run's batch (GPU)")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--sampler-steps", type=int, default=10)
    ap.add_argument("--max-fields", type=int, default=None)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "ablations"))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--score-only", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = set(names) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown run(s) {sorted(unknown)}; choose from {list(RUNS)}")
    run_dir, out_dir = Path(args.run_dir), Path(args.out_dir)
    out_json = out_dir / "ablations.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    # the command that makes every row (finished runs are reused, so a partial rerun gives the same table)
    results.update(command="python benchmarks/ablations.py" + (f" --steps {args.steps}" if args.steps != 1000 else ""),
                   steps=args.steps,
                   members=args.members, sampler_steps=args.sampler_steps)
    results.setdefault("baselines", baselines(args.max_fields))
    for name in names:
        cfg = config(name, args.steps, run_dir, args.device_batch_multiplier)
        wall = float("nan")
        if not args.score_only:
            try:
                wall = train(name, args.steps, run_dir, args.device_batch_multiplier)
            except ValueError as err:  # e.g. a patch wider than the global grid: recorded, not a crash
                results["runs"][name] = {"static_channels": list(cfg.static_channels), "patch_size": cfg.patch_size,
                                         "batch": cfg.train_batch_size, "error": str(err)}
                (out_dir / "ablations.md").write_text(markdown(results))
                out_json.write_text(json.dumps(results, indent=1, default=float))
                continue
        summary_file = Path(cfg.output_dir) / "training_summary.json"
        if not summary_file.exists():
            continue
        summary = json.loads(summary_file.read_text())
        results["validation_lerp"] = summary.get("val_rmse_lerp", results.get("validation_lerp"))
        results["runs"][name] = {
            "static_channels": list(cfg.static_channels), "patch_size": cfg.patch_size, "batch": cfg.train_batch_size,
            "wall_s": summary.get("wall_time_s", wall), "history": summary.get("history"),
            "test": test_scores(Path(cfg.output_dir), args.members, args.sampler_steps, args.max_fields),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1, default=float))
        (out_dir / "ablations.md").write_text(markdown(results))
        curves_figure(results, out_dir / "ablations_curves.png")
        print(f"{name}: {results['runs'][name]['test']}", flush=True)


if __name__ == "__main__":
    main()
