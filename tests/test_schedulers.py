"""Every diffusers scheduler the pipeline lists as compatible samples the shipped model sanely, from any config the
project writes (the default training schedule and the shipped sampler), with any timestep spacing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.modeling import default_scheduler

MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "dpdm-glosea4-ts-x4")


@pytest.fixture(scope="module")
def shipped():
    from dpdm_diffusers.glosea4 import load_glosea4_benchmark

    pipe = DownscalingPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    bench = load_glosea4_benchmark()
    _, low = bench.split("test")
    # East Asia, one field: 12 x 8 coarse cells, one 64-px tile
    low = low.isel(realization=[0], time=[0]).sel(lat=slice(0, 60), lon=slice(90, 150))
    return pipe, low


def compatible_classes(pipe):
    """The pipeline's compatible schedulers that install without extra packages (DPMSolverSDE needs torchsde)."""
    out = []
    for cls in pipe.scheduler.compatibles:
        try:
            cls.from_config(pipe.scheduler.config)
        except ImportError:
            continue
        out.append(cls)
    return sorted(out, key=lambda c: c.__name__)


@pytest.mark.parametrize("config_name", ["default", "shipped"])
def test_every_compatible_scheduler_gives_finite_output_in_the_data_range(shipped, config_name):
    pipe, low = shipped
    config = default_scheduler().config if config_name == "default" else pipe.scheduler.config
    values = low.surface_temperature.values
    lo, hi = float(values.min()) - 30.0, float(values.max()) + 30.0  # fine-scale detail stays within +-30 K of the input
    checked, refused = [], []
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # EDM's "unexpected config" warning would print the 960 betas
    original = pipe.scheduler
    try:
        for cls in compatible_classes(pipe):
            for spacing in (None, "linspace", "trailing"):  # as written in the README, then every other spacing
                kwargs = {} if spacing is None else {"timestep_spacing": spacing}
                pipe.scheduler = cls.from_config(config, **kwargs)
                if hasattr(pipe.scheduler, "precondition_outputs"):  # EDM: preconditioned for EDM-trained networks
                    with pytest.raises(ValueError, match="EDM"):
                        pipe(low, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
                    refused.append(cls.__name__)
                    break
                out = pipe(low, num_members=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
                v = out.members.surface_temperature.values
                assert np.isfinite(v).all(), (cls.__name__, spacing)
                assert lo < v.min() and v.max() < hi, (cls.__name__, spacing, float(v.min()), float(v.max()))
                checked.append(cls.__name__)
    finally:
        pipe.scheduler = original
        diffusers_logging.set_verbosity(level)
    assert len(set(checked)) >= 12 and refused == ["EDMEulerScheduler"]


@pytest.mark.slow
def test_full_length_ddpm_reference_stays_in_range_without_clipping(shipped):
    """All 960 steps of ancestral DDPM, unclipped: before the schedule ended at t = 959 its first step alone (t = 999,
    alpha_bar 2e-9) gave thousands of kelvin; the reference then needed x0 clipping."""
    from diffusers import DDPMScheduler

    from dpdm_diffusers.modeling import NUM_TRAIN_TIMESTEPS

    pipe, low = shipped
    original = pipe.scheduler
    try:
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        assert not pipe.scheduler.config.clip_sample
        out = pipe(low, num_inference_steps=NUM_TRAIN_TIMESTEPS, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.scheduler = original
    v, x = out.members.surface_temperature.values, low.surface_temperature.values
    assert np.isfinite(v).all() and float(x.min()) - 30 < v.min() and v.max() < float(x.max()) + 30
