r"""Figures for papers and reports: arrays (or diagnostic results) in, matplotlib figures out.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (so it
works headless and in threads); save it with ``fig.savefig(path)`` or :func:`save_figure`.
In a notebook with the inline backend (``%matplotlib inline``), a returned figure displays itself.

- :func:`corner` — 1-D marginals and 2-D highest-density contours (68% and 95% by default)
  of one or several posteriors, overlaid with a legend, true values marked, labels with units.
- :func:`sbc_ranks` — SBC rank histograms with the 99% band of a uniform histogram.
- :func:`coverage_curves` — expected coverage (HPD, TARP) against the credible level, with
  the diagonal and the 99% band of a calibrated posterior.
- :func:`training_curves` — training and validation loss per epoch.
- :func:`posterior_predictive` — posterior-predictive distribution of each summary with the
  observed value.
- :func:`map_panel` — an observed map beside posterior-predictive (or emulated) maps.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> fig = corner(rng.normal(size=(2000, 3)), labels=["a", "b [m]", "c"], truth=[0, 0, 0])
    >>> len([ax for ax in fig.axes if ax.get_label() != "legend"])
    6
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats
from scipy.ndimage import gaussian_filter

from sbi_gen.diagnostics import CoverageResult, PPCResult, SBCResult, binomial_band

__all__ = [
    "check_figure_path",
    "corner",
    "coverage_curves",
    "map_panel",
    "posterior_predictive",
    "save_figure",
    "sbc_ranks",
    "training_curves",
]

COLORS = ["#1f5fa8", "#d1495b", "#2e8b57", "#edae49", "#6a4c93", "#00798c", "#8c564b"]
TRUTH_COLOR = "black"


def _numpy(samples: Any) -> np.ndarray:
    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().numpy()
    return np.asarray(samples, dtype=float)


def _named_sets(samples: Any) -> dict[str, np.ndarray]:
    """One array, a list of ``(n, D)`` arrays or a ``{label: array}`` mapping as ``{label: (n, D)}``."""
    if isinstance(samples, Mapping):
        sets = {str(k): _numpy(v) for k, v in samples.items()}
    elif isinstance(samples, (list, tuple)):
        arrays = [_numpy(v) for v in samples]
        # A list of rows (θ vectors or numbers) would otherwise plot each row as a posterior of its
        # own; a list of 1-D posteriors looks the same, so neither is guessed.
        for i, values in enumerate(arrays):
            if values.ndim < 2:
                raise ValueError(
                    f"samples is a {type(samples).__name__} of rows or numbers (element {i + 1} has shape "
                    f"{values.shape}), not of (n, D) sample sets: pass one set as an (n, D) array "
                    "(e.g. np.asarray(rows)), or several as a dict of named (n, D) arrays"
                )
        sets = {f"posterior {i + 1}": values for i, values in enumerate(arrays)}
    else:
        sets = {"posterior": _numpy(samples)}
    if not sets:
        raise ValueError("no samples to plot")
    dims = set()
    for label, values in sets.items():
        if values.ndim == 1:
            values = sets[label] = values[:, None]
        if values.ndim != 2 or len(values) < 2:
            raise ValueError(f"samples {label!r} must have shape (n, D) with n >= 2, got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"samples {label!r} contain NaN or infinite values")
        dims.add(values.shape[1])
    if len(dims) != 1:
        raise ValueError(f"all sample sets must have the same number of parameters, got {sorted(dims)}")
    return sets


def _hpd_thresholds(density: np.ndarray, levels: Sequence[float]) -> list[float]:
    """Density values whose super-level sets hold ``levels`` of the (histogram) mass."""
    flat = np.sort(density.ravel())[::-1]
    cumulative = np.cumsum(flat)
    cumulative /= cumulative[-1]
    return [float(flat[min(np.searchsorted(cumulative, level), len(flat) - 1)]) for level in levels]


def corner(
    samples: Any,
    *,
    labels: Sequence[str] | None = None,
    truth: Any = None,
    levels: Sequence[float] = (0.68, 0.95),
    bins: int = 40,
    smooth: float = 1.0,
    limits: Sequence[tuple[float, float]] | None = None,
    colors: Sequence[str] | None = None,
    title: str | None = None,
    figsize: float = 2.2,
) -> Figure:
    r"""Corner plot of one or several posteriors.

    The diagonal shows each parameter's marginal density (histograms, normalized); below it,
    each pair's highest-density regions at ``levels`` (contours of a histogram smoothed by a
    Gaussian of ``smooth`` bins; the 68% line solid, wider levels lighter). True values are
    black lines and a star.

    Arguments:
        samples: ``(n, D)`` array/tensor, a list of them, or ``{label: samples}`` for a legend
            (a list of rows is refused: make it one ``(n, D)`` array first).
        labels: Parameter labels with units, e.g. ``prior.labels``.
        truth: ``(D,)`` true parameters, or ``None``.
        levels: Credible levels of the 2-D contours.
        bins: Histogram bins per axis.
        smooth: Gaussian smoothing of the 2-D histograms, in bins (0: none).
        limits: ``(low, high)`` per parameter (default: the 0.1–99.9% range of all sets, and the truth).
        colors: One colour per sample set.
        title: Figure title.
        figsize: Inches per panel.

    Returns:
        A figure with ``D (D + 1) / 2`` panels, and for ``D > 1`` one more axes (labelled
        ``"legend"``, no frame) holding the legend in the empty upper triangle.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> fig = corner({"NPE": rng.normal(size=(1000, 2)), "reference": rng.normal(size=(1000, 2))},
        ...              labels=["x", "y"], truth=[0.1, -0.2])
        >>> [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
        ['x', 'y']
    """
    sets = _named_sets(samples)
    dim = next(iter(sets.values())).shape[1]
    labels = list(labels) if labels is not None else [f"$\\theta_{{{d + 1}}}$" for d in range(dim)]
    if len(labels) != dim:
        raise ValueError(f"got {len(labels)} labels for {dim} parameters")
    truth_values = None if truth is None else _numpy(truth).reshape(-1)
    if truth_values is not None and len(truth_values) != dim:
        raise ValueError(f"truth has {len(truth_values)} values for {dim} parameters")
    if truth_values is not None and not np.isfinite(truth_values).all():
        raise ValueError("truth contains NaN or infinite values")
    if limits is not None and (len(limits) != dim or not np.isfinite(np.asarray(limits, dtype=float)).all()):
        raise ValueError(f"limits must be {dim} finite (low, high) pairs, one per parameter, got {list(limits)}")
    colors = list(colors) if colors is not None else COLORS
    if limits is None:
        pooled = np.concatenate(list(sets.values()))
        low, high = np.quantile(pooled, 0.001, axis=0), np.quantile(pooled, 0.999, axis=0)
        if truth_values is not None:
            low, high = np.minimum(low, truth_values), np.maximum(high, truth_values)
        pad = 0.05 * np.where(high > low, high - low, 1.0)
        limits = list(zip(low - pad, high + pad))
    limits = [tuple(map(float, lim)) for lim in limits]

    fig = Figure(figsize=(figsize * dim + 0.6, figsize * dim + 0.4), layout="constrained")
    grid = fig.add_gridspec(dim, dim)
    axes: dict[tuple[int, int], Any] = {}
    for row in range(dim):
        for col in range(row + 1):
            axes[row, col] = fig.add_subplot(grid[row, col], sharex=axes.get((col, col)) if row != col else None)
    handles = []
    for k, (label, values) in enumerate(sets.items()):
        color = colors[k % len(colors)]
        handles.append(Line2D([], [], color=color, label=label))
        for d in range(dim):
            edges = np.linspace(*limits[d], bins + 1)
            axes[d, d].hist(values[:, d], bins=edges, density=True, histtype="step", color=color, linewidth=1.4)
        for row in range(1, dim):
            for col in range(row):
                hist, xe, ye = np.histogram2d(
                    values[:, col], values[:, row], bins=bins, range=[limits[col], limits[row]]
                )
                density = gaussian_filter(hist.T, smooth) if smooth > 0 else hist.T
                if density.sum() <= 0:
                    continue
                thresholds = _hpd_thresholds(density, levels)
                centers_x, centers_y = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
                # contour needs increasing levels: widest region (lowest density) first
                order = np.argsort(thresholds)
                values_sorted = np.array(thresholds)[order]
                if np.all(np.diff(values_sorted) > 0):
                    axes[row, col].contour(
                        centers_x,
                        centers_y,
                        density,
                        levels=values_sorted,
                        colors=[color],
                        linewidths=[1.5 if i == 0 else 1.0 for i in order],
                        linestyles=["solid" if i == 0 else "dashed" for i in order],
                    )
    for row in range(dim):
        for col in range(row + 1):
            ax = axes[row, col]
            ax.set_xlim(limits[col])
            if row != col:
                ax.set_ylim(limits[row])
            if truth_values is not None:
                ax.axvline(truth_values[col], color=TRUTH_COLOR, linewidth=0.9)
                if row != col:
                    ax.axhline(truth_values[row], color=TRUTH_COLOR, linewidth=0.9)
                    ax.plot(truth_values[col], truth_values[row], marker="*", color=TRUTH_COLOR, markersize=9, linestyle="none")
            if row == dim - 1:
                ax.set_xlabel(labels[col])
            else:
                ax.tick_params(labelbottom=False)
            if col == 0 and row != 0:
                ax.set_ylabel(labels[row])
            elif row == col:
                ax.set_yticks([])
            else:
                ax.tick_params(labelleft=False)
    levels_text = ", ".join(f"{100 * level:g}%" for level in levels)
    if truth_values is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOR, marker="*", label="true value"))
    handles.append(Line2D([], [], color="gray", linestyle="solid", label=f"HPD {levels_text} (solid, dashed)"))
    if dim > 1:  # in the empty upper triangle, in an axes of its own so it never covers a panel
        slot = fig.add_subplot(grid[0, 1:], label="legend")
        slot.axis("off")
        slot.legend(handles=handles, loc="upper left", fontsize="small", frameon=False)
    else:
        fig.legend(handles=handles, loc="upper right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def sbc_ranks(result: SBCResult, confidence: float = 0.99) -> Figure:
    """SBC rank histograms, one panel per parameter, with the band of a uniform histogram.

    The grey band holds each bin's count with probability ``confidence`` when the ranks are
    uniform (a binomial interval); the dashed line is the expected count.

    Example:
        >>> from sbi_gen.diagnostics import gaussian_posterior, sbc
        >>> import torch
        >>> theta = torch.randn(300, 2); x = theta + torch.randn(300, 2)
        >>> post = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5**0.5))
        >>> len(sbc_ranks(sbc(post, theta, x, n_samples=100)).axes)
        2
    """
    ranks, dim = result.ranks, result.ranks.shape[1]
    n, n_bins, total = len(ranks), result.n_bins, result.n_samples + 1
    edges = np.ceil(np.linspace(0, total, n_bins + 1)) - 0.5
    share = np.diff(edges) / total
    lower = stats.binom.ppf((1 - confidence) / 2, n, share)
    upper = stats.binom.ppf((1 + confidence) / 2, n, share)
    fig = Figure(figsize=(3.2 * dim, 2.8), layout="constrained")
    axes = fig.subplots(1, dim, squeeze=False)[0]
    for d, ax in enumerate(axes):
        ax.stairs(upper, edges, baseline=lower, fill=True, color="0.85", label=f"{100 * confidence:g}% band (uniform)")
        ax.stairs(n * share, edges, color="0.4", linestyle="dashed")
        counts = np.histogram(ranks[:, d], bins=edges)[0]
        ax.stairs(counts, edges, color=COLORS[0], linewidth=1.5, label="ranks")
        p = min(result.chi2_p_values[d], result.ks_p_values[d])
        ax.set_title(f"{result.names[d]}  (min p = {p:.2g})", fontsize=10)
        ax.set_xlabel(f"rank among {result.n_samples} draws")
        ax.set_xlim(edges[0], edges[-1])
    axes[0].set_ylabel(f"count of {n} simulations")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("Simulation-based calibration: " + ("passed" if result.passed else "FAILED"))
    return fig


def coverage_curves(results: Mapping[str, CoverageResult] | Sequence[CoverageResult] | CoverageResult) -> Figure:
    """Expected coverage against the credible level, with the diagonal and a 99% band.

    Curves below the diagonal mean over-confident (or biased) posteriors, above it
    under-confident ones. The band is that of a calibrated posterior with the first curve's
    number of simulations.

    Example:
        >>> from sbi_gen.diagnostics import expected_coverage, gaussian_posterior, tarp
        >>> import torch
        >>> theta = torch.randn(300, 2); x = theta + torch.randn(300, 2)
        >>> post = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5**0.5))
        >>> fig = coverage_curves({"HPD": expected_coverage(post, theta, x, n_samples=100),
        ...                        "TARP": tarp(post, theta, x, n_samples=100)})
        >>> fig.axes[0].get_xlabel()
        'credible level'
    """
    if isinstance(results, CoverageResult):
        results = [results]
    if not isinstance(results, Mapping):
        names = {"hpd": "HPD", "hpd-kde": "HPD (KDE)", "tarp": "TARP"}
        results = {names.get(r.method, r.method) + ("" if i == 0 else f" {i + 1}"): r for i, r in enumerate(results)}
    if not results:
        raise ValueError("no coverage results to plot")
    first = next(iter(results.values()))
    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    lower, upper = binomial_band(len(first.statistic), first.levels)
    ax.fill_between(first.levels, lower, upper, color="0.88", label="99% band (calibrated)")
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="dashed", linewidth=1)
    for k, (label, result) in enumerate(results.items()):
        ax.plot(result.levels, result.coverage, color=COLORS[k % len(COLORS)], linewidth=1.8,
                label=f"{label} ({'pass' if result.passed else 'fail'})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("credible level")
    ax.set_ylabel("expected coverage")
    ax.text(0.97, 0.03, "over-confident", ha="right", va="bottom", fontsize=8, color="0.4", transform=ax.transAxes)
    ax.text(0.03, 0.97, "under-confident", ha="left", va="top", fontsize=8, color="0.4", transform=ax.transAxes)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.92), fontsize=8, frameon=False)
    return fig


def training_curves(history: Any) -> Figure:
    """Training and validation loss per epoch, the best epoch marked; learning rate on a second axis.

    Arguments:
        history: A :class:`~sbi_gen.train.History` or its ``to_dict()``.
    """
    h = history.to_dict() if hasattr(history, "to_dict") else dict(history)
    train, val = np.asarray(h["train_loss"], dtype=float), np.asarray(h["val_loss"], dtype=float)
    if len(train) == 0:
        raise ValueError("the history holds no epochs")
    epochs = np.arange(1, len(train) + 1)
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(epochs, train, color=COLORS[0], label="training")
    ax.plot(epochs, val, color=COLORS[1], label="validation")
    best = int(h.get("best_epoch", int(np.argmin(val))))
    if 0 <= best < len(val):
        ax.plot(best + 1, val[best], marker="o", color=COLORS[1], linestyle="none", label=f"best (epoch {best + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (negative log-likelihood)")
    if h.get("learning_rate"):
        twin = ax.twinx()
        twin.plot(epochs, h["learning_rate"], color="0.6", linewidth=0.8, linestyle="dotted")
        twin.set_yscale("log")
        twin.set_ylabel("learning rate", color="0.5")
    ax.legend(frameon=False)
    return fig


def posterior_predictive(result: PPCResult, max_panels: int = 12, bins: int = 40) -> Figure:
    """Posterior-predictive histogram of each summary with the observed value (red line).

    Each panel's title gives the two-sided predictive p-value; at most ``max_panels`` summaries
    (the most atypical first when there are more).
    """
    order = np.argsort(result.p_values)[:max_panels] if len(result.p_values) > max_panels else np.arange(len(result.p_values))
    k = len(order)
    cols = min(k, 4)
    rows = int(np.ceil(k / cols))
    fig = Figure(figsize=(3.0 * cols, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, j in zip(axes, order):
        ax.hist(result.x_predictive[:, j], bins=bins, density=True, color=COLORS[0], alpha=0.6, label="posterior predictive")
        ax.axvline(result.x_obs[j], color=COLORS[1], linewidth=2, label="observed")
        ax.set_xlabel(result.names[j])
        ax.set_title(f"p = {result.p_values[j]:.2g}", fontsize=9)
        ax.set_yticks([])
    for ax in axes[k:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Posterior predictive check: " + ("passed" if result.passed else "FAILED"))
    return fig


def map_panel(
    observed: Any,
    maps: Any,
    *,
    titles: Sequence[str] | None = None,
    observed_title: str = "observed",
    cmap: str = "viridis",
    max_maps: int = 7,
) -> Figure:
    """An observed map beside other maps (posterior-predictive or emulated) on one colour scale.

    Arguments:
        observed: ``(H, W)`` map.
        maps: ``(k, H, W)`` maps; the first ``max_maps`` are shown.
        titles: Titles of ``maps`` (default ``"draw 1"`` ...).
        observed_title: Title of the observed map.
        cmap: Colour map.
        max_maps: Maps shown beside the observed one.

    Example:
        >>> import numpy as np
        >>> fig = map_panel(np.zeros((8, 8)), np.ones((3, 8, 8)))
        >>> [ax.get_title() for ax in fig.axes[:4]]
        ['observed', 'draw 1', 'draw 2', 'draw 3']
    """
    observed, maps = _numpy(observed), _numpy(maps)[:max_maps]
    if observed.ndim != 2 or maps.ndim != 3 or maps.shape[1:] != observed.shape:
        raise ValueError(f"need an (H, W) map and (k, H, W) maps of the same size, got {observed.shape} and {maps.shape}")
    titles = list(titles) if titles is not None else [f"draw {i + 1}" for i in range(len(maps))]
    vmin, vmax = np.quantile(np.concatenate([observed[None], maps]), [0.005, 0.995])
    panels = 1 + len(maps)
    fig = Figure(figsize=(2.2 * panels + 0.8, 2.5), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    image = None
    for ax, image_data, title in zip(axes, [observed, *maps], [observed_title, *titles]):
        image = ax.imshow(image_data, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.85)
    return fig


def check_figure_path(path: str | os.PathLike[str]) -> Path:
    """The file :func:`save_figure` would write for ``path``, checked without writing anything.

    A path without a suffix gets ``.png``. Call it before expensive work whose result is a
    figure, so that a bad path fails first.

    Raises:
        ValueError: ``path`` is a directory, its suffix is not a format matplotlib writes, or its
            nearest existing ancestor is not a writable directory.

    Example:
        >>> check_figure_path("corner").name
        'corner.png'
    """
    final = Path(path)
    if not final.is_dir() and not final.suffix:
        final = final.with_name(final.name.rstrip(".") + ".png")
    if final.is_dir():
        raise ValueError(f"cannot save the figure to {final}: it is a directory")
    supported = FigureCanvasBase.get_supported_filetypes()
    if final.suffix[1:].lower() not in supported:
        raise ValueError(
            f"cannot save the figure to {final}: unsupported format {final.suffix!r}; "
            f"supported: {', '.join(sorted(supported))}"
        )
    ancestor = final.parent
    while not ancestor.exists():  # save_figure creates the missing folders
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot save the figure to {final}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"cannot save the figure to {final}: the directory {ancestor} is not writable")
    return final


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 130) -> Path:
    """Writes ``fig`` to ``path`` in the format of its suffix (``.png`` appended when it has none),
    creating missing folders; returns the path written.

    Raises:
        ValueError: As :func:`check_figure_path`, before anything is written.
        OSError: Writing failed (one line naming the path).
    """
    path = check_figure_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    except OSError as error:
        raise OSError(f"cannot save the figure to {path}: {error.strerror or error}") from None
    return path
