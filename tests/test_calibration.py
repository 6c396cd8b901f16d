"""Spread calibration of two-stage pipelines: recovers a known spread factor; refuses one-stage models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pipeline

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.calibration import calibrate_spread


def two_stage():
    diffusion, regression = make_pipeline(seed=0), make_pipeline(seed=1)
    cfg = {k: v for k, v in diffusion.config.items() if not k.startswith("_") and k not in diffusion.components}
    pipe = DownscalingPipeline(unet=diffusion.unet, scheduler=diffusion.scheduler, regression_unet=regression.unet,
                               **{**cfg, "stochastic_std": [0.5]})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibration_recovers_the_spread_of_an_exchangeable_truth(low_res, static):
    pipe = two_stage()
    center = pipe.regression_pipeline()(low_res, static_fields=static).mean.tas
    cfg = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components}
    alone = DownscalingPipeline(unet=pipe.regression_unet, scheduler=pipe.scheduler,
                                **{**cfg, "objective": "regression", "stochastic_std": None})
    # the first stage alone is the regression pipeline of the same UNet
    np.testing.assert_allclose(center, alone(low_res, static_fields=static).mean.tas, rtol=1e-6)
    # truth = an independent sample (another seed) whose deviation from the mean is twice the model's
    sample = pipe(low_res, static_fields=static, num_inference_steps=2, generator=torch.Generator().manual_seed(123)).members.tas[0]
    truth = (center + 2.0 * (sample - center)).rename("tas").to_dataset()
    res = calibrate_spread(pipe, low_res, truth, static_fields=static, num_members=8, num_inference_steps=2)
    assert 1.5 <= res["factor"] <= 2.7
    assert res["crps"] < res["crps_uncalibrated"] and res["ssr_uncalibrated"] < 0.75 and 0.75 < res["ssr"] < 1.3
    assert res["stochastic_std"] == pytest.approx([0.5 * res["factor"]])
    assert pipe.config.stochastic_std == [0.5]  # the pipeline itself is left alone


def test_calibration_needs_a_two_stage_model(pipe, low_res, static):
    with pytest.raises(ValueError, match="two-stage"):
        calibrate_spread(pipe, low_res, low_res, static_fields=static)
    with pytest.raises(ValueError, match="no regression_unet"):
        pipe.regression_pipeline()


def test_calibration_targets_spread_skill_one_or_the_lowest_crps(low_res, static):
    pipe = two_stage()
    center = pipe.regression_pipeline()(low_res, static_fields=static).mean.tas
    sample = pipe(low_res, static_fields=static, num_inference_steps=2, generator=torch.Generator().manual_seed(7)).members.tas[0]
    # an error the spread does not explain (a fixed offset plus a scaled sample): the two targets now disagree
    truth = (center + 2.0 * (sample - center) + 0.3).rename("tas").to_dataset()
    kw = dict(static_fields=static, num_members=6, num_inference_steps=2)
    by_ssr = calibrate_spread(pipe, low_res, truth, target="ssr", **kw)
    by_crps = calibrate_spread(pipe, low_res, truth, target="crps", **kw)
    ssrs = [r["ssr"] for r in by_ssr["curve"]]
    assert abs(np.log(by_ssr["ssr"])) == pytest.approx(min(abs(np.log(s)) for s in ssrs))
    assert by_crps["crps"] == pytest.approx(min(r["crps"] for r in by_crps["curve"]))
    assert by_ssr["target"] == "ssr" and by_crps["target"] == "crps"
    with pytest.raises(ValueError, match="calibration target"):
        calibrate_spread(pipe, low_res, truth, target="mae", **kw)


def test_a_spread_skill_target_and_its_transfer_to_a_refit_model(low_res, static):
    """transfer_spread: B is scaled to A's in-sample spread-skill (for a refit that keeps no held-out data)."""
    from dpdm_diffusers.calibration import transfer_spread

    a, b = two_stage(), two_stage()
    b.register_to_config(stochastic_std=[0.2])  # B's spread measured on training batches: too narrow
    center = a.regression_pipeline()(low_res, static_fields=static).mean.tas
    sample = a(low_res, static_fields=static, num_inference_steps=2, generator=torch.Generator().manual_seed(5)).members.tas[0]
    truth = (center + 1.5 * (sample - center)).rename("tas").to_dataset()
    kw = dict(num_members=6, num_inference_steps=2)
    half = calibrate_spread(a, low_res, truth, static_fields=static, target_ssr=0.5, **kw)
    assert abs(np.log(half["ssr"] / 0.5)) == pytest.approx(min(abs(np.log(r["ssr"] / 0.5)) for r in half["curve"]))
    res = transfer_spread(a, (low_res, truth, static), b, (low_res, truth, static), **kw)
    ref = calibrate_spread(a, low_res, truth, static_fields=static, factors=(1.0,), **kw)
    assert res["reference_ssr"] == pytest.approx(ref["ssr"]) and res["target_ssr"] == pytest.approx(ref["ssr"])
    assert abs(np.log(res["ssr"] / ref["ssr"])) == pytest.approx(min(abs(np.log(r["ssr"] / ref["ssr"])) for r in res["curve"]))
    assert res["factor"] > 1.5  # B's narrow spread is widened towards A's in-sample spread-skill
    with pytest.raises(ValueError, match="target_ssr"):
        calibrate_spread(a, low_res, truth, static_fields=static, target_ssr=0, **kw)
