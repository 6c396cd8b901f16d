#!/usr/bin/env bash
# Two two-stage glosea4-ts-x4 models trained with one recipe, so that a refit can borrow a held-out calibration:
#   A: trained on the training months (2011-08..11); its spread calibrated on the validation month (2011-12);
#   B: the same recipe refit on training + validation months (2011-08..12), its spread scaled by A's factor
#      (A's validation month lies one month past A's data, as the test month 2012-01 lies one month past B's).
# Neither ever sees the test month (train_dpdm refuses ranges that reach it).
#
#   benchmarks/refit_glosea4.sh OUT_DIR [STEPS=1500] [BATCH=64] [PRECISION=bf16]
#
# On a machine without iris/pvlib, point DPDM_GLOSEA4_NETCDF at a copy made with
# dpdm_diffusers.glosea4.save_glosea4_netcdf. CAL_SAMPLES (default 13) sets the validation fields calibrated on.
set -euo pipefail
out=$1; steps=${2:-1500}; batch=${3:-64}; mp=${4:-bf16}
common=(--dataset glosea4-ts-x4 --unet_preset fast --train_batch_size "$batch" --mixed_precision "$mp"
        --max_train_steps "$steps" --learning_rate 2e-4 --lr_warmup_steps 200 --checkpointing_steps 0
        --validation_steps 0 --report_to none --seed 0)
train() { python -m dpdm_diffusers.training.train_dpdm "${common[@]}" "$@"; }
refit=(--train_time 2011-08,2011-12)

train --objective regression --output_dir "$out/regression-A"
train --objective diffusion --regression_model "$out/regression-A" --calibrate_spread true \
      --calibration_members 8 --calibration_max_samples "${CAL_SAMPLES:-13}" --output_dir "$out/dpdm-A"
factor=$(python -c "import json; print(json.load(open('$out/dpdm-A/training_summary.json'))['spread_calibration']['factor'])")
echo "spread factor of A on the validation month: $factor"
train --objective regression "${refit[@]}" --output_dir "$out/regression-B"
train --objective diffusion --regression_model "$out/regression-B" "${refit[@]}" --calibrate_spread false \
      --spread_factor "$factor" --output_dir "$out/dpdm-B"
