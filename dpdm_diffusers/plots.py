"""Evaluation figures (PNG): maps of truth / Lerp / members, skill against ensemble size, spectra.

Uses matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), so it needs no display, never touches pyplot's global state or the user's
backend choice, and leaves no figures open. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_maps", "plot_member_maps", "plot_skill_vs_members", "plot_power_spectra"]

_LAT = ("lat", "latitude", "nav_lat", "rlat", "y")
_LON = ("lon", "longitude", "nav_lon", "rlon", "x")


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _field(a, what: str):
    """(x, y, 2-D values, has_coordinates) from a 2-D DataArray (lat, lon, or a rotated or projected grid's own axes)
    or a 2-D numpy array."""
    if hasattr(a, "dims"):
        a = a.squeeze(drop=True)
        if a.ndim != 2:
            raise ValueError(
                f"`{what}` must be a single 2-D (lat, lon) field, got dims {tuple(a.dims)}; "
                "select one time/member first (e.g. `.isel(time=0)`)."
            )
        from .native_grids import native_axes

        axes = native_axes(a)  # a rotated or projected grid: drawn in its own coordinates
        la = axes.y if axes else next((d for d in _LAT if d in a.dims), None)
        lo = axes.x if axes else next((d for d in _LON if d in a.dims), None)
        if la is not None and lo is not None:
            a = a.transpose(la, lo)
            return np.asarray(a[lo].values, float), np.asarray(a[la].values, float), np.asarray(a.values, float), True
        v = np.asarray(a.values, float)
    else:
        v = np.asarray(a, float)
        if v.ndim != 2:
            raise ValueError(f"`{what}` must be 2-D, got shape {v.shape}.")
    return np.arange(v.shape[1]), np.arange(v.shape[0]), v, False


def _axis_labels(a, has_coordinates: bool) -> tuple[str, str]:
    """Axis labels: degrees on a lat/lon grid, a rotated or projected grid's own axes and units, else grid indices."""
    from .native_grids import native_axes

    axes = native_axes(a) if has_coordinates and hasattr(a, "dims") else None
    if axes is not None:
        return tuple(f"{d} ({a[d].attrs.get('units', '')})".replace(" ()", "") for d in (axes.x, axes.y))
    return ("longitude (deg E)", "latitude (deg N)") if has_coordinates else ("x (grid index)", "y (grid index)")


def _finite(*arrays) -> np.ndarray:
    vals = np.concatenate([np.ravel(a) for a in arrays])
    return vals[np.isfinite(vals)]


def plot_maps(
    truth,
    lerp,
    member,
    mean,
    spread,
    path,
    title: str | None = None,
    units: str = "",
    land_fraction=None,
    cmap: str = "viridis",
    spread_cmap: str = "magma",
    error_cmap: str = "RdBu_r",
    names: Sequence[str] = ("Truth", "Lerp", "One member", "Ensemble mean", "Ensemble spread", "Error of mean"),
    dpi: int = 110,
) -> Path:
    """Six map panels: truth / Lerp / one member / ensemble mean / ensemble spread / mean - truth.

    Each argument is one 2-D (lat, lon) field (DataArray, or a numpy array plotted on grid indices);
    ``lerp`` or ``member`` may be ``None`` to leave that panel empty. The four field panels share one
    colour scale (0.5-99.5 percentiles of their pooled finite values), the spread uses its own scale
    from 0 and the error a symmetric diverging scale centred on 0; every colourbar is labelled
    with ``units``. The error panel's title carries its RMSE. When ``land_fraction`` (a 2-D
    DataArray in [0, 1], on any grid) is given, its 0.5 contour is drawn on every panel.
    Masked (NaN) points are left blank.
    """
    from matplotlib.colors import Normalize, TwoSlopeNorm

    x, y, t, geo = _field(truth, "truth")
    fields = {"truth": t}
    for key, arr in (("lerp", lerp), ("member", member), ("mean", mean), ("spread", spread)):
        fields[key] = None if arr is None else _field(arr, key)[2]
        if fields[key] is not None and fields[key].shape != t.shape:
            raise ValueError(f"`{key}` has shape {fields[key].shape}, truth has {t.shape}.")
    if fields["mean"] is None or fields["spread"] is None:
        raise ValueError("`mean` and `spread` are required.")
    err = fields["mean"] - t

    pooled = _finite(*(fields[k] for k in ("truth", "lerp", "member", "mean") if fields[k] is not None))
    vmin, vmax = (np.percentile(pooled, [0.5, 99.5]) if pooled.size else (0.0, 1.0))
    if vmax <= vmin:
        vmax = vmin + 1.0
    field_norm = Normalize(vmin, vmax)
    sp = _finite(fields["spread"])
    spread_norm = Normalize(0.0, max(float(np.percentile(sp, 99.5)) if sp.size else 1.0, 1e-12))
    e = _finite(err)
    emax = max(float(np.percentile(np.abs(e), 99.5)) if e.size else 1.0, 1e-12)
    err_norm = TwoSlopeNorm(0.0, -emax, emax)
    rmse = float(np.sqrt(np.mean(e**2))) if e.size else np.nan

    ny, nx = t.shape
    if geo and np.ptp(y) > 0 and np.ptp(x) > 0:
        aspect = (np.ptp(x) * nx / max(nx - 1, 1)) / (np.ptp(y) * ny / max(ny - 1, 1))
    else:
        aspect = nx / ny
    panel_w = 4.2
    fig = _figure((3 * (panel_w + 0.8), 2 * panel_w / max(min(aspect, 3.0), 0.5) + 1.0))
    axes = fig.subplots(2, 3, sharex=True, sharey=True)
    panels = [
        (names[0], fields["truth"], cmap, field_norm, units),
        (names[1], fields["lerp"], cmap, field_norm, units),
        (names[2], fields["member"], cmap, field_norm, units),
        (names[3], fields["mean"], cmap, field_norm, units),
        (names[4], fields["spread"], spread_cmap, spread_norm, units),
        (f"{names[5]} (RMSE {rmse:.3g}{' ' + units if units else ''})", err, error_cmap, err_norm, units),
    ]
    lf = _field(land_fraction, "land_fraction") if land_fraction is not None else None
    for ax, (name, val, cm, norm, un) in zip(axes.flat, panels):
        ax.set_title(name, fontsize=11)
        if val is None:
            ax.text(0.5, 0.5, "not given", ha="center", va="center", transform=ax.transAxes, color="0.5")
        else:
            m = ax.pcolormesh(x, y, np.ma.masked_invalid(val), cmap=cm, norm=norm, shading="auto")
            cb = fig.colorbar(m, ax=ax, shrink=0.9, pad=0.02)
            cb.set_label(un, fontsize=9)
            cb.ax.tick_params(labelsize=8)
        if lf is not None:
            ax.contour(lf[0], lf[1], lf[2], levels=[0.5], colors="k", linewidths=0.6)
        ax.tick_params(labelsize=8)
        if geo:
            ax.set_aspect("equal", adjustable="box")
    xlabel, ylabel = _axis_labels(truth, geo)
    for ax in axes[-1, :]:
        ax.set_xlabel(xlabel, fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=13)
    return _save(fig, path, dpi)


def plot_member_maps(
    truth,
    interpolated,
    members: Sequence,
    path,
    title: str | None = None,
    units: str = "",
    cmap: str = "viridis",
    gamma: float = 1.0,
    names: Sequence[str] = ("Truth", "Bicubic"),
    dpi: int = 110,
) -> Path:
    """Truth, the interpolated input and several ensemble members side by side on one colour scale, so the members'
    fine-scale detail (e.g. where it rains) can be compared with the truth's. ``gamma`` < 1 stretches small values
    (0.5 suits precipitation, whose scale is set by a few heavy cells)."""
    from matplotlib.colors import PowerNorm

    x, y, t, geo = _field(truth, "truth")
    panels = [(names[0], t), (names[1], _field(interpolated, "interpolated")[2])]
    panels += [(f"Member {i + 1}", _field(m, f"member {i + 1}")[2]) for i, m in enumerate(members)]
    pooled = _finite(*(v for _, v in panels))
    vmin, vmax = (np.percentile(pooled, [0.5, 99.5]) if pooled.size else (0.0, 1.0))
    norm = PowerNorm(gamma, vmin=min(vmin, 0.0) if gamma != 1.0 else vmin, vmax=max(vmax, vmin + 1e-12))
    cols = 3
    rows = -(-len(panels) // cols)
    ny, nx = t.shape
    aspect = nx / ny if not geo else (np.ptp(x) + 1e-9) / (np.ptp(y) + 1e-9)
    fig = _figure((cols * 4.6, rows * 4.2 / max(min(aspect, 3.0), 0.5) + 1.0))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    for ax, (name, val) in zip(axes, panels):
        m = ax.pcolormesh(x, y, np.ma.masked_invalid(val), cmap=cmap, norm=norm, shading="auto")
        ax.set_title(name, fontsize=11)
        ax.tick_params(labelsize=8)
        if geo:
            ax.set_aspect("equal", adjustable="box")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    cb = fig.colorbar(m, ax=list(axes[: len(panels)]), shrink=0.8, pad=0.02)
    cb.set_label(units, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=13)
    return _save(fig, path, dpi)


def _skill_curves(data, metrics):
    """-> {metric: {label: (n_members array, values array)}}."""
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    if hasattr(data, "columns"):  # tidy DataFrame
        df = data
        if "members" not in df.columns or "value" not in df.columns:
            raise ValueError("DataFrame needs columns `members` and `value` (and `metric`; optional `region`, `variable`).")
        if "metric" not in df.columns:
            df = df.assign(metric="score")
        label_cols = [c for c in ("region", "variable") if c in df.columns and df[c].nunique() > 1]
        for metric, g in df.groupby("metric", sort=False):
            groups = g.groupby(label_cols, sort=False) if label_cols else [("", g)]
            for key, h in groups:
                key = key if isinstance(key, tuple) else (key,)
                label = " ".join(str(k) for k in key if k != "") or str(metric)
                h = h.sort_values("members")
                curves.setdefault(str(metric), {})[label] = (
                    h["members"].to_numpy(float),
                    h["value"].to_numpy(float),
                )
    elif isinstance(data, Mapping):
        first = next(iter(data.values()), None)
        if isinstance(first, Mapping):  # {metric: {n: value}}
            items = data.items()
        else:  # {n: value}
            items = [("score", data)]
        for metric, d in items:
            n = np.array(sorted(d), dtype=float)
            curves[str(metric)] = {str(metric): (n, np.array([d[k] for k in sorted(d)], dtype=float))}
    else:
        raise TypeError("Expected a pandas DataFrame or a dict.")
    if metrics is not None:
        curves = {m: curves[m] for m in metrics if m in curves}
    if not curves:
        raise ValueError("Nothing to plot.")
    return curves


def plot_skill_vs_members(
    df_or_dict,
    path,
    metrics: Sequence[str] | None = None,
    baselines: Mapping[str, float | Mapping[str, float]] | None = None,
    title: str | None = None,
    logx: bool = True,
    dpi: int = 110,
) -> Path:
    """Score of the ensemble mean against the number of members, one panel per metric.

    ``df_or_dict`` is one of

    * a tidy DataFrame with columns ``members``, ``value``, ``metric`` (optionally ``region`` and/or
      ``variable``: one line per region/variable);
    * ``{metric: {n_members: value}}``;
    * ``{n_members: value}`` (a single panel).

    ``baselines`` draws horizontal reference lines, ``{label: value}`` (same value in every panel) or
    ``{label: {metric: value}}`` (e.g. ``{"Lerp": {"RMSE": 1.87, "ACC": 0.81}}``).
    """
    curves = _skill_curves(df_or_dict, metrics)
    n = len(curves)
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig = _figure((4.3 * ncols, 3.4 * nrows + (0.4 if title else 0)))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    styles = ["--", ":", "-.", (0, (5, 1))]
    for ax, (metric, lines) in zip(axes, curves.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label if len(lines) > 1 or baselines else None)
        for i, (blabel, bval) in enumerate((baselines or {}).items()):
            v = bval.get(metric) if isinstance(bval, Mapping) else bval
            if v is not None and np.isfinite(v):
                ax.axhline(v, color="0.35", ls=styles[i % len(styles)], lw=1.2, label=blabel)
        if logx:
            from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ticks = sorted({float(v) for xs, _ in lines.values() for v in xs if v > 0})
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ensemble members", fontsize=10)
        ax.set_ylabel(metric, fontsize=10)
        ax.set_title(metric, fontsize=11)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=13)
    return _save(fig, path, dpi)


def plot_power_spectra(
    spectra: Mapping[str, object],
    path,
    title: str | None = None,
    ylabel: str = "power",
    dpi: int = 110,
) -> Path:
    """Radially averaged power spectra on log-log axes, one line per entry of ``spectra``.

    Values are DataArrays from :func:`dpdm_diffusers.metrics.power_spectrum` (dim ``wavenumber``;
    other dims are averaged) or ``(wavenumber, power)`` array pairs. An entry named like "truth"
    is drawn in thick black. A top axis shows the wavelength (1 / wavenumber).
    """
    fig = _figure((6.4, 4.6))
    ax = fig.subplots()
    xunit = None
    for label, s in spectra.items():
        if hasattr(s, "dims"):
            other = [d for d in s.dims if d != "wavenumber"]
            if other:
                s = s.mean(other)
            k = np.asarray(s["wavenumber"].values, float)
            p = np.asarray(s.values, float)
            xunit = xunit or s["wavenumber"].attrs.get("units")
        else:
            k, p = (np.asarray(v, float) for v in s)
        ok = (k > 0) & np.isfinite(p) & (p > 0)
        is_truth = "truth" in str(label).lower()
        ax.plot(
            k[ok], p[ok], label=str(label),
            color="k" if is_truth else None, lw=2.2 if is_truth else 1.4, zorder=3 if is_truth else 2,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"wavenumber ({xunit})" if xunit else "wavenumber", fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sec = ax.secondary_xaxis("top", functions=(_recip, _recip))
    for axis in (ax.xaxis, sec.xaxis):
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    sec.set_xlabel("wavelength (1 / wavenumber)", fontsize=9)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title, fontsize=12)
    return _save(fig, path, dpi)


def _recip(x):
    x = np.asarray(x, float)
    with np.errstate(divide="ignore"):
        return np.where(x != 0, 1.0 / np.where(x != 0, x, 1.0), np.inf)


# ---------------------------------------------------------------------------------------------------
# Evaluation figures (dpdm evaluate on any files)
# ---------------------------------------------------------------------------------------------------
def plot_quantiles(truth, forecasts: Mapping[str, object], path, title: str | None = None, units: str = "",
                   dpi: int = 110) -> Path:
    """Quantile-quantile plot: each forecast's quantiles (every point, time and member pooled) against the truth's,
    from the 0.1th to the 99.9th percentile; the tails sit at the ends of the diagonal."""
    q = np.r_[0.001, 0.01, np.linspace(0.05, 0.95, 19), 0.99, 0.999]
    y = np.quantile(_finite(np.asarray(truth)), q)
    fig = _figure((5.2, 5.0))
    ax = fig.subplots()
    for label, fc in forecasts.items():
        ax.plot(y, np.quantile(_finite(np.asarray(fc)), q), marker=".", lw=1.2, label=str(label))
    ax.plot(y[[0, -1]], y[[0, -1]], color="k", lw=0.8, ls=":", label="truth")
    ax.set_xlabel(f"truth quantile {f'({units})' if units else ''}", fontsize=10)
    ax.set_ylabel(f"forecast quantile {f'({units})' if units else ''}", fontsize=10)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path, dpi)


