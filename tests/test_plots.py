"""Figures have the structure they claim: axes, labels, contours, truth markers, legends."""

import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.contour import ContourSet
from matplotlib.image import AxesImage
from PIL import Image

from sbi_gen.diagnostics import expected_coverage, gaussian_posterior, posterior_predictive_check, sbc, tarp
from sbi_gen.plots import (
    check_figure_path,
    corner,
    coverage_curves,
    map_panel,
    posterior_predictive,
    save_figure,
    sbc_ranks,
    training_curves,
)
from sbi_gen.priors import Gaussian
from sbi_gen.simulate import as_simulator
from sbi_gen.train import History

SD = math.sqrt(0.5)


def _contours(ax):
    return [c for c in ax.get_children() if isinstance(c, ContourSet)]


def _has_vertical_line_at(ax, value):
    return any(
        len(line.get_xdata()) == 2 and np.allclose(line.get_xdata(), value) and line.get_color() == "black"
        for line in ax.get_lines()
    )


def test_corner_overlays_posteriors_with_contours_truth_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["$m_X$ [GeV]", "λ", "β [1/s]"]
    truth = [0.1, -0.2, 0.3]
    fig = corner(
        {"NPE": rng.normal(size=(3000, 3)), "reference": torch.as_tensor(rng.normal(0.5, 0.7, size=(3000, 3)))},
        labels=labels,
        truth=truth,
        title="observation 0",
    )
    (slot,) = [ax for ax in fig.axes if ax.get_label() == "legend"]
    axes = [ax for ax in fig.axes if ax is not slot]
    assert len(axes) == 6  # lower triangle of a 3 x 3 grid
    bottom = [ax for ax in axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in bottom] == labels
    assert sorted(ax.get_ylabel() for ax in axes if ax.get_ylabel()) == sorted(labels[1:])
    off_diagonal = [ax for ax in axes if ax.get_ylabel() or (not ax.get_xlabel() and _contours(ax))]
    contour_axes = [ax for ax in axes if _contours(ax)]
    assert len(contour_axes) == 3 and off_diagonal
    for ax in contour_axes:
        sets = _contours(ax)
        assert len(sets) == 2  # one per posterior
        assert all(len(s.levels) == 2 for s in sets)  # 68% and 95%
    # every panel marks the true value of its x parameter
    for ax in axes:
        assert any(_has_vertical_line_at(ax, t) for t in truth)
    assert not slot.axison  # the legend's own axes draws no frame or ticks
    legend_texts = [t.get_text() for t in slot.get_legend().get_texts()]
    assert "NPE" in legend_texts and "reference" in legend_texts and "true value" in legend_texts
    assert fig.get_suptitle() == "observation 0"
    path = save_figure(fig, tmp_path / "sub" / "corner.png")  # creates the missing folder
    with Image.open(path) as image:
        assert image.size[0] > 500 and image.size[1] > 500


def test_hpd_contours_enclose_the_stated_mass():
    """For a standard 2-D Gaussian the 68% HPD region is the disc of radius sqrt(-2 ln 0.32) = 1.51."""
    rng = np.random.default_rng(1)
    fig = corner(rng.normal(size=(200_000, 2)), bins=60, smooth=1.0, limits=[(-4, 4), (-4, 4)])
    (contour_set,) = _contours(fig.axes[1])  # axes: (θ1 marginal), (θ1, θ2) pair, (θ2 marginal)
    radii = {}
    for level_index, segments in enumerate(contour_set.allsegs):
        points = np.concatenate(segments)
        radii[level_index] = np.median(np.hypot(points[:, 0], points[:, 1]))
    expected = sorted([math.sqrt(-2 * math.log(1 - 0.68)), math.sqrt(-2 * math.log(1 - 0.95))], reverse=True)
    # contour levels are sorted by density, lowest first: the 95% disc, then the 68% disc
    np.testing.assert_allclose([radii[0], radii[1]], expected, rtol=0.06)


