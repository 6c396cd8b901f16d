"""Five variables (2t, 10u, 10v, sp, tp) on real TIGGE data: joint vs per-variable two-stage models against
interpolation, on a test box that training never sees (the split: ``dpdm_diffusers.tigge``).

    python benchmarks/tigge_five_variables.py train     # the models, at an equal CPU budget (runs/tigge/)
    python benchmarks/tigge_five_variables.py calibrate --models joint  # re-check a spread with dpdm calibrate
    python benchmarks/tigge_five_variables.py evaluate  # benchmarks/results/tigge_five_variables.{md,json}
    python benchmarks/tigge_five_variables.py ship      # the joint model -> models/dpdm-tigge-5var-x4 (+ card)

Training goes through the training script with one YAML per model (written to runs/tigge/<name>.yaml, so each model
is one command a user can rerun: ``python -m dpdm_diffusers.training.train_dpdm --config runs/tigge/joint.yaml``;
``dpdm train`` builds the same config). A finished model is not trained again. The data: DATA.md; how to rebuild
the file: ``dpdm_diffusers/tigge.py``.

The GPU recipe is the same YAML with a bigger batch and bf16, e.g. on one H100:

    accelerate launch -m dpdm_diffusers.training.train_dpdm --config runs/tigge/joint.yaml \
        --train_batch_size 64 --mixed_precision bf16 --max_train_steps 1500 --regression_steps 1500 \
        --output_dir runs/tigge/joint-gpu

(patches are then cut on the GPU from the fields held there; not measured in this session, which had no GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpdm_diffusers import tigge  # noqa: E402

RUNS = ROOT / "runs" / "tigge"
RESULTS = ROOT / "benchmarks" / "results"
# One budget for the joint model and for the five per-variable models together (equal training steps in all;
# a step costs the same for one variable as for five: the UNet's width, not its in/out channels, sets the cost).
JOINT_STEPS = 1000  # per stage
COMMON = dict(unet_preset="fast", patch_size=64, train_batch_size=16, learning_rate=2e-4, lr_warmup_steps=50,
              two_stage=True, report_to="none", checkpointing_steps=250, validation_steps=500,
              validation_members=4, validation_max_samples=1, calibration_members=8, seed=0)


def model_configs() -> dict[str, dict]:
    """name -> training options."""
    per_var = JOINT_STEPS // len(tigge.VARIABLES)
    configs = {"joint": {**tigge.training_options(), **COMMON, "max_train_steps": JOINT_STEPS,
                         "regression_steps": JOINT_STEPS}}
    for v in tigge.VARIABLES:
        configs[f"single-{v}"] = {**tigge.training_options(variables=[v]), **COMMON, "max_train_steps": per_var,
                                  "regression_steps": per_var}
    # precipitation's transform: the per-variable tp model again with sqrt instead of the default log1p
    configs["single-tp-sqrt"] = {**configs["single-tp"], "transforms": ["sqrt"]}
    # and its interpolation: bicubic (clipped at zero by the transform) instead of bilinear
    configs["single-tp-bicubic"] = {**configs["single-tp"], "interpolation": "bicubic"}
    # the joint model at the per-variable models' length (1/5 of the budget): does it overfit the training region?
    configs["joint-short"] = {**configs["joint"], "max_train_steps": per_var, "regression_steps": per_var}
    configs["joint-short-bicubic"] = {**configs["joint-short"], "interpolation": "bicubic"}
    return configs


def train(names: list[str] | None) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    timings_file = RUNS / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for name, options in model_configs().items():
        if names and name not in names:
            continue
        out = RUNS / name
        if (out / "model_index.json").exists():
            print(f"{name}: done ({out})")
            continue
        cfg_file = RUNS / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump({**options, "output_dir": str(out)}, sort_keys=False))
        cmd = [sys.executable, "-m", "dpdm_diffusers.training.train_dpdm", "--config", str(cfg_file)]
        print(f"{name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        with open(RUNS / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        timings[name] = round(time.time() - t0, 1)
        timings_file.write_text(json.dumps(timings, indent=2))
        print(f"{name}: {timings[name]:.0f} s", flush=True)


def calibrate(name: str, options: dict) -> None:
    """The spread of a trained two-stage model checked (and re-set) per variable on the validation box with
    ``dpdm calibrate``, as a user would on their own files; recorded in runs/tigge/<name>.calibration.json. On a
    model whose training calibrated it already, the factors come out near 1. (Run for the joint model of the
    recorded results: its training calibrated 10u/10v before commit 4bdf228 fixed the dry threshold, which had
    clipped winds at zero in every pipeline output.)"""
    record = RUNS / f"{name}.calibration.json"
    if record.exists():
        return
    f = options["high_res"][0]
    (lat_s, lat_n), (lon_w, lon_e) = tigge.VALIDATION_BOX
    cmd = [str(Path(sys.executable).parent / "dpdm"), "calibrate", f, "--model", str(RUNS / name),
           f"--lat-box={lat_s},{lat_n}", f"--lon-box={lon_w},{lon_e}", "--regular-grid", "--members", "8",
           "--steps", "10", "--write", *[f"--unit={v}={u}" for v, u in options.get("units", {}).items()],
           f"--static=topography={f}", f"--static=land_sea_mask={f}", "--static-map=orog=topography",
           "--static-map=lsm=land_sea_mask"]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    record.write_text(res.stdout[res.stdout.index("{"): res.stdout.rindex("}") + 1])


SHIPPED = ROOT / "models" / "dpdm-tigge-5var-x4"


def ship(name: str = "joint") -> None:
    """A joint model (``--models NAME``, default ``joint``) as the five-variable default: weights and config (no
    checkpoints, no duplicate stage-1 folder), the test box as ``test_box.nc`` for ``dpdm demo``, and a card whose
    scores are measured now: validation with the shipped spread, and the benchmark's test-box table."""
    import shutil
    from types import SimpleNamespace

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.model_card import model_index
    from dpdm_diffusers.training.validation import validate
    from dpdm_diffusers.user_data import load_region, validation_inputs

    pipe = DownscalingPipeline.from_pretrained(RUNS / name)
    pipe.set_progress_bar_config(disable=True)
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    pipe.save_pretrained(SHIPPED)
    tigge.write_test_sample(tigge.test_split(), SHIPPED / tigge.SAMPLE_FILE)

    options = {k: v for k, v in tigge.training_options().items() if k not in ("dataset", "high_res")}
    region = load_region(tigge.training_options()["high_res"], declared_units=options.pop("units"),
                         static_channels=["topography", "land_sea_mask"], **options)
    val = validate(pipe, validation_inputs(region, 1), SimpleNamespace(validation_members=8,
                                                                       validation_inference_steps=10), seed=0)
    scores = json.loads((RESULTS / "tigge_five_variables.json").read_text())["scores"]["table"]
    pick = {(r["method"], r["variable"], r["metric"]): r["value"] for r in scores}
    ens = f"{name}, 33 members"
    metrics = {f"{label} ({v})": pick[(ens, v, m)] for v in tigge.VARIABLES
               for m, label in (("RMSE", "RMSE 33-member mean"), ("CRPS", "CRPS"), ("SSR", "spread-skill"))}
    metrics.update({f"RMSE bicubic ({v})": pick[("bicubic", v, "RMSE")] for v in tigge.VARIABLES})
    front = yaml.safe_dump({"model-index": model_index(
        "dpdm-tigge-5var-x4", metrics, dataset_name="TIGGE test box 45S-60N x 112-178E (never seen in training)",
        dataset_type="custom", dataset_split="test")}, sort_keys=False)
    card = (SHIPPED / "README.md").read_text()
    head, body = card.split("\n---\n", 1)[0], card.split("\n---\n", 1)[1]
    head = head[: head.index("model-index:")] + front
    sections = body.split("\n## ")
    keep = [sec for sec in sections[1:] if not sec.startswith(("Validation", "Spread calibration"))]
    calib = json.loads((RUNS / f"{name}.calibration.json").read_text()) if (RUNS / f"{name}.calibration.json").exists() else None
    validation = "\n".join(f"- {k}: {v:.4g}" for k, v in val.items() if "/" in k)
    text = [head + "---", "# DPDM tigge-5var-x4: 4x probabilistic downscaling of 2t, 10u, 10v, sp and tp", "",
            "A two-stage model (regression UNet mean + residual diffusion) trained from scratch with `dpdm train`'s "
            "recipe on one real ECMWF TIGGE field (0-108E; `benchmarks/tigge_five_variables.py`, "
            f"`runs/tigge/{name}.yaml`), in about 30 CPU-minutes. tp is the 120 h accumulation in mm.", ""]
    text += ["## " + sec for sec in keep if not sec.startswith("Test-box scores")]
    text += ["## Validation (the validation box 40S-40N x 60-100E, 8 members, 10 steps, the shipped spread)", "",
             validation, "", "## Spread calibration", "",
             "Per variable on the validation box during training, then checked with `dpdm calibrate` "
             + (f"(factors {calib['factors']}: 10u and 10v had been calibrated before a fix of the dry threshold, "
                "which had clipped winds at zero in every pipeline output)" if calib else "")
             + f". `stochastic_std` = {[round(x, 4) for x in pipe.config.stochastic_std]}.", "",
             f"## Test-box scores (benchmarks/results/tigge_five_variables.md; this model is `{name}` there)", "",
             (RESULTS / "tigge_five_variables.md").read_text().split("## Scores on the test box", 1)[1]
             .replace("\n## ", "\n### ")]
    (SHIPPED / "README.md").write_text("\n".join(text))
    print(f"shipped {SHIPPED}: validation {val}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "calibrate", "evaluate", "ship"])
    parser.add_argument("--models", default="", help="Comma-separated model names (default: all).")
    parser.add_argument("--members", default="1,10,33", help="Ensemble sizes scored.")
    parser.add_argument("--steps", type=int, default=10, help="Denoising steps.")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if args.phase == "train":
        train(names)
    elif args.phase == "calibrate":
        configs = model_configs()
        for name in names or list(configs):
            if (RUNS / name / "model_index.json").exists():
                calibrate(name, configs[name])
    elif args.phase == "ship":
        ship(*names[:1])
    else:
        from benchmarks.tigge_evaluation import evaluate_all  # noqa: PLC0415

        evaluate_all(RUNS, RESULTS, names or None, [int(m) for m in args.members.split(",")], args.steps)


if __name__ == "__main__":
    main()
