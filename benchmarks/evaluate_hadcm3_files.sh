#!/usr/bin/env bash
# `dpdm evaluate` on files only, as a user outside this project would run it: HadCM3 A1B truth, its coarse input,
# and the ensemble `dpdm downscale` wrote from that input with the model fine-tuned by benchmarks/climate_signal.py.
#   bash benchmarks/evaluate_hadcm3_files.sh      # about 4 CPU-minutes; writes benchmarks/results/evaluate_hadcm3/
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/climate/hadcm3-1860-1950}
WORK=runs/climate/files
mkdir -p "$WORK"
python - "$WORK" <<'PY'
import sys
import xarray as xr
sys.path.insert(0, "benchmarks")
from climate_signal import load_scenario
from dpdm_diffusers.data import coarsen
work = sys.argv[1]
truth = load_scenario("A1B")
truth.to_netcdf(f"{work}/a1b_truth.nc")
coarsen(truth, 4).to_netcdf(f"{work}/a1b_coarse.nc")
PY
rm -rf "$WORK/a1b_dpdm.nc"
dpdm downscale "$WORK/a1b_coarse.nc" -o "$WORK/a1b_dpdm.nc" --model "$MODEL" \
    --variable air_temperature=surface_temperature --members 10 --steps 10 --quiet
dpdm evaluate --truth "$WORK/a1b_truth.nc" --forecast "dpdm=$WORK/a1b_dpdm.nc" --low-res "$WORK/a1b_coarse.nc" \
    --reference 1961,1990 --future 2070,2099 --out-dir benchmarks/results/evaluate_hadcm3 > /dev/null
echo "wrote benchmarks/results/evaluate_hadcm3/scores.md"
