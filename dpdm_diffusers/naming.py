"""Your variable names and the model's: one place that renames by ``variable_map`` and explains a mismatch.

A ``variable_map`` maps your names to the model's (``{"air_temperature": "surface_temperature"}``); it is written
``--variable air_temperature=surface_temperature`` on the command line and ``variable_map: {air_temperature:
surface_temperature}`` in a training config. :func:`apply_variable_map` is the one implementation of "rename, check,
select" used by the pipeline's input handling, the data layer, ``dpdm downscale`` and long reconstructions;
:func:`mapping_hint` is the sentence their errors end with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import xarray as xr

__all__ = ["COORD_LIKE", "VariableMapError", "apply_variable_map", "mapping_hint"]

#: Variables that netCDF files carry beside the data (bounds, grid mappings): never a mapping target.
COORD_LIKE = ("latitude_longitude", "crs", "time_bnds", "lat_bnds", "lon_bnds", "time_bounds", "spatial_ref")

_CLI_FLAGS = {"variable_map": "--variable", "static_map": "--static-map"}


class VariableMapError(KeyError, ValueError):
    """Names that do not fit: a ``KeyError`` (a name is missing) and a ``ValueError`` (bad input) at once, so the
    data layer's and the pipeline's callers catch it as they always did. ``str()`` is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def mapping_hint(missing: Sequence[str], spare: Sequence[str], option: str = "variable_map") -> str:
    """With one missing and one unknown name, the sentence that spells out the mapping to pass (Python, CLI and
    config forms); otherwise ``""``."""
    if len(missing) != 1 or len(spare) != 1:
        return ""
    a, b = spare[0], missing[0]
    return (f" If {a!r} is your name for {b!r}, map it: `{option}={{{a!r}: {b!r}}}` (Python), "
            f"`{_CLI_FLAGS.get(option, '--' + option)} {a}={b}` (CLI) or `{option}: {{{a}: {b}}}` (config).")


def parse_mapping(items) -> dict[str, str]:
    """``{"yours": "model's"}`` from a mapping, ``"a=b,c=d"`` or ``["a=b", "c=d"]`` (CLI and YAML forms)."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    if isinstance(items, str):
        items = [x for x in items.split(",") if x.strip()]
    out = {}
    for item in items:
        if "=" not in str(item):
            raise ValueError(f"A name mapping is written yours=model's (e.g. air_temperature=surface_temperature), got {item!r}.")
        k, v = (x.strip() for x in str(item).split("=", 1))
        out[k] = v
    return out


def apply_variable_map(
    ds: xr.Dataset,
    variable_map: Mapping[str, str] | None,
    wanted: Sequence[str] | None = None,
    *,
    exact: bool = False,
    option: str = "variable_map",
    what: str = "variables",
) -> tuple[xr.Dataset, dict[str, str]]:
    """Rename ``ds``'s variables by ``variable_map`` (yours -> the model's) and keep the model's ``wanted`` ones.

    Args:
        ds: the data, in your names.
        variable_map: your name -> the model's; every key must be a variable of ``ds``.
        wanted: the model's names, in the order returned; ``None`` keeps every variable (renamed).
        exact: ``ds`` may hold nothing but ``wanted`` (the pipeline's input); otherwise other variables are dropped.
        option, what: how the mapping and the names are called in error messages (``"static_map"``, ``"static
            fields"``).

    Returns:
        ``(renamed, rename_back)``: ``renamed`` holds exactly ``wanted`` in the model's names (lazy data stays lazy);
        ``rename_back`` maps the model's name -> yours for every renamed variable, so ``renamed.rename(rename_back)``
        is the same selection in your names.

    Raises:
        VariableMapError: the map names a variable ``ds`` lacks or renames onto one it holds; a wanted name is missing
            (with the mapping to pass when one name is missing and one is spare); with ``exact``, unexpected variables.
    """
    mapping = parse_mapping(variable_map)  # also the CLI's ["yours=model's", ...] form
    holds = sorted(map(str, ds.data_vars))
    unknown = [k for k in mapping if k not in ds.data_vars]
    if unknown:
        raise VariableMapError(f"The {option} names {unknown}, which the data does not hold; it holds {holds}.")
    clash = [v for k, v in mapping.items() if v in ds.data_vars and v not in mapping and v != k]
    if clash:
        raise VariableMapError(f"The {option} renames onto {clash}, which the data already holds; it holds {holds}.")
    renamed = ds.rename(mapping) if mapping else ds
    rename_back = {v: k for k, v in mapping.items() if k != v}
    if wanted is None:
        return renamed, rename_back
    wanted = [str(w) for w in wanted]
    missing = [w for w in wanted if w not in renamed.data_vars]
    if missing:
        spare = [str(v) for v in renamed.data_vars if v not in wanted and str(v) not in COORD_LIKE]
        raise VariableMapError(f"The data lacks the model's {what} {missing} (it expects {wanted}: missing {missing}); "
                               f"it holds {holds}."
                               + mapping_hint(missing, spare, option))
    extra = [str(v) for v in renamed.data_vars if v not in wanted]
    if exact and extra:
        raise VariableMapError(f"The data holds {what} the model does not take, unexpected {extra}; the model expects "
                               f"{wanted}: select them with ds[{wanted}].")
    return renamed[wanted], rename_back