def plot_rank_histograms(histograms: Mapping[str, object], path, title: str | None = None, dpi: int = 110) -> Path:
    """Rank histograms (frequency of the truth's rank among the members) of each ensemble; flat = reliable."""
    fig = _figure((6.0, 4.0))
    ax = fig.subplots()
    for label, h in histograms.items():
        f = np.asarray(h, dtype=float)
        f = f / f.sum()
        ax.step(np.arange(f.size), f, where="mid", label=str(label))
        ax.axhline(1 / f.size, color="k", lw=0.6, ls=":")
    ax.set_xlabel("rank of the truth among the members", fontsize=10)
    ax.set_ylabel("frequency", fontsize=10)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path, dpi)


def plot_bias_maps(maps: Mapping[str, object], path, title: str | None = None, units: str = "",
                   dpi: int = 110) -> Path:
    """One panel per entry (2-D DataArrays over lat, lon), on one symmetric colour scale centred on 0."""
    n = len(maps)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig = _figure((4.6 * cols, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    lim = max(float(np.nanmax(np.abs(np.asarray(m)))) for m in maps.values()) or 1.0
    for ax, (label, m) in zip(axes, maps.items()):
        im = ax.pcolormesh(m[m.dims[-1]].values, m[m.dims[-2]].values, np.asarray(m), cmap="RdBu_r", vmin=-lim,
                           vmax=lim, shading="nearest")
        ax.set_title(str(label), fontsize=9)
        fig.colorbar(im, ax=ax, label=units)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi)
