"""variable_map: one helper renames your names to the model's, selects, and explains a mismatch."""

import numpy as np
import pytest
import xarray as xr

from dpdm_diffusers.naming import VariableMapError, apply_variable_map, mapping_hint


def data(*names, lazy=False):
    ds = xr.Dataset({n: (("lat", "lon"), np.full((2, 3), float(i))) for i, n in enumerate(names)},
                    coords={"lat": [0.0, 1.0], "lon": [0.0, 1.0, 2.0]})
    return ds.chunk() if lazy else ds


def test_renames_selects_in_the_model_order_and_gives_the_way_back():
    ds = data("air_temperature", "pr", "time_bnds", lazy=True)
    out, back = apply_variable_map(ds, {"air_temperature": "tas"}, ["pr", "tas"])
    assert list(out.data_vars) == ["pr", "tas"] and out["tas"].chunks is not None  # lazy stays lazy
    np.testing.assert_array_equal(out["tas"], ds["air_temperature"])
    assert back == {"tas": "air_temperature"}
    assert list(out.rename(back).data_vars) == ["pr", "air_temperature"]  # the same selection in your names
    everything, _ = apply_variable_map(ds, {"air_temperature": "tas"})  # wanted=None: all, renamed
    assert list(everything.data_vars) == ["tas", "pr", "time_bnds"]
    same, none = apply_variable_map(ds, None, ["pr"])
    assert list(same.data_vars) == ["pr"] and none == {}


def test_errors_name_the_problem_and_are_key_and_value_errors():
    ds = data("air_temperature", "time_bnds")
    with pytest.raises(KeyError, match=r"The variable_map names \['nope'\], which the data does not hold"):
        apply_variable_map(ds, {"nope": "tas"}, ["tas"])
    # one missing, one spare (bounds never count): the error spells out the mapping in all three forms
    with pytest.raises(ValueError, match=r"lacks the model's variables \['tas'\].*variable_map=\{'air_temperature': 'tas'\}"
                                         r".*--variable air_temperature=tas.*variable_map: \{air_temperature: tas\}"):
        apply_variable_map(ds, {}, ["tas"])
    with pytest.raises(VariableMapError, match=r"lacks the model's static fields \['orog'\].*--static-map"):
        apply_variable_map(data("height"), {}, ["orog"], option="static_map", what="static fields")
    with pytest.raises(VariableMapError, match=r"renames onto \['tas'\], which the data already holds"):
        apply_variable_map(data("air_temperature", "tas"), {"air_temperature": "tas"}, ["tas"])
    swapped, back = apply_variable_map(data("a", "b"), {"a": "b", "b": "a"}, ["a", "b"])  # a swap is no clash
    assert float(swapped["b"].max()) == 0 and back == {"b": "a", "a": "b"}
    # exact: the pipeline's input may hold nothing else
    apply_variable_map(data("tas", "pr"), {}, ["tas"])
    with pytest.raises(ValueError, match=r"unexpected \['pr'\]; the model expects \['tas'\]"):
        apply_variable_map(data("tas", "pr"), {}, ["tas"], exact=True)
    err = VariableMapError("plain")
    assert str(err) == "plain"  # not KeyError's quoted repr


def test_hint_only_for_one_missing_and_one_spare():
    assert mapping_hint(["tas"], ["a", "b"]) == "" and mapping_hint(["tas", "pr"], ["a"]) == ""
    assert "`--variable a=tas` (CLI)" in mapping_hint(["tas"], ["a"])
