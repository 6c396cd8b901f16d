"""DevicePatchSampler: the same crops, masks, flips and redraws as RandomPatchDataset, a batch per gather,
keyed by (seed, process, step)."""

import numpy as np
import pytest
import torch

from dpdm_diffusers.device_patches import DevicePatchSampler, fits_on_device
from dpdm_diffusers.samples import RandomPatchDataset, normalize_fields
from tests.test_samples import LON_REGIONAL, NX, NY, P, expected_item, make, stacked


def sampler_for(fields, batch=16, process=0, **kw):
    return DevicePatchSampler(RandomPatchDataset(fields, P, **kw), batch, "cpu", process)


def test_batch_crops_match_the_normalizer_and_wrap_the_periodic_seam():
    hr, lerp, static, nz = make()
    fields = normalize_fields(hr, lerp, nz, static)
    hr_t, lerp_t, static_t = stacked(hr), stacked(lerp), torch.from_numpy(static.to_array("c").values)
    sampler = sampler_for(fields, batch=64, seed=3)
    batch = sampler.batch(0)
    assert batch["target"].shape == (64, 2, P, P) and batch["condition"].shape == (64, 4, P, P)
    assert batch["target"].dtype == torch.float32 and batch["mask"].dtype == torch.bool
    wrapped = 0
    for i in range(64):
        item = {k: batch[k][i] for k in ("sample", "y", "x")}
        t, c = expected_item(hr_t, lerp_t, static_t, nz, item)
        torch.testing.assert_close(batch["target"][i], t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["condition"][i], c, rtol=1e-5, atol=1e-5)
        wrapped += int(item["x"]) + P > NX
    assert wrapped > 0  # some crops cross the 360-degree seam
    assert set(batch["sample"].tolist()) <= set(range(fields.num_samples)) and batch["y"].max() <= NY - P


def test_regional_grid_never_wraps_and_small_domains_are_padded():
    hr, lerp, static, nz = make(lon=LON_REGIONAL)
    fields = normalize_fields(hr, lerp, nz, static)
    assert int(sampler_for(fields, batch=256).batch(0)["x"].max()) <= NX - P
    padded = DevicePatchSampler(RandomPatchDataset(fields, NY + 1), 4, "cpu").batch(0)
    assert padded["target"].shape[-2] == NY + 1 and not padded["mask"][:, :, NY:].any()


def test_batches_are_a_function_of_seed_process_and_step():
    hr, lerp, static, nz = make()
    fields = normalize_fields(hr, lerp, nz, static)
    a, b = sampler_for(fields, seed=7), sampler_for(fields, seed=7)
    key = lambda s, step: torch.stack([s.batch(step)[k] for k in ("sample", "y", "x")])  # noqa: E731
    assert torch.equal(key(a, 5), key(b, 5))  # a resumed run at step 5 draws what the first run drew
    assert not torch.equal(key(a, 5), key(a, 6))
    assert not torch.equal(key(a, 5), key(sampler_for(fields, seed=7, process=1), 5))  # processes differ
    assert not torch.equal(key(a, 5), key(sampler_for(fields, seed=8), 5))


def test_missing_values_are_masked_and_mostly_missing_patches_redrawn():
    hr, lerp, static, nz = make(variables=("t2m",))
    hr["t2m"][..., :, 8:] = np.nan  # two thirds missing
    lerp["t2m"][..., :2, :] = np.nan
    fields = normalize_fields(hr, lerp, nz, static)
    plain = sampler_for(fields, batch=200, seed=0).batch(0)
    picky = sampler_for(fields, batch=200, seed=0, min_valid_fraction=0.75, max_tries=50).batch(0)
    for b in (plain, picky):
        assert torch.isfinite(b["target"]).all() and torch.isfinite(b["condition"]).all()
        assert (b["target"][~b["mask"]] == 0).all()
    assert plain["mask"].float().mean() < 0.5 and picky["mask"].float().mean(dim=(1, 2, 3)).min() >= 0.75


@pytest.mark.parametrize("prediction", ["residual", "full"])
def test_flips_mirror_the_crop_and_change_the_sign_of_eastward_wind(prediction):
    hr, lerp, static, nz = make()
    nz.prediction = prediction
    fields = normalize_fields(hr, lerp, nz, static, metadata={"standard_names": ["", "eastward_wind"]})
    hr_t, lerp_t, static_t = stacked(hr), stacked(lerp), torch.from_numpy(static.to_array("c").values)
    batch = sampler_for(fields, batch=80, seed=2, flips=("lon",)).batch(0)
    flipped = 0
    for i in range(80):
        item = {k: batch[k][i] for k in ("sample", "y", "x")}
        t, c = expected_item(hr_t, lerp_t, static_t, nz, item)
        if not torch.allclose(batch["target"][i], t, atol=1e-4):
            t, c = expected_item(hr_t, lerp_t, static_t, nz, item, flip_lon=True)
            flipped += 1
        torch.testing.assert_close(batch["target"][i], t, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch["condition"][i], c, rtol=1e-4, atol=1e-4)
    assert 20 < flipped < 60  # about half


def test_only_in_memory_fields_go_on_the_device():
    hr, lerp, static, nz = make()
    fields = normalize_fields(hr, lerp, nz, static)
    assert fits_on_device(fields, "cpu") and not fits_on_device(object(), "cpu")
    with pytest.raises(TypeError, match="in memory"):
        DevicePatchSampler(type("D", (), {"fields": object()})(), 4, "cpu")
