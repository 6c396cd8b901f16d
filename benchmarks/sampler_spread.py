"""How the sampler sets the ensemble spread at a given step count (shipped two-stage model, its saved spread).

    python benchmarks/sampler_spread.py [--fields 2 --members 8 --steps 4,10]

The same window, fields, members and seed as ``benchmarks/samplers.py`` (64 x 64 px, 40S-40N, 60-180E of the
glosea4-ts-x4 test month), every sampler of ``dpdm downscale --scheduler`` plus single-step DPM-Solver, each at the
same step counts. A two-stage model's spread is calibrated for one sampler and step count (10 DPM-Solver++ steps for
the shipped model): the table says how far another choice moves it, and so when to rerun ``dpdm calibrate --steps N``
with the sampler you use. Writes ``benchmarks/results/sampler_spread.md``/``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
SAMPLERS = ["ddpm", "ddim", "dpmsolver++", "dpmsolver-singlestep", "unipc", "euler"]


def set_sampler(pipe, name: str):
    import diffusers

    from dpdm_diffusers.evaluation import set_scheduler

    if name == "dpmsolver-singlestep":
        pipe.scheduler = diffusers.DPMSolverSinglestepScheduler.from_config(pipe.scheduler.config)
        return pipe
    return set_scheduler(pipe, name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"))
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--steps", default="4,10")
    args = ap.parse_args()

    from samplers import score, window

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.glosea4 import load_glosea4_benchmark

    low, truth, static = window(load_glosea4_benchmark(), "test", args.fields)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for name in SAMPLERS:
            pipe = set_sampler(DownscalingPipeline.from_pretrained(args.model), name)
            pipe.set_progress_bar_config(disable=True)
            out = pipe(low, static_fields=static, num_members=args.members, num_inference_steps=steps,
                       generator=torch.Generator().manual_seed(0))
            rows.append({"sampler": name, "steps": steps, **score(out.members.surface_temperature, truth)})
            print(rows[-1], flush=True)
    meta = {"command": "python benchmarks/sampler_spread.py " + " ".join(sys.argv[1:]), "machine": platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "fields": args.fields,
            "members": args.members, "model": Path(args.model).name}
    (RESULTS / "sampler_spread.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# The sampler sets the spread (shipped model, its saved spread)", "",
        f"Machine: {meta['machine']}, {meta['threads']} torch threads, torch {meta['torch']}. Command: "
        f"`{meta['command']}`. {args.fields} fields x {args.members} members of the glosea4-ts-x4 test month, 64 x 64 px "
        "window 40S-40N, 60-180E. The saved spread was calibrated for 10 DPM-Solver++ steps.", "",
        "| sampler | steps | spread (K) | spread-skill | RMSE of the mean (K) | CRPS (K) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['spread']:.3f} | {r['ssr']:.2f} | {r['rmse_mean']:.3f} | "
              f"{r['crps']:.3f} |" for r in rows]
    (RESULTS / "sampler_spread.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
