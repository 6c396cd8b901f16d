"""Training throughput of train_dpdm vs a bare forward + backward + AdamW loop on the same batch, on any device.

    python benchmarks/train_throughput.py [--steps 30] [--batch-size 16] [--mixed-precision no|bf16|fp16]

Runs the real script on glosea4-ts-x4 (default config: fast UNet, 64 px patches; validation and checkpoints
off) twice, with patches cut on the device (``--patches_on_device true``, the default where the fields fit)
and by the CPU DataLoader (``false``), then times in the same process:

* the bare UNet step (random tensors of the batch's shape, the same AdamW and autocast), the ceiling;
* each patch source alone (batches per second, no model): where the time of the DataLoader path goes.

Rates are steady-state (after 10 warm-up steps) and synchronised with the GPU; the bare loop runs before and
after the script and the faster run is the reference. Writes
``benchmarks/results/train_throughput_<device>.md`` (``cpu`` or ``cuda``). Reads the benchmark from the
packaged sources, or from a netCDF copy named by ``$DPDM_GLOSEA4_NETCDF``
(``python -c "from dpdm_diffusers.glosea4 import save_glosea4_netcdf as s; s('glosea4.nc')"``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 10


def script_rate(steps: int, batch: int, precision: str, on_device: bool) -> float:
    from dpdm_diffusers.training.train_dpdm import main as train

    with tempfile.TemporaryDirectory() as tmp:
        train(["--config", str(ROOT / "training/configs/glosea4_ts_x4.yaml"), "--max_train_steps", str(steps),
               "--train_batch_size", str(batch), "--mixed_precision", precision, "--output_dir", tmp,
               "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none", "--validation_time=",
               "--patches_on_device", str(on_device).lower(), "--logging_steps", "50"])
        return json.loads((Path(tmp) / "training_summary.json").read_text())["steady_train_samples_per_s"]


def bare_rate(steps: int, batch: int, precision: str, device) -> float:
    from dpdm_diffusers.modeling import build_unet
    from dpdm_diffusers.training.utils import make_optimizer, synchronize

    unet = build_unet(1, 2, 64, "fast").to(device).train()
    opt = make_optimizer(unet.parameters(), 1e-4, 1e-2, device)
    x, t = torch.randn(batch, 4, 64, 64, device=device), torch.randint(0, 960, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            synchronize(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = unet(x, t).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def data_rates(steps: int, batch: int, device) -> dict[str, float]:
    """Samples/s of each patch source alone, delivered on ``device``."""
    from dpdm_diffusers import glosea4
    from dpdm_diffusers.device_patches import DevicePatchSampler
    from dpdm_diffusers.samples import RandomPatchDataset, normalize_fields
    from dpdm_diffusers.training.config import parse_args, resolve_options
    from dpdm_diffusers.training.data import build_statistics, load_pairs
    from dpdm_diffusers.training.utils import synchronize
    from dpdm_diffusers.transforms import Normalizer

    cfg, _ = resolve_options(parse_args(["--config", str(ROOT / "training/configs/glosea4_ts_x4.yaml")]))
    region = load_pairs(cfg)
    stats = build_statistics(cfg, region.pairs, region.static, region.train)
    nz = Normalizer.from_config({**stats, "prediction": "residual"})
    v = [glosea4.VARIABLE]
    fields = normalize_fields(region.pairs.high_res[v].sel(**region.train),
                              region.pairs.lerp(cfg.interpolation)[v].sel(**region.train), nz, region.static)
    dataset = RandomPatchDataset(fields, 64, seed=0)
    def cycle(loader):  # a new epoch whenever one runs out, as in training
        while True:
            yield from loader

    loader = cycle(torch.utils.data.DataLoader(dataset, batch_size=batch, drop_last=True))
    sampler = DevicePatchSampler(dataset, batch, device)
    rates = {}
    for name, draw in (("DataLoader (CPU crops, copied to the device)",
                        lambda i: {k: x.to(device, non_blocking=True) for k, x in next(loader).items()}),
                       ("DevicePatchSampler (fields on the device)", sampler.batch)):
        for i in range(WARMUP + steps):
            if i == WARMUP:
                synchronize(device)
                t0 = time.perf_counter()
            draw(i)
        synchronize(device)
        rates[name] = batch * steps / (time.perf_counter() - t0)
    return rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = ap.parse_args()
    from dpdm_diffusers.io import portable_command

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, b, mp = args.steps, args.batch_size, args.mixed_precision

    # the bare loop runs first and last; the faster of the two is the ceiling (no credit for a cold GPU)
    bare_first = bare_rate(n, b, mp, device)
    on_dev = script_rate(n + WARMUP, b, mp, True)
    loader = script_rate(n + WARMUP, b, mp, False)
    bare_last = bare_rate(n, b, mp, device)
    bare = max(bare_first, bare_last)
    data = data_rates(n, b, device)
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    lines = [
        f"# Training throughput on {device.type} (glosea4-ts-x4 default config, fast UNet, 64 px patches)", "",
        f"Machine: {machine}. Command: `{portable_command(['python', *sys.argv])}` (batch {b}, mixed precision {mp}, "
        f"{n} timed steps after {WARMUP} warm-up steps, synchronised).", "",
        "| measure | samples/s | vs bare loop |", "|---|---|---|",
        f"| bare UNet forward + backward + AdamW, same batch ({b} x 4 x 64 x 64): faster of a run before "
        f"and after the script ({bare_first:.1f}, {bare_last:.1f}) | {bare:.1f} | 1.00 |",
        f"| train_dpdm, patches cut on the device (default) | {on_dev:.1f} | {on_dev / bare:.2f} |",
        f"| train_dpdm, patches from the CPU DataLoader (`--patches_on_device false`) | {loader:.1f} | {loader / bare:.2f} |",
        *[f"| patch source alone: {k} | {r:.0f} | {r / bare:.1f} |" for k, r in data.items()],
    ]
    out = ROOT / f"benchmarks/results/train_throughput_{device.type}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
