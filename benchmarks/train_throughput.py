"""Training step throughput of train_dpdm vs the raw forward + backward + AdamW of the same UNet batch.

    python benchmarks/train_throughput.py [--steps 30]

Runs the real script on glosea4-ts-x4 (default config: fast UNet, batch 16, 64 px patches) for a few
steps with validation and checkpoints off, then times the bare UNet step on random tensors of the same
shape in the same process. Writes benchmarks/results/train_throughput.md.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from dpdm_diffusers.modeling import build_unet
    from dpdm_diffusers.training.train_dpdm import main as train

    with tempfile.TemporaryDirectory() as tmp:
        train(["--config", str(ROOT / "training/configs/glosea4_ts_x4.yaml"), "--max_train_steps", str(args.steps),
               "--output_dir", tmp, "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
               "--validation_time="])
        summary = json.loads((Path(tmp) / "training_summary.json").read_text())
    script_sps = summary["train_samples_per_s"]

    unet = build_unet(1, 2, 64, "fast")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x, t = torch.randn(16, 4, 64, 64), torch.randint(0, 1000, (16,))
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = unet(x, t).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    raw_sps = 16 / (sum(times) / len(times))
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    lines = [
        "# Training throughput (glosea4-ts-x4 default config)", "",
        f"Machine: {machine}. Command: `python {' '.join(sys.argv)}`.", "",
        "| measure | samples/s |", "|---|---|",
        f"| train_dpdm loop ({args.steps} steps incl. data, EMA, logging) | {script_sps:.1f} |",
        f"| raw UNet forward + backward + AdamW, same batch (16 x 4 x 64 x 64) | {raw_sps:.1f} |",
        f"| ratio script / raw | {script_sps / raw_sps:.2f} |",
    ]
    out = ROOT / "benchmarks/results/train_throughput.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
