"""CF global attributes of everything dpdm-diffusers writes: the input's attributes, stamped with what made the output.

One stamp serves the pipeline's xarray output and streamed reconstructions, so a file says the same whichever made it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone

from dpdm_diffusers import __version__

SOURCE = f"dpdm-diffusers {__version__} DownscalingPipeline"


def output_attrs(input_attrs: Mapping, *, scale_factor: int, info: Mapping | None = None) -> dict:
    """The input's global attributes with ``Conventions``, ``source``, a ``history`` line appended and every entry
    of ``info`` as ``dpdm_<key>`` (sampler, steps, members, model ...).

    Args:
        input_attrs: global attributes of the low-res input.
        scale_factor: grid refinement, recorded in the history line.
        info: run settings to record (values must be netCDF attribute types: str, int, float).
    """
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} downscaled x{scale_factor} by dpdm-diffusers {__version__}"
    attrs = without_grid_attrs(input_attrs)
    if "nominal_resolution" in attrs:  # the coarse grid's: kept under a name that says so
        attrs["input_nominal_resolution"] = attrs.pop("nominal_resolution")
    source = str(input_attrs.get("source", "")).strip()
    title = str(attrs.get("title", "")).strip()
    attrs.update(
        title=f"{title} downscaled x{scale_factor} (dpdm-diffusers ensemble)" if title else
        f"Ensemble downscaled x{scale_factor} by dpdm-diffusers",
        Conventions="CF-1.8",
        source=SOURCE + (f"; input: {source}" if source and not source.startswith(SOURCE) else ""),
        history=f"{attrs.get('history', '')}\n{stamp}".strip(),
        **{f"dpdm_{k}": v for k, v in (info or {}).items()},
    )
    return attrs


# GRIB decoding's description of the input's grid (cfgrib), wrong on the fine grid; GRIB_paramId, GRIB_shortName
# and the like describe the variable and stay
_GRIB_GRID = re.compile(r"^GRIB_(N[xyi]|.*([Gg]rid|Increment|Scan|numberOf|[Ll]atitudeOf|[Ll]ongitudeOf|[ij]Points).*)$")


def without_grid_attrs(attrs: Mapping) -> dict:
    """``attrs`` less the attributes that describe the input's (coarse) grid."""
    return {k: v for k, v in attrs.items() if not _GRIB_GRID.match(str(k))}


def clean_cf(ds):
    """A Dataset made CF-consistent for writing: coarse-grid GRIB attributes dropped from every variable;
    ``bounds`` attributes that point at variables the Dataset does not hold removed (the input's lat/lon bounds
    describe the coarse cells; time bounds are kept when their variable is carried along); ``cell_measures`` (the
    coarse cells' areas) and GRIB decoding's placeholder ``standard_name: unknown`` dropped."""
    for name in list(ds.variables):
        attrs = without_grid_attrs(ds[name].attrs)
        if "bounds" in attrs and attrs["bounds"] not in ds.variables:
            del attrs["bounds"]
        attrs.pop("cell_measures", None)
        if str(attrs.get("standard_name", "")).strip().lower() == "unknown":
            del attrs["standard_name"]
        ds[name].attrs = attrs
    return ds
