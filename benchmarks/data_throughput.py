"""Is data loading the bottleneck of a training step? Loader samples/s vs a UNet forward+backward step.

Measures, on the same machine and process:

* the random-patch loader (:class:`dpdm_diffusers.samples.RandomPatchDataset` through a
  ``torch.utils.data.DataLoader``), from in-memory fields and from the memory-mapped Arrow dataset;
* one training step of a small ``diffusers.UNet2DModel`` (``in_channels = 2V + S``,
  ``out_channels = V``): noise, forward, masked MSE, backward, AdamW step.

Data: the real glosea4-ts-x4 training split (52 fields, 144 x 192) when the data extra is installed,
otherwise synthetic fields of the same size. Results go to ``benchmarks/results/data_throughput.md``.

    python benchmarks/data_throughput.py                    # defaults: batch 16, 64 px patches
    python benchmarks/data_throughput.py --device cuda --workers 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from dpdm_diffusers.samples import ArrowFields, RandomPatchDataset, build_hf_dataset, normalize_fields
from dpdm_diffusers.statistics import compute_statistics
from dpdm_diffusers.transforms import Normalizer


def load_data():
    """(high_res, lerp, static, description): glosea4 training split, or synthetic data of its size."""
    try:
        from dpdm_diffusers.glosea4 import load_glosea4_benchmark

        bench = load_glosea4_benchmark(static=True)
        high, _ = bench.split("train")
        return high, bench.split_lerp("train").compute(), bench.static, "glosea4-ts-x4 train split (52 x 144 x 192, real)"
    except ImportError as err:
        print(f"data extra missing ({err}); using synthetic fields of the same size", file=sys.stderr)
    from dpdm_diffusers.data import coarsen, regrid
    from dpdm_diffusers.grids import Grid

    rng = np.random.default_rng(0)
    lat, lon = -90 + 1.25 * np.arange(144), 1.875 * np.arange(192)
    t = 280 + 30 * np.cos(np.deg2rad(lat))[None, None, :, None] + rng.normal(0, 2, (13, 4, 144, 192))
    high = xr.Dataset({"surface_temperature": (("realization", "time", "lat", "lon"), t.astype("f4"), {"units": "K"})},
                      coords={"realization": np.arange(13), "time": np.arange(4), "lat": lat, "lon": lon})
    lerp = regrid(coarsen(high, 4), Grid(lat, lon)).compute()
    static = xr.Dataset({"topography": (("lat", "lon"), rng.random((144, 192)) * 3000),
                         "land_sea_mask": (("lat", "lon"), (rng.random((144, 192)) > 0.7) * 1.0)},
                        coords={"lat": lat, "lon": lon})
    return high, lerp, static, "synthetic (52 x 144 x 192)"


def loader_rate(dataset, batch_size: int, batches: int, workers: int) -> float:
    """Samples per second delivered by a DataLoader (after one warm-up batch)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                                         persistent_workers=workers > 0)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += batch["target"].shape[0]
    return n / (time.perf_counter() - t0)


def unet_step_time(v: int, s: int, batch_size: int, patch: int, steps: int, device: str):
    """Median seconds of one training step of a small UNet2DModel, and its parameter count."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=patch, in_channels=2 * v + s, out_channels=v, layers_per_block=1,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randn(batch_size, v, patch, patch, device=device)
    cond = torch.randn(batch_size, v + s, patch, patch, device=device)
    mask = torch.ones_like(target, dtype=torch.bool)
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        noise = torch.randn_like(target)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        noisy = scheduler.add_noise(target, noise, t)
        pred = model(torch.cat([noisy, cond], dim=1), t).sample
        loss = ((pred - noise) ** 2)[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps allocate and warm caches
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(p.numel() for p in model.parameters())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=64)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8, help="timed UNet steps (after 2 warm-up steps)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "data_throughput.md"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    high, lerp, static, source = load_data()
    stats = compute_statistics(high, lerp, static=static)
    nz = Normalizer.from_config(stats)
    fields = normalize_fields(high, lerp, nz, static)
    prep_s = time.perf_counter() - t0
    v, s = nz.num_variables, nz.num_static
    p, b = args.patch_size, args.batch_size

    mem_rate = loader_rate(RandomPatchDataset(fields, p, seed=0), b, args.loader_batches, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        hf = build_hf_dataset(high, lerp, nz, static, cache_dir=tmp)
        build_s = time.perf_counter() - t1
        arrow_rate = loader_rate(RandomPatchDataset(ArrowFields(hf), p, seed=0), b,
                                 max(20, args.loader_batches // 4), args.workers)
        del hf
    step_s, n_params = unet_step_time(v, s, b, p, args.steps, args.device)

    step_rate = b / step_s
    rows = [
        ("in-memory fields (`NormalizedFields`)", mem_rate),
        ("memory-mapped Arrow (`ArrowFields`)", arrow_rate),
    ]
    cmd = "python benchmarks/data_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Data throughput vs training step",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), device `{args.device}`, "
        f"load average at the end {os.getloadavg()[0]:.1f} (other jobs slow both sides alike)  ",
        f"Data: {source}; prepared (load, statistics, model space) in {prep_s:.1f} s; "
        f"Arrow dataset built in {build_s:.2f} s  ",
        f"Batch {b}, patches {p} x {p}, V = {v} variables, S = {s} static channels, "
        f"DataLoader workers = {args.workers}",
        "",
        f"UNet2DModel ({n_params / 1e6:.2f} M parameters, in {2 * v + s} / out {v} channels, "
        f"blocks (32, 64, 128, 128), attention at 16 px): "
        f"**{step_s * 1e3:.0f} ms per step** (forward + backward + AdamW, median of {args.steps}) "
        f"= {step_rate:.0f} samples/s.",
        "",
        "| loader | samples/s | ms per batch | batch time / step time |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:,.0f} | {b / rate * 1e3:.1f} | {(b / rate) / step_s:.3f} |")
    worst = max((b / r) / step_s for _, r in rows)
    verdict = "is not" if worst < 0.5 else "may be"
    lines += ["", f"Loading a batch takes at most {worst:.1%} of a training step here: data loading {verdict} "
              "the bottleneck (with workers > 0 it also overlaps the step)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
