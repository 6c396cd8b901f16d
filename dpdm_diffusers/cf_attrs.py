"""CF global attributes of everything dpdm-diffusers writes: the input's attributes, stamped with what made the output.

One stamp serves the pipeline's xarray output and streamed reconstructions, so a file says the same whichever made it.
"""

from __future__ import annotations

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
    attrs = dict(input_attrs)
    attrs.update(
        Conventions="CF-1.8",
        source=SOURCE,
        history=f"{attrs.get('history', '')}\n{stamp}".strip(),
        **{f"dpdm_{k}": v for k, v in (info or {}).items()},
    )
    return attrs
