"""Quality benchmark glosea4-ts-x4: evaluate a trained model on the test month (trains nothing).

    python benchmarks/quality_glosea4.py --model models/dpdm-glosea4-ts-x4 \
        --regression-model models/regression-glosea4-ts-x4 --members 1,10,33 --scheduler dpmsolver++ --steps 10 \
        --few-step 4

Writes benchmarks/results/quality_glosea4.md and .json (Table 1 of the paper per region, plus CRPS,
spread-skill and the training-climatology ACC; the Lerp + lapse rate baselines; every DPDM row, Lerp,
Lerp + lapse rate and the regression model also after conservation; the global rank histogram of the
largest ensemble with its flatness) and the figures beside them. Paths are recorded relative to the
repository. A quick check of the whole path (a minute on a CPU), written elsewhere:

    python benchmarks/quality_glosea4.py --max-fields 1 --members 1,2 --steps 2 --out-dir /tmp/quality-smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def few_step_spread(scheduler: str, steps: int, few: int) -> float:
    """Ratio of the spread factors calibrated for ``few`` and ``steps`` steps in benchmarks/results/samplers.json."""
    import json

    rows = json.loads((ROOT / "benchmarks" / "results" / "samplers.json").read_text()).get("calibrated", [])
    factor = {r["steps"]: r["factor"] for r in rows if r["sampler"] == scheduler}
    if steps not in factor or few not in factor:
        raise SystemExit(f"benchmarks/results/samplers.json has no calibrated {scheduler} rows for {steps} and {few} "
                         "steps: run benchmarks/samplers.py or pass --few-step-spread.")
    return factor[few] / factor[steps]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"))
    ap.add_argument("--regression-model", default=str(ROOT / "models" / "regression-glosea4-ts-x4"))
    ap.add_argument("--members", default="1,10,33")
    ap.add_argument("--scheduler", default="dpmsolver++")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-fields", type=int, default=None)
    ap.add_argument("--baselines", default="lerp,bicubic,lerp_lapse,bicubic_lapse",
                    help="comma-separated names from dpdm_diffusers.evaluation.BASELINES")
    ap.add_argument("--no-conservation", action="store_true", help="skip the '+ conservation' rows")
    ap.add_argument("--few-step", type=int, default=None,
                    help="also sample the largest ensemble with this many steps (rows '..., N steps')")
    ap.add_argument("--few-step-spread", type=float, default=None,
                    help="its spread factor relative to --steps (default: from benchmarks/results/samplers.json, "
                         "calibrated for each step count on the December window)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    from dpdm_diffusers.evaluation import evaluate_glosea4, write_report

    reg = args.regression_model if Path(args.regression_model).exists() else None
    spread = args.few_step_spread
    if args.few_step and spread is None:
        spread = few_step_spread(args.scheduler, args.steps, args.few_step)
    result = evaluate_glosea4(
        args.model, members=[int(m) for m in args.members.split(",")],
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()],
        regression_model=reg, scheduler=args.scheduler, num_inference_steps=args.steps, seed=args.seed,
        max_fields=args.max_fields, conservation=not args.no_conservation,
        few_step=args.few_step, few_step_spread=spread if args.few_step else 1.0,
    )
    # write_report records the command with paths made relative (io.portable_command)
    figs = write_report(result, args.out_dir, command=["python", *sys.argv])
    print(result.markdown)
    print("figures:", figs)


if __name__ == "__main__":
    main()
