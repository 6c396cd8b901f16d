"""Physical units: parse, compare and convert with pint and cf-xarray's CF unit registry.

One job: make ``"K"``, ``"kelvin"`` and ``"degK"`` the same unit, turn ``degC`` into ``K`` or ``hPa`` into
``Pa`` (offsets and factors done by pint, not by hand), and refuse a missing or incompatible ``units``
attribute with a message that names the variable, what it has and what is expected.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["parse_units", "same_units", "compatible_units", "convert_units", "require_units"]


@lru_cache(maxsize=1)
def _registry():
    # cf-xarray's registry reads CF/UDUNITS spellings ("m s-1", "degC", "degrees_north", "1", "%"); building it
    # redefines a few pint units, which pint logs as warnings: not the user's concern
    import logging

    pint_log = logging.getLogger("pint.util")
    level = pint_log.level
    pint_log.setLevel(logging.ERROR)
    try:
        from cf_xarray.units import units
    finally:
        pint_log.setLevel(level)

    return units


@lru_cache(maxsize=256)
def parse_units(text: str):
    """A pint ``Unit`` for a CF/UDUNITS unit string; ``ValueError`` for one pint cannot read."""
    reg = _registry()
    spelled = str(text).strip()
    aliases = {"": "1", "fraction": "1", "0-1": "1", "(0-1)": "1", "deg_c": "degC", "celsius": "degC", "deg_k": "K"}
    spelled = aliases.get(spelled.lower(), spelled)
    try:
        return reg.Unit(spelled)
    except Exception as err:  # pint raises several error types for unreadable strings
        raise ValueError(f"Cannot read the unit {text!r} (expected a CF/UDUNITS unit such as 'K', 'degC', 'm s-1', 'Pa').") from err


def same_units(a: str, b: str) -> bool:
    """Whether two spellings name the same unit (``"K"`` / ``"kelvin"``, ``"m/s"`` / ``"m s-1"``)."""
    try:
        ua, ub = parse_units(a), parse_units(b)
    except ValueError:
        return str(a).strip() == str(b).strip()
    if ua == ub:
        return True
    # equal dimensionality and a unit conversion factor of 1 without offset
    return compatible_units(a, b) and np.isclose(_registry().Quantity(1.0, ua).to(ub).magnitude, 1.0) and np.isclose(
        _registry().Quantity(0.0, ua).to(ub).magnitude, 0.0, atol=1e-12)


def compatible_units(a: str, b: str) -> bool:
    """Whether values in ``a`` can be converted to ``b`` (same dimensionality, e.g. ``degC`` and ``K``)."""
    try:
        return parse_units(a).dimensionality == parse_units(b).dimensionality
    except ValueError:
        return False


def require_units(obj, name: str, expected: str | None = None) -> str:
    """The ``units`` attribute of ``obj`` (an xarray object); a clear error when it is missing or empty."""
    have = obj.attrs.get("units")
    if have is None or str(have).strip() == "":
        want = f" (this model expects {expected!r})" if expected else ""
        raise ValueError(
            f"Variable {name!r} has no `units` attribute{want}. Set it, e.g. "
            f"`ds[{name!r}].attrs['units'] = {expected or 'K'!r}`, so values are never misread."
        )
    return str(have)


def convert_units(da, target: str, name: str | None = None):
    """Return ``da`` (xarray) in ``target`` units, converting compatible units (``degC`` -> ``K``, ``hPa`` -> ``Pa``).

    A missing ``units`` attribute or incompatible units raise ``ValueError``; the same unit in another
    spelling only relabels the attribute. Lazy (dask) data stays lazy.
    """
    name = name or str(da.name)
    have = require_units(da, name, target)
    if same_units(have, target):
        return da.assign_attrs(units=target) if have != target else da
    if not compatible_units(have, target):
        raise ValueError(f"Variable {name!r} is in {have!r}, which cannot be converted to {target!r} (the model's units).")
    q = _registry().Quantity
    scale = q(1.0, parse_units(have)).to(parse_units(target)).magnitude - q(0.0, parse_units(have)).to(parse_units(target)).magnitude
    offset = q(0.0, parse_units(have)).to(parse_units(target)).magnitude
    out = da * scale + offset if offset else da * scale
    return out.astype(da.dtype if np.issubdtype(da.dtype, np.floating) else np.float32).assign_attrs({**da.attrs, "units": target})
