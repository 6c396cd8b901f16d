"""The shipped default model (models/) loads and downscales real data; the demo runs end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "dpdm-glosea4-ts-x4"
REGRESSION = ROOT / "models" / "regression-glosea4-ts-x4"


@pytest.mark.parametrize("folder", [MODEL, REGRESSION])
def test_shipped_folders_are_complete_safetensors_pipelines(folder):
    assert (folder / "model_index.json").exists(), f"{folder} is not shipped"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(folder.rglob("*.bin"))
    card = (folder / "README.md").read_text()
    assert card.startswith("---") and "library_name: diffusers" in card


def test_default_model_is_two_stage_on_the_shipped_baseline():
    from dpdm_diffusers import DownscalingPipeline

    pipe = DownscalingPipeline.from_pretrained(MODEL)
    reg = DownscalingPipeline.from_pretrained(REGRESSION)
    assert (MODEL / "regression_unet" / "diffusion_pytorch_model.safetensors").exists()
    assert pipe.regression_unet is not None and 0 < pipe.config.stochastic_std[0] < 1
    shipped = pipe.regression_unet.state_dict()
    assert all(torch.equal(shipped[k], w) for k, w in reg.unet.state_dict().items())  # the baseline is its mean
    pipe.scheduler.set_timesteps(10)
    assert int(pipe.scheduler.timesteps[0]) < 999  # never the t = 999 step where x0 blows up


def test_shipped_model_downscales_the_real_test_month_in_two_steps():
    pytest.importorskip("iris")
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.glosea4 import VARIABLE, load_glosea4_benchmark

    pipe = DownscalingPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    bench = load_glosea4_benchmark()
    truth, low = bench.split("test")
    low = low.isel(realization=[0])
    out = pipe(low, static_fields=bench.static, num_members=2, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), tiles_per_call=32)
    m = out.members[VARIABLE]
    assert m.shape == (2, 1, 1, 144, 192) and np.isfinite(m.values).all()
    # a trained model stays in the physical range of surface temperature
    assert 180 < float(m.min()) and float(m.max()) < 340


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the subprocess's own limit, above the suite's 600 s per test
def test_demo_runs_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dpdm_diffusers.cli", "demo", "--out-dir", str(tmp_path), "--max-fields", "2"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| Lerp |" in res.stdout and (tmp_path / "demo.nc").exists() and (tmp_path / "demo.png").stat().st_size > 10000


def test_card_model_index_holds_the_recorded_benchmark_scores():
    """The Hub shows the card's model-index: it must be the quality benchmark's numbers (benchmarks/card_scores.py)."""
    import importlib.util

    from huggingface_hub import ModelCard

    spec = importlib.util.spec_from_file_location("card_scores", ROOT / "benchmarks" / "card_scores.py")
    card_scores = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card_scores)
    expected = card_scores.card_scores(json.loads((ROOT / "benchmarks/results/quality_glosea4.json").read_text()))
    assert len(expected) >= 8
    for path in card_scores.CARDS:
        results = {r.metric_name: r.metric_value for r in ModelCard.load(path).data.eval_results}
        assert results == {k: round(v, 4) for k, v in expected.items()}
