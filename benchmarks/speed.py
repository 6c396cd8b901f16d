"""Speed and memory of DownscalingPipeline, reported as ratios measured in one run on one machine.

    python benchmarks/speed.py [--model models/dpdm-glosea4-ts-x4] [--quick]

1. Pipeline overhead: pipeline wall time / summed wall time of its raw UNet forward calls (target <= 1.10).
2. Batching: members x tiles batched through the UNet vs the reference DPDM loop (one member at a
   time, one tile per UNet call) for the same work (target >= 1.5x faster on CPU).
3. Peak memory (max RSS of a fresh process) for domains of 1x, 4x and 16x the area, against the size
   of the output arrays (target: growth only by the outputs).

Sampler quality vs cost (DDPM-1000, DDIM-25, DPM-Solver++ 10/20) is in ``benchmarks/samplers.py``.
Results go to ``benchmarks/results/speed.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def low_res_field(nlat: int, nlon: int, ntime: int = 1, seed: int = 0):
    """A smooth synthetic low-res temperature field (K) on a regional 1-degree grid."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    lat = 10 + np.arange(nlat) + 0.5
    lon = 100 + np.arange(nlon) + 0.5
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    vals = 285 + 10 * np.cos(np.deg2rad(yy) * 3) + 2 * np.sin(np.deg2rad(xx) * 7)
    data = np.stack([vals + rng.normal(0, 0.5, vals.shape) for _ in range(ntime)]).astype("float32")
    return xr.Dataset(
        {"surface_temperature": (("time", "lat", "lon"), data, {"units": "K"})},
        coords={"time": np.arange(ntime), "lat": lat, "lon": lon},
    )


def static_for(ds, pipe):
    from dpdm_diffusers.grids import Grid

    g = Grid.from_xarray(ds).refine(pipe.config.scale_factor)
    rng = np.random.default_rng(1)
    return np.stack([np.abs(rng.normal(300, 300, g.shape)), rng.uniform(0, 1, g.shape)])[: len(pipe.config.static_channels)]


def load_pipe(model: str | None):
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.modeling import build_unet, default_scheduler

    if model:
        pipe = DownscalingPipeline.from_pretrained(model)
    else:  # same architecture as the default model, random weights (speed does not depend on them)
        torch.manual_seed(0)
        pipe = DownscalingPipeline(
            unet=build_unet(1, 2, 64, "fast"), scheduler=default_scheduler(), variables=["surface_temperature"],
            units=["K"], transforms=["identity"], norm_mean=[278.0], norm_std=[20.0], residual_std=[0.5],
            static_channels=["topography", "land_sea_mask"], static_mean=[400.0, 0.3], static_std=[900.0, 0.45],
            scale_factor=4, patch_size=64,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_unet(pipe):
    """Wrap the UNet forward to sum its own wall time (the 'raw UNet' reference)."""
    stats = {"seconds": 0.0, "calls": 0, "tiles": 0}
    original = pipe.unet.forward

    def forward(sample, timestep, *a, **k):
        t0 = time.perf_counter()
        out = original(sample, timestep, *a, **k)
        stats["seconds"] += time.perf_counter() - t0
        stats["calls"] += 1
        stats["tiles"] += sample.shape[0]
        return out

    pipe.unet.forward = forward
    return stats, original


def overhead_and_batching(pipe, quick: bool) -> dict:
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ds = low_res_field(24, 40)  # 96 x 160 px: 2 x 3 tiles of 64 px
    static = static_for(ds, pipe)
    members, steps = (4, 3) if quick else (8, 5)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pipe(ds, static_fields=static, num_members=1, num_inference_steps=1, generator=gen())  # warm-up

    stats, original = timed_unet(pipe)
    t0 = time.perf_counter()
    pipe(ds, static_fields=static, num_members=members, num_inference_steps=steps, generator=gen(), batch_size=64)
    batched = time.perf_counter() - t0
    unet_s, n_tiles = stats["seconds"], stats["tiles"] // steps // members

    stats["seconds"] = 0.0
    t0 = time.perf_counter()
    for k in range(members):  # the reference implementation: members one by one, one tile per UNet call
        pipe(ds, static_fields=static, num_members=1, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(k), batch_size=1)
    looped = time.perf_counter() - t0
    pipe.unet.forward = original
    return {
        "domain_px": [96, 160], "tiles_per_member": n_tiles, "members": members, "steps": steps,
        "pipeline_s": batched, "raw_unet_s": unet_s, "overhead_ratio": batched / unet_s,
        "loop_s": looped, "batching_speedup": looped / batched,
    }


def _peak_rss_child(nlat: int, nlon: int, model: str | None) -> None:
    import resource

    pipe = load_pipe(model)
    ds = low_res_field(nlat, nlon)
    static = static_for(ds, pipe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = pipe(ds, static_fields=static, num_members=4, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), batch_size=16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_mb = sum(a.nbytes for a in (out.members.surface_temperature.values, out.mean.surface_temperature.values,
                                    out.std.surface_temperature.values)) / 2**20
    print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024, "output_mb": out_mb}))


def memory_scaling(model: str | None) -> list[dict]:
    rows = []
    for factor, (nlat, nlon) in ((1, (16, 16)), (4, (32, 32)), (16, (64, 64))):
        cmd = [sys.executable, __file__, "--_child", f"{nlat},{nlon}"] + (["--model", model] if model else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(area_factor=factor, high_res_px=[nlat * 4, nlon * 4])
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["peak_growth_mb"] = r["peak_mb"] - base["peak_mb"]
        r["output_growth_mb"] = r["output_mb"] - base["output_mb"]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="pipeline folder (default: random weights, default architecture)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        nlat, nlon = map(int, args._child.split(","))
        _peak_rss_child(nlat, nlon, args.model)
        return
    pipe = load_pipe(args.model)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    res = {"machine": machine, "command": "python " + " ".join(sys.argv), "batching": overhead_and_batching(pipe, args.quick),
           "memory": memory_scaling(args.model)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(res, indent=2))
    b = res["batching"]
    lines = [
        "# Pipeline speed and memory (ratios from one run on one machine)", "",
        f"Machine: {machine}. Command: `{res['command']}`.", "",
        f"Domain {b['domain_px'][0]}x{b['domain_px'][1]} px = {b['tiles_per_member']} tiles of 64 px per member, "
        f"{b['members']} members, DDIM {b['steps']} steps.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| pipeline wall / summed raw UNet forward time | {b['overhead_ratio']:.3f} ({b['pipeline_s']:.1f} s / {b['raw_unet_s']:.1f} s) | <= 1.10 |",
        f"| per-member, per-tile loop / batched members x tiles | {b['batching_speedup']:.2f}x ({b['loop_s']:.1f} s / {b['pipeline_s']:.1f} s) | >= 1.5x |",
        "", "Peak resident memory of a fresh process (4 members, 2 steps, batch 16):", "",
        "| area | high-res px | peak RSS (MB) | growth (MB) | output arrays (MB) | output growth (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["memory"]:
        lines.append(f"| {r['area_factor']}x | {r['high_res_px'][0]}x{r['high_res_px'][1]} | {r['peak_mb']:.0f} | "
                     f"{r['peak_growth_mb']:.0f} | {r['output_mb']:.1f} | {r['output_growth_mb']:.1f} |")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
