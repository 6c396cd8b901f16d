"""Speed and memory of DownscalingPipeline, reported as ratios measured in one run on one machine.

    python benchmarks/speed.py [--model models/dpdm-glosea4-ts-x4] [--quick]

1. Pipeline overhead: pipeline wall time / summed wall time of its raw UNet forward calls (target <= 1.10).
2. Batching: members x tiles batched through the UNet vs the reference DPDM loop (one member at a
   time, one tile per UNet call) for the same work (target >= 1.5x faster on CPU).
3. Memory the call adds (RSS sampled during the call in a fresh process) for domains of 1x, 4x and 16x
   the area, against the size of the output arrays (target: growth only by the outputs, i.e. a constant
   growth / output ratio, not one that grows with tiles x members).

Sampler quality vs cost (full-length DDPM, DDIM, DPM-Solver++, UniPC; calibrated few-step sampling) is in ``benchmarks/samplers.py``.
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
    """Overhead vs raw UNet calls, and batched members x tiles vs the reference per-member, per-tile loop.

    The full run uses the demo's shape: a 144 x 192 px domain (12 tiles of 64 px), 10 members,
    DPM-Solver++ 10 steps; ``--quick`` a 96 x 160 px domain, 4 members, 3 steps."""
    from dpdm_diffusers.evaluation import set_scheduler

    set_scheduler(pipe, "dpmsolver++")
    (nlat, nlon), members, steps = ((24, 40), 4, 3) if quick else ((36, 48), 10, 10)
    ds = low_res_field(nlat, nlon)
    static = static_for(ds, pipe)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pipe(ds, static_fields=static, num_members=1, num_inference_steps=1, generator=gen())  # warm-up

    stats, original = timed_unet(pipe)
    by_batch = {}
    for batch_size in (4, 16, 64):
        stats["seconds"], stats["tiles"] = 0.0, 0
        t0 = time.perf_counter()
        pipe(ds, static_fields=static, num_members=members, num_inference_steps=steps, generator=gen(), tiles_per_call=batch_size)
        by_batch[batch_size] = {"pipeline_s": time.perf_counter() - t0, "raw_unet_s": stats["seconds"]}
    n_tiles = stats["tiles"] // steps // members

    stats["seconds"] = 0.0
    t0 = time.perf_counter()
    for k in range(members):  # the reference implementation: members one by one, one tile per UNet call
        pipe(ds, static_fields=static, num_members=1, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(k), tiles_per_call=1)
    looped = time.perf_counter() - t0
    pipe.unet.forward = original
    best = min(by_batch, key=lambda b: by_batch[b]["pipeline_s"])
    return {
        "domain_px": [nlat * 4, nlon * 4], "tiles_per_member": n_tiles, "members": members, "steps": steps,
        "sampler": "DPMSolverMultistepScheduler",
        "by_batch_size": {str(b): {**v, "overhead_ratio": v["pipeline_s"] / v["raw_unet_s"],
                                   "speedup_vs_loop": looped / v["pipeline_s"]} for b, v in by_batch.items()},
        "best_batch_size": best, "pipeline_s": by_batch[best]["pipeline_s"], "raw_unet_s": by_batch[best]["raw_unet_s"],
        "overhead_ratio": by_batch[best]["pipeline_s"] / by_batch[best]["raw_unet_s"],
        "loop_s": looped, "batching_speedup": looped / by_batch[best]["pipeline_s"],
    }


def _call_memory_child(nlat: int, nlon: int, model: str | None, members: int) -> None:
    """Resident memory the call itself adds, sampled every 2 ms in a thread (peak RSS of the whole process
    is dominated by imports and would hide it)."""
    import gc

    from peak_rss import PeakRSS

    pipe = load_pipe(model)
    small = low_res_field(16, 16)
    pipe(small, static_fields=static_for(small, pipe), num_members=1, num_inference_steps=1)  # lazy init, thread pools
    ds = low_res_field(nlat, nlon)
    static = static_for(ds, pipe)
    gc.collect()
    with PeakRSS(interval=0.002) as mem:
        out = pipe(ds, static_fields=static, num_members=members, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), tiles_per_call=16)
    before, peak_b = mem.baseline, mem.peak
    out_b = sum(a.nbytes for a in (out.members.surface_temperature.values, out.mean.surface_temperature.values,
                                   out.std.surface_temperature.values))
    print(json.dumps({"before_mb": before / 2**20, "call_growth_mb": (peak_b - before) / 2**20, "output_mb": out_b / 2**20}))


def memory_scaling(model: str | None, members: int = 8) -> list[dict]:
    rows = []
    for factor, (nlat, nlon) in ((1, (32, 32)), (4, (64, 64)), (16, (128, 128))):
        cmd = [sys.executable, __file__, "--_child", f"{nlat},{nlon},{members}"] + (["--model", model] if model else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(area_factor=factor, high_res_px=[nlat * 4, nlon * 4], members=members)
        row["growth_per_output"] = row["call_growth_mb"] / row["output_mb"]
        rows.append(row)
    return rows


def render(res: dict) -> None:
    b, mem = res["batching"], res["memory"]
    machine = res["machine"]
    lines = [
        "# Pipeline speed and memory (ratios from one run on one machine)", "",
        f"Machine: {machine}. Command: `{res['command']}`.", "",
        f"Domain {b['domain_px'][0]}x{b['domain_px'][1]} px = {b['tiles_per_member']} tiles of 64 px per member, "
        f"{b['members']} members, DPM-Solver++ {b['steps']} steps.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| pipeline wall / summed raw UNet forward time (batch {b['best_batch_size']}) | {b['overhead_ratio']:.3f} "
        f"({b['pipeline_s']:.1f} s / {b['raw_unet_s']:.1f} s) | <= 1.10 |",
        f"| per-member, per-tile loop / batched members x tiles (batch {b['best_batch_size']}) | {b['batching_speedup']:.2f}x "
        f"({b['loop_s']:.1f} s / {b['pipeline_s']:.1f} s) | >= 1.5x |",
        "", "By tiles per UNet call (`batch_size`):", "",
        "| batch_size | pipeline (s) | overhead ratio | speed-up vs loop |", "|---|---|---|---|",
        *[f"| {k} | {v['pipeline_s']:.1f} | {v['overhead_ratio']:.3f} | {v['speedup_vs_loop']:.2f}x |" for k, v in b["by_batch_size"].items()],
        "", f"Memory the call adds (RSS sampled every 2 ms during the call, after a warm-up call; "
        f"{mem[0]['members']} members, DPM-Solver++ 2 steps, batch 16):", "",
        "| area | high-res px | process before call (MB) | call growth (MB) | output arrays (MB) | growth / output |",
        "|---|---|---|---|---|---|",
        *[f"| {r['area_factor']}x | {r['high_res_px'][0]}x{r['high_res_px'][1]} | {r['before_mb']:.0f} | "
          f"{r['call_growth_mb']:.1f} | {r['output_mb']:.1f} | {r['growth_per_output']:.2f} |" for r in mem],
        "",
        f"From 1x to {mem[-1]['area_factor']}x the call grows by "
        f"{(mem[-1]['call_growth_mb'] - mem[0]['call_growth_mb']) / (mem[-1]['output_mb'] - mem[0]['output_mb']):.1f} MB "
        "per MB of output: a few canvas-sized working arrays (latents, the solver's history, fused UNet output, "
        "condition tiles), linear in members x area like the output itself and independent of the number of steps; "
        "the constant part is the UNet's activations for one batch of tiles.",
    ]
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="pipeline folder (default: random weights, default architecture)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite results/speed.md from results/speed.json")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        nlat, nlon, members = map(int, args._child.split(","))
        _call_memory_child(nlat, nlon, args.model, members)
        return
    if args.render_only:  # rewrite speed.md from speed.json
        render(json.loads((RESULTS / "speed.json").read_text()))
        return
    pipe = load_pipe(args.model)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    res = {"machine": machine, "command": "python " + " ".join(sys.argv), "batching": overhead_and_batching(pipe, args.quick),
           "memory": memory_scaling(args.model)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(res, indent=2))
    render(res)


if __name__ == "__main__":
    main()
