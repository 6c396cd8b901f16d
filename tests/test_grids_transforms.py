"""Grid refinement and interpolation, and the physical <-> model-space transforms."""

import numpy as np
import pytest
import torch

from dpdm_diffusers.grids import Grid, block_mean, check_regular, interpolate, is_global_lon, refine
from dpdm_diffusers.transforms import Normalizer


def test_refine_splits_each_cell():
    np.testing.assert_allclose(refine([0.5, 1.5], 2), [0.25, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(refine([1.5, 0.5], 2), [1.75, 1.25, 0.75, 0.25])  # descending stays descending


def test_block_mean_then_refine_is_consistent():
    lat = np.arange(8) + 0.5
    coarse = block_mean(lat[None, :, None].repeat(4, 2)[0], 4)
    np.testing.assert_allclose(coarse[:, 0], [2.0, 6.0])
    np.testing.assert_allclose(refine([2.0, 6.0], 4), lat)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_interpolation_is_exact_for_linear_fields_inside_the_domain(method):
    src = Grid(np.arange(5.0), np.arange(6.0) + 10)
    dst = src.refine(4)
    yy, xx = np.meshgrid(src.lat, src.lon, indexing="ij")
    out = interpolate(2 * yy + 3 * xx, src, dst, method)
    ty, tx = np.meshgrid(dst.lat, dst.lon, indexing="ij")
    inside = (ty >= 0) & (ty <= 4) & (tx >= 10) & (tx <= 15)
    # scipy's cubic solver is iterative: exact to ~1e-4 here, bilinear to rounding
    np.testing.assert_allclose(out[inside], (2 * ty + 3 * tx)[inside], atol=1e-9 if method == "bilinear" else 1e-3)
    # beyond the outer centres values are held, never extrapolated
    assert out.max() <= (2 * yy + 3 * xx).max() + 1e-3


def test_periodic_longitude_interpolates_across_the_seam():
    lon = np.arange(0, 360, 30.0) + 15
    src = Grid(np.array([-10.0, 10.0]), lon)
    assert src.periodic and is_global_lon(lon)
    vals = np.cos(np.deg2rad(lon))[None].repeat(2, 0)
    out = interpolate(vals, src, Grid(np.array([0.0, 1.0]), np.array([0.0, 359.0])))
    # 0 deg lies between 345 and 15: the average of cos(345) and cos(15)
    np.testing.assert_allclose(out[0, 0], np.cos(np.deg2rad(15)), rtol=1e-9)
    assert abs(out[0, 0] - out[0, 1]) < 0.02


def test_batch_dims_and_nan_propagation():
    src = Grid(np.arange(4.0), np.arange(4.0))
    vals = np.ones((2, 3, 4, 4))
    vals[1, 2, 0, 0] = np.nan
    out = interpolate(vals, src, src.refine(2))
    assert out.shape == (2, 3, 8, 8)
    assert np.isnan(out[1, 2, 0, 0]) and np.isfinite(out[1, 2, -1, -1]) and np.isfinite(out[0]).all()


def test_check_regular_messages():
    with pytest.raises(ValueError, match="duplicated"):
        check_regular([0, 1, 1, 2], "lat")
    with pytest.raises(ValueError, match="not monotonic"):
        check_regular([0, 2, 1, 3], "lat")
    with pytest.raises(ValueError, match="irregular"):
        check_regular([0, 1, 2, 4], "lon")
    with pytest.raises(ValueError, match="at least 2"):
        check_regular([0.0], "lat")


def test_grid_scale_factor_checks_both_axes():
    coarse = Grid(np.arange(4.0), np.arange(4.0))
    assert coarse.scale_factor_to(coarse.refine(4)) == pytest.approx(4)
    with pytest.raises(ValueError, match="differs between lat"):
        coarse.scale_factor_to(Grid(refine(coarse.lat, 4), refine(coarse.lon, 2)))


def make_norm(prediction="residual"):
    return Normalizer(
        variables=["tas", "pr"], transforms=["identity", "log1p"], mean=[280.0, 1.0], std=[10.0, 0.5],
        residual_std=[0.2, 0.3], static_channels=["topography"], static_mean=[500.0], static_std=[800.0],
        prediction=prediction,
    )


def test_normalize_round_trip_and_log1p_is_non_negative():
    n = make_norm()
    x = torch.stack([torch.full((4, 4), 285.0), torch.linspace(0, 20, 16).view(4, 4)])
    torch.testing.assert_close(n.denormalize(n.normalize(x)), x, rtol=1e-5, atol=1e-4)
    z = n.normalize(x)
    assert z[0, 0, 0] == pytest.approx(0.5)
    assert z[1, 0, 0] == pytest.approx((0.0 - 1.0) / 0.5)
    z[1] = -100.0  # far below any real value: expm1 would be negative
    assert (n.denormalize(z)[1] >= 0).all()


@pytest.mark.parametrize("prediction", ["residual", "full"])
def test_model_space_round_trip(prediction):
    n = make_norm(prediction)
    hr = torch.stack([torch.randn(8, 8) + 280, torch.rand(8, 8) * 5]).unsqueeze(0)
    lerp = hr + 0.1 * torch.randn_like(hr)
    lerp[:, 1].clamp_(min=0)
    x = n.to_model_space(hr, lerp)
    if prediction == "residual":  # residual scaled by residual_std: small errors become O(1)
        assert x.abs().mean() > (n.normalize(hr) - n.normalize(lerp)).abs().mean()
    torch.testing.assert_close(n.from_model_space(x, n.normalize(lerp)), hr, rtol=1e-4, atol=1e-3)


def test_condition_stacks_normalised_lerp_and_static():
    n = make_norm()
    lerp = torch.stack([torch.full((4, 4), 290.0), torch.zeros(4, 4)]).expand(3, 2, 4, 4)
    c = n.condition(lerp, torch.full((1, 4, 4), 1300.0))
    assert c.shape == (3, 3, 4, 4)
    assert c[0, 0, 0, 0] == pytest.approx(1.0) and c[2, 2, 0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Static fields"):
        n.condition(lerp, None)


def test_invalid_normalizer_configs():
    with pytest.raises(ValueError, match="entries for 2 variables"):
        Normalizer(["a", "b"], ["identity"], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="Unknown transform"):
        Normalizer(["a"], ["cbrt"], [0], [1])
    with pytest.raises(ValueError, match="> 0"):
        Normalizer(["a"], ["identity"], [0], [0])
    with pytest.raises(ValueError, match="prediction"):
        Normalizer(["a"], ["identity"], [0], [1], prediction="x0")
