"""The README's "Bring your own region" recipe runs as written (fewer steps and members) on real HadCM3 data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.heavy,  # a subprocess end-to-end run: `make test-heavy`
              pytest.mark.timeout(900)]  # above the subprocess's own 600 s, so its error message is the one seen


def recipe_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Bring your own region"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_region_recipe_runs_end_to_end(tmp_path):
    pytest.importorskip("iris_sample_data")
    pytest.importorskip("pvlib")
    script = recipe_block()
    fast = {"--steps 600": "--steps 2", "--regression-steps 600": "--regression-steps 2", "--members 10": "--members 2",
            "('2050', '2099')": "('2096', '2099')", "--validation-time 2001,2020": "--validation-time 2001,2003"}
    for long, short in fast.items():  # fewer steps, members and years; the substitutions must keep matching
        assert long in script
        script = script.replace(long, short)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    model = tmp_path / "runs" / "gulf-coast"
    assert (model / "model_index.json").exists() and (model / "stage1-regression" / "model_index.json").exists()
    config = json.loads((model / "model_index.json").read_text())  # the persistence training measured on 1860-2000
    assert config["noise_time_unit"] == "year" and 0.0 <= config["noise_time_correlation"] <= 0.95
    card = (model / "README.md").read_text()
    assert "## Spread calibration" in card and "the local model `dpdm-glosea4-ts-x4`" in card and str(ROOT) not in card
    out = xr.open_dataset(tmp_path / "runs" / "a1b-fine.nc")
    assert out.air_temperature.dims == ("member", "time", "lat", "lon") and out.air_temperature.shape == (2, 4, 36, 48)
    assert np.isfinite(out.air_temperature.values).all() and 250 < float(out.air_temperature_mean.mean()) < 310
    assert "wrote stochastic_std" in res.stdout
    # then "share it", the README's next block, as written: offline, through the Hugging Face cache
    text = (ROOT / "README.md").read_text()
    share = re.search(r"Then share it.*?```python\n(.*?)```", text, re.S).group(1)
    res = subprocess.run([sys.executable, "-c", share], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "HF_HUB_CACHE": str(tmp_path / "hf-cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    snapshot = next((tmp_path / "hf-cache" / "models--you--dpdm-gulf-coast" / "snapshots").iterdir())
    assert 'from_pretrained("you/dpdm-gulf-coast")' in (snapshot / "README.md").read_text()
