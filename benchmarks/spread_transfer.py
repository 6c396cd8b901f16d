"""Spread of the refit default model, calibrated without held-out data and without the test month.

    python benchmarks/spread_transfer.py --model-a runs/refit/dpdm-A --model-b models/dpdm-glosea4-ts-x4 [--write]

Model A (benchmarks/refit_glosea4.sh: the recipe on 2011-08..11, spread calibrated on the validation month
2011-12) is scored on its last training month 2011-11 at its calibrated spread: spread-skill ``s``. The refit B
(2011-08..12) is then scaled so that its spread-skill on *its* last training month, 2011-12, is the same ``s``
(:func:`dpdm_diffusers.calibration.transfer_spread`). Each model's held-out month (A: 2011-12, B: the test month
2012-01) lies one month past its data. ``--write`` stores B's new ``stochastic_std`` in its folder.
Writes benchmarks/results/spread_transfer.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def month(bench, m: str, max_fields: int | None):
    """(low_res, truth, static) of one month (as `dpdm calibrate` reads the benchmark)."""
    from dpdm_diffusers.data import select_time

    low, truth = (select_time(x, (m, m)).isel(realization=slice(0, max_fields)) for x in (bench.low_res, bench.high_res))
    return low, truth, bench.static


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-a", required=True, help="model A (calibrated on the validation month)")
    ap.add_argument("--model-b", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"), help="the refit model B")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-fields", type=int, default=None)
    ap.add_argument("--write", action="store_true", help="store B's transferred stochastic_std in its model_index.json")
    args = ap.parse_args()

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.calibration import transfer_spread, write_stochastic_std
    from dpdm_diffusers.glosea4 import load_glosea4_benchmark
    from dpdm_diffusers.io import portable_command

    bench = load_glosea4_benchmark()
    a, b = DownscalingPipeline.from_pretrained(args.model_a), DownscalingPipeline.from_pretrained(args.model_b)
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    res = transfer_spread(a, month(bench, "2011-11", args.max_fields), b, month(bench, "2011-12", args.max_fields),
                          num_members=args.members, num_inference_steps=args.steps, seed=0)
    old = list(b.config.stochastic_std)
    lines = [
        "# Spread transfer: the refit default model calibrated without held-out data", "",
        f"Command: `{portable_command(['python', *sys.argv])}`; {args.members} members, DPM-Solver++ {args.steps} steps.", "",
        f"- Model A on its last training month 2011-11, at the spread calibrated on 2011-12: spread-skill "
        f"{res['reference_ssr']:.3f} (fair CRPS {res['reference_crps']:.4f} K).",
        f"- Model B on its last training month 2011-12: spread-skill {res['ssr_uncalibrated']:.3f} at its stored "
        f"spread, {res['ssr']:.3f} after scaling by {res['factor']:.4f} (CRPS {res['crps_uncalibrated']:.4f} -> "
        f"{res['crps']:.4f} K).",
        f"- B's stochastic_std: {old[0]:.4f} -> {res['stochastic_std'][0]:.4f}" + (" (written)." if args.write else "."),
    ]
    if args.write:
        write_stochastic_std(args.model_b, res["stochastic_std"])
    out = ROOT / "benchmarks" / "results" / "spread_transfer.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