def test_corner_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        corner(np.zeros((10, 2)) + np.arange(2), labels=["a"])
    with pytest.raises(ValueError, match="NaN"):
        corner(np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match="same number"):
        corner({"a": np.random.rand(10, 2), "b": np.random.rand(10, 3)})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"labels": ["a", "b", "c"]}, "got 3 labels for 2 parameters"),
        ({"truth": [0.0, 1.0, 2.0]}, "truth has 3 values for 2 parameters"),
        ({"truth": [0.0, np.nan]}, "truth contains NaN or infinite values"),
        ({"truth": torch.tensor([np.inf, 0.0])}, "truth contains NaN or infinite values"),
        ({"limits": [(0.0, 1.0)]}, "limits must be 2 finite (low, high) pairs, one per parameter, got [(0.0, 1.0)]"),
        ({"limits": [(0.0, 1.0), (0.0, np.nan)]}, "limits must be 2 finite (low, high) pairs"),
    ],
)
def test_corner_names_a_mismatch_with_the_parameters_in_one_line(options, message):
    with pytest.raises(ValueError) as caught:
        corner(np.random.default_rng(0).normal(size=(50, 2)), **options)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.fixture
def figure():
    return corner(np.random.default_rng(0).normal(size=(200, 2)))


def test_save_figure_appends_png_to_a_bare_path_and_returns_what_it_wrote(figure, tmp_path):
    written = save_figure(figure, tmp_path / "l6")
    assert written == tmp_path / "l6.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "l6").exists()
    assert save_figure(figure, tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    assert save_figure(figure, tmp_path / "new" / "sub" / "c.svg") == tmp_path / "new" / "sub" / "c.svg"


def test_check_figure_path_validates_without_writing(tmp_path):
    assert check_figure_path(tmp_path / "fig") == tmp_path / "fig.png"
    assert check_figure_path(tmp_path / "missing" / "fig.pdf") == tmp_path / "missing" / "fig.pdf"
    assert list(tmp_path.iterdir()) == []


def test_bad_figure_paths_are_one_line_errors_and_write_nothing(figure, tmp_path):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "afile").write_text("")
    for path, message in (
        (tmp_path / "emptydir", f"cannot save the figure to {tmp_path / 'emptydir'}: it is a directory"),
        (tmp_path / "x.xyz", f"cannot save the figure to {tmp_path / 'x.xyz'}: unsupported format '.xyz'; supported: "),
        (tmp_path / "afile" / "x.png", f"cannot save the figure to {tmp_path / 'afile' / 'x.png'}: {tmp_path / 'afile'} is not a directory"),
    ):
        for function in (check_figure_path, lambda p: save_figure(figure, p)):
            with pytest.raises(ValueError) as caught:
                function(path)
            assert str(caught.value).startswith(message)
    with pytest.raises(ValueError) as caught:
        check_figure_path(tmp_path / "x.xyz")
    assert {"pdf", "png", "svg"} <= set(str(caught.value).split("supported: ")[1].split(", "))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "emptydir"]
    assert list((tmp_path / "emptydir").iterdir()) == []


@pytest.fixture(scope="module")
def pairs():
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(400, 2, generator=gen)
    return theta, theta + torch.randn(400, 2, generator=gen)


def test_sbc_rank_histograms(pairs):
    theta, x = pairs
    result = sbc(gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, SD)), theta, x, n_samples=100, names=["a", "b"])
    fig = sbc_ranks(result)
    assert len(fig.axes) == 2
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["a", "b"]
    for ax in fig.axes:
        assert "rank" in ax.get_xlabel()
        assert any(isinstance(p, PolyCollection) or p.get_fill() for p in ax.patches)  # the band
    assert "passed" in fig.get_suptitle()


