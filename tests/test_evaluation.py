"""The quality benchmark's glue: baseline and conservation rows, rank-histogram summary, portable paths in results."""

import json
import os

import numpy as np
import pytest
import xarray as xr

from dpdm_diffusers import evaluation as E
from dpdm_diffusers import metrics
from dpdm_diffusers.io import REPO_ROOT, portable_command


def test_portable_command_records_no_machine_paths():
    script = str(REPO_ROOT / "benchmarks" / "quality_glosea4.py")
    cmd = portable_command(["python", script, "--model", str(REPO_ROOT / "models" / "x"), "--out-dir=/scratch/me/run1",
                            "--members", "1,10"])
    assert cmd == "python benchmarks/quality_glosea4.py --model models/x --out-dir=run1 --members 1,10"
    assert portable_command(f"python {script} --steps 2") == "python benchmarks/quality_glosea4.py --steps 2"


def test_member_labels_and_ensemble_rows():
    assert E.member_label(1) == "DPDM 1 member"
    assert E.member_label(33, conserved=True) == "DPDM 33-member mean + conservation"
    ens = xr.DataArray(np.arange(4 * 3.0).reshape(4, 3), dims=("member", "x"))
    rows = E.ensemble_forecasts(ens, [3, 1, 3], conserved=True)
    assert list(rows) == ["DPDM 1 member + conservation", "DPDM 3-member mean + conservation"]
    assert "member" not in rows["DPDM 1 member + conservation"].dims
    assert rows["DPDM 3-member mean + conservation"].sizes["member"] == 3
    with pytest.raises(ValueError, match="Unknown baselines"):
        E.evaluate_glosea4("unused", baselines=("lerp", "nearest"))


def fake_result(tmp_path, m=5):
    rng = np.random.default_rng(0)
    lat, lon = np.linspace(-60, 60, 16), np.arange(24) * 2.0
    coords = {"realization": [0, 1], "time": [0], "lat": lat, "lon": lon}
    truth = xr.DataArray(280 + rng.normal(size=(2, 1, 16, 24)), dims=tuple(coords), coords=coords, name="ts")
    ens = xr.concat([truth + rng.normal(0, 0.5, truth.shape) for _ in range(m)], "member")
    lerp = truth + rng.normal(0, 1, truth.shape)
    forecasts = {"Lerp": lerp, E.member_label(1): ens.isel(member=0), E.member_label(m): ens,
                 "Lerp + conservation": lerp, E.member_label(m, True): ens}
    table = metrics.score_table(truth, forecasts, regions=("global",))
    config = {"model": str(REPO_ROOT / "models" / "dpdm-glosea4-ts-x4"), "regression_model": str(tmp_path / "reg"),
              "scheduler": "dpmsolver++", "num_inference_steps": 2, "members": [1, m], "seed": 0, "fields": 2,
              "benchmark": "test", "member_labels": {E.member_label(1): 1, E.member_label(m): m},
              "conserved_member_labels": {E.member_label(m, True): m}}
    hists = {f"DPDM {m} members": E.rank_histogram_summary(ens, truth)}
    return E.EvaluationResult(table=table, markdown=metrics.to_markdown(table), members=ens, truth=truth, lerp=lerp,
                              config=config, timings={"pipeline_s": 1.0}, rank_histograms=hists)


def test_rank_histogram_summary_and_markdown(tmp_path):
    res = fake_result(tmp_path)
    h = res.rank_histograms["DPDM 5 members"]
    assert h["members"] == 5 and len(h["counts"]) == 6 and sum(h["counts"]) == 2 * 16 * 24
    assert h["outside_expected"] == pytest.approx(2 / 6)
    assert 0 <= h["reliability_index"] <= 2 and 0 <= h["outside_fraction"] <= 1
    md = E.rank_histogram_markdown(res.rank_histograms)
    assert "reliability index RI = sum_k |n_k / N - 1 / (M + 1)|" in md
    assert f"RI {h['reliability_index']:.3f}, outside {h['outside_fraction']:.3f} (calibrated: 0.333)" in md
    assert E.rank_histogram_markdown({}) == ""