def test_coverage_curves_show_diagonal_band_and_each_curve(pairs):
    theta, x = pairs
    exact = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, SD))
    narrow = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, SD / 2))
    fig = coverage_curves(
        {"exact": expected_coverage(exact, theta, x, n_samples=100), "narrow": expected_coverage(narrow, theta, x, n_samples=100),
         "TARP": tarp(exact, theta, x, n_samples=100)}
    )
    (ax,) = fig.axes
    assert ax.get_xlabel() == "credible level" and ax.get_ylabel() == "expected coverage"
    labels = [line.get_label() for line in ax.get_lines()]
    assert "exact (pass)" in labels and "narrow (fail)" in labels and "TARP (pass)" in labels
    diagonal = [line for line in ax.get_lines() if len(line.get_xdata()) == 2 and np.allclose(line.get_ydata(), line.get_xdata())]
    assert diagonal
    assert ax.collections  # the band
    narrow_line = next(line for line in ax.get_lines() if line.get_label() == "narrow (fail)")
    assert np.interp(0.5, narrow_line.get_xdata(), narrow_line.get_ydata()) < 0.4  # below the diagonal


def test_training_curves():
    history = History(train_loss=[3.0, 2.0, 1.5], val_loss=[3.1, 2.2, 2.3], learning_rate=[1e-3, 1e-3, 5e-4], best_epoch=1)
    fig = training_curves(history)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch"
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["training", "validation"] and "best (epoch 2)" in labels
    with pytest.raises(ValueError, match="no epochs"):
        training_curves(History())


def test_posterior_predictive_figure_marks_the_observation(pairs):
    _, x = pairs
    simulator = as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape), Gaussian([0.0, 0.0], scale=1.0))
    draws = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, SD)).sample(x[:1], 400, 0)[:, 0]
    result = posterior_predictive_check(simulator, draws, x[0], names=["x_a", "x_b"])
    fig = posterior_predictive(result)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in visible] == ["x_a", "x_b"]
    for ax, observed in zip(visible, result.x_obs):
        assert any(np.allclose(line.get_xdata(), observed) for line in ax.get_lines())
        assert ax.patches  # the histogram


def test_map_panel():
    maps = np.random.default_rng(0).normal(size=(4, 16, 16))
    fig = map_panel(maps[0], maps[1:], titles=["a", "b", "c"])
    images = [ax for ax in fig.axes if any(isinstance(c, AxesImage) for c in ax.get_children())]
    assert [ax.get_title() for ax in images] == ["observed", "a", "b", "c"]
    limits = {ax.get_images()[0].get_clim() for ax in images}
    assert len(limits) == 1  # one colour scale
    with pytest.raises(ValueError, match="same size"):
        map_panel(maps[0], np.zeros((2, 8, 8)))


def test_corner_refuses_a_list_of_rows_instead_of_plotting_each_row_as_a_posterior():
    """``corner([[0.1, 0.2], [0.3, 0.4], ...])`` drew one "posterior" per θ row."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 2))
    message = (
        "samples is a list of rows or numbers (element 1 has shape (2,)), not of (n, D) sample sets: "
        "pass one set as an (n, D) array (e.g. np.asarray(rows)), or several as a dict of named (n, D) arrays"
    )
    for bad in (rows.tolist(), list(rows), [torch.as_tensor(row) for row in rows]):
        with pytest.raises(ValueError) as caught:
            corner(bad)
        assert str(caught.value) == message
    with pytest.raises(ValueError, match=r"^samples is a tuple of rows or numbers \(element 1 has shape \(\)\)"):
        corner((0.1, 0.2, 0.3))
    # a list of 1-D posteriors looks the same, so it is refused too rather than guessed
    with pytest.raises(ValueError, match=r"element 1 has shape \(50,\)"):
        corner([rows[:, 0], rows[:, 1]])
    # the documented forms still work: the rows as one array, a list of (n, D) sets, a 1-D set
    fig = corner(np.asarray(rows.tolist()))
    assert len([ax for ax in fig.axes if ax.get_label() != "legend"]) == 3
    fig = corner([rows, rows + 1])
    (slot,) = [ax for ax in fig.axes if ax.get_label() == "legend"]
    assert [t.get_text() for t in slot.get_legend().get_texts()][:2] == ["posterior 1", "posterior 2"]
    assert len(corner(rows[:, 0]).axes) == 1