def test_write_report_records_relative_paths(tmp_path):
    res = fake_result(tmp_path)
    out = tmp_path / "results"
    E.write_report(res, out, command=["python", str(REPO_ROOT / "benchmarks" / "quality_glosea4.py"),
                                      "--out-dir", str(out)])
    text = (out / "quality_glosea4.json").read_text() + (out / "quality_glosea4.md").read_text()
    for machine_path in (str(REPO_ROOT), str(tmp_path), os.path.expanduser("~")):
        assert machine_path not in text
    data = json.loads((out / "quality_glosea4.json").read_text())
    assert data["config"]["model"] == "models/dpdm-glosea4-ts-x4"
    assert data["command"] == "python benchmarks/quality_glosea4.py --out-dir results"
    assert data["rank_histograms"]["DPDM 5 members"]["members"] == 5
    md = (out / "quality_glosea4.md").read_text()
    assert "**Rank histograms**" in md and "DPDM 5-member mean + conservation" in md
    assert (out / "quality_glosea4_skill_vs_members.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore")
def test_evaluate_glosea4_rows_with_a_tiny_model(tmp_path):
    """End to end on one real test field with a seeded random tiny UNet: every row is there, conservation holds."""
    pytest.importorskip("iris_sample_data", reason="needs the data extra: pip install 'dpdm-diffusers[data]'")
    pytest.importorskip("pvlib", reason="needs the data extra: pip install 'dpdm-diffusers[data]'")
    from conftest import make_pipeline

    from dpdm_diffusers.conservation import block_mean
    from dpdm_diffusers.glosea4 import load_glosea4_benchmark

    make_pipeline(variables=("surface_temperature",)).save_pretrained(tmp_path / "tiny")
    res = E.evaluate_glosea4(str(tmp_path / "tiny"), members=(1, 3), regression_model=str(tmp_path / "tiny"),
                             num_inference_steps=1, max_fields=1, regions=("global",), progress=False, few_step=2)
    methods = list(dict.fromkeys(res.table["method"]))
    assert methods == [
        "Lerp", "Bicubic", "Lerp + lapse rate", "Bicubic + lapse rate", "Regression UNet",
        "DPDM 1 member", "DPDM 3-member mean", "DPDM 3-member mean, 2 steps",
        "Lerp + conservation", "Lerp + lapse rate + conservation", "Regression UNet + conservation",
        "DPDM 1 member + conservation", "DPDM 3-member mean + conservation", "DPDM 3-member mean, 2 steps + conservation",
    ]
    assert res.config["few_step"] == 2 and "few_step_pipeline_s" in res.timings
    score = {(r.method, r.metric): r.value for r in res.table.itertuples()}
    # the input is the block mean of the truth, so conservation can only lower the error (L2 projection)
    for row in ("Lerp", "DPDM 1 member", "DPDM 3-member mean", "Regression UNet"):
        assert score[(row + " + conservation", "RMSE")] <= score[(row, "RMSE")] + 1e-6
    assert np.isfinite(score[("DPDM 3-member mean + conservation", "CRPS")])
    assert np.isfinite(score[("DPDM 3-member mean + conservation", "SSR")])
    _, low = load_glosea4_benchmark().split("test")
    low = low["surface_temperature"].isel(realization=slice(0, 1)).values
    np.testing.assert_allclose(block_mean(res.conserved_members.values, 4), np.broadcast_to(low, (3, *low.shape)),
                               rtol=0, atol=1e-3)
    assert set(res.rank_histograms) == {"DPDM 3 members", "DPDM 3 members + conservation"}
    assert res.config["conservation"] and res.config["baselines"] == list(E.BASELINES)
    plain = E.evaluate_glosea4(str(tmp_path / "tiny"), members=(1,), baselines=("lerp",), num_inference_steps=1,
                               max_fields=1, regions=("global",), conservation=False, progress=False)
    assert list(dict.fromkeys(plain.table["method"])) == ["Lerp", "DPDM 1 member"]
    assert plain.conserved_members is None and plain.rank_histograms == {}
    with pytest.raises(ValueError, match="two-stage"):  # a spread factor needs a stochastic_std to scale
        E.evaluate_glosea4(str(tmp_path / "tiny"), members=(2,), baselines=(), max_fields=1, regions=("global",),
                           conservation=False, progress=False, few_step=1, few_step_spread=1.5)
