"""Tests of lvmkit.inference.plots: every function writes a PNG of the expected size."""

import math

import matplotlib.image
import numpy as np
import pytest
import torch

from lvmkit.inference import plots
from lvmkit.inference.training import History


def read_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def is_not_blank(image):
    return float(image[..., :3].std()) > 0.01


# --------------------------------------------------------------------------- loss


def test_plot_loss_single_run(tmp_path):
    path = plots.plot_loss([3.0, 2.5, 2.0, 1.8], tmp_path / "sub" / "loss.png", dpi=50)
    assert path == tmp_path / "sub" / "loss.png"
    image = read_png(path)
    assert image.shape[:2] == (200, 300)  # figsize (6, 4) inches at 50 dpi
    assert is_not_blank(image)


def test_plot_loss_several_runs_history_objects_and_smoothing(tmp_path):
    history = History()
    for step in range(1, 31):
        history.record(step, 0, 100.0 / step, float(step))
    runs = {
        "fit": history,
        "dict": history.to_dict(),
        "pairs": [(10 * i, 5.0 - 0.1 * i) for i in range(20)],
    }
    path = plots.plot_loss(
        runs, tmp_path / "runs.png", smoothing=0.8, logy=True, figsize=(5, 3), dpi=80
    )
    assert read_png(path).shape[:2] == (240, 400)


def test_plot_loss_errors(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plots.plot_loss([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="history 'b' is empty"):
        plots.plot_loss({"a": [1.0], "b": []}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="no runs"):
        plots.plot_loss({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\)"):
        plots.plot_loss([1.0, 2.0], tmp_path / "a.png", smoothing=1.0)
    with pytest.raises(ValueError, match="shape"):
        plots.plot_loss([[1.0, 2.0, 3.0]], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_ema_is_debiased_and_skips_nan():
    values = np.array([2.0, math.nan, 4.0])
    smoothed = plots.ema(values, 0.5)
    assert smoothed[0] == pytest.approx(2.0)  # debiased: no pull towards 0
    assert smoothed[1] == pytest.approx(2.0)
    # weights 0.25 * 2 + 0.5 * 4 over 0.75
    assert smoothed[2] == pytest.approx((0.25 * 2.0 + 0.5 * 4.0) / 0.75)
    np.testing.assert_allclose(plots.ema(values, 0.0)[[0, 2]], [2.0, 4.0])


# --------------------------------------------------------------------------- variance, traces


def test_plot_grad_variance(tmp_path):
    records = {
        "rebar": [(step, -3.0 - 0.01 * step) for step in range(0, 500, 50)],
        "nvil": [(step, 2.0) for step in range(0, 500, 50)],
    }
    path = plots.plot_grad_variance(records, tmp_path / "var.png", dpi=50)
    image = read_png(path)
    assert image.shape[:2] == (200, 300)
    assert is_not_blank(image)


def test_plot_grad_variance_errors(tmp_path):
    with pytest.raises(ValueError, match="records is empty"):
        plots.plot_grad_variance({}, tmp_path / "v.png")
    with pytest.raises(ValueError, match=r"records\['nvil'\] is empty"):
        plots.plot_grad_variance({"rebar": [(1, 0.0)], "nvil": []}, tmp_path / "v.png")
    with pytest.raises(ValueError, match=r"records\['rebar'\]: expected \(step, value\) pairs"):
        plots.plot_grad_variance({"rebar": [1.0, 2.0]}, tmp_path / "v.png")


def test_plot_traces_dict_and_history(tmp_path):
    extras = {"eta": [1.0, 1.1, 1.2], "temperature": [math.nan, 0.5, 0.45], "other": [0, 1, 2]}
    path = plots.plot_traces(extras, tmp_path / "t.png", keys=["eta", "temperature"], dpi=50)
    assert read_png(path).shape[:2] == (200, 300)  # two panels of 2 inches, 6 wide
    history = History()
    for step in range(1, 4):
        history.record(step, 0, 1.0, 0.0, {"eta": 1.0 + step})
    path = plots.plot_traces(history, tmp_path / "h.png", dpi=50)
    assert read_png(path).shape[:2] == (100, 300)


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures the plot functions save, to read their texts."""
    figures = []
    save = plots._save

    def recording(figure, path, *args, **kwargs):
        figures.append(figure)
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", recording)
    return figures


def test_plot_traces_titles_and_labels_say_what_and_in_which_units(tmp_path, saved_figures):
    history = History()
    for step in range(1, 5):
        extras = {"temperature": 0.5, "eta/b1": 1.0, "variance_objective": 10.0**step,
                  "log_grad_variance": math.nan if step == 1 else -float(step), "mine": 2.0}
        history.record(step, 0, 30.0 - step, 0.0, extras)
    path = plots.plot_traces(history, tmp_path / "t.png", include_loss=True, dpi=50,
                             title="traces, sbn (rebar)")
    assert read_png(path).shape[:2] == (600, 300)  # six panels of 2 inches
    (figure,) = saved_figures
    assert figure._suptitle.get_text() == "traces, sbn (rebar)"
    axes = figure.axes
    assert [a.get_ylabel() for a in axes[:2]] == ["loss per datum (nats)", "temperature λ"]
    assert axes[2].get_title() == "control-variate weight η, b1"
    assert axes[3].get_yscale() == "log"  # the variance objective spans decades
    assert "log of mean\nper-coordinate variance" in axes[4].get_ylabel()
    assert (axes[5].get_title(), axes[5].get_ylabel()) == ("mine", "value")
    assert axes[-1].get_xlabel() == "step"
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), [29, 28, 27, 26])
    with pytest.raises(ValueError, match="include_loss=True needs a History"):
        plots.plot_traces({"eta": [1.0]}, tmp_path / "x.png", include_loss=True)


def test_compare_legends_sit_outside_the_axes(tmp_path, saved_figures):
    runs = {name: [3.0, 2.0, 1.0] for name in ("rebar", "relax", "nvil", "arm", "disarm")}
    plots.plot_loss(runs, tmp_path / "l.png")
    plots.plot_grad_variance({k: [(1, 0.0), (2, -1.0)] for k in runs}, tmp_path / "v.png")
    for figure in saved_figures:
        (axes,) = figure.axes
        assert axes.get_legend() is None and len(figure.legends) == 1
        figure.canvas.draw()
        legend = figure.legends[0].get_window_extent()
        assert legend.x0 >= axes.get_window_extent().x1  # right of the axes, covering nothing


def test_plot_traces_errors(tmp_path):
    with pytest.raises(ValueError, match="extras is empty"):
        plots.plot_traces({}, tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"keys \['tau'\] not in extras"):
        plots.plot_traces({"eta": [1.0]}, tmp_path / "t.png", keys=["tau"])
    with pytest.raises(ValueError, match=r"extras\['eta'\] is empty"):
        plots.plot_traces({"eta": []}, tmp_path / "t.png")


# --------------------------------------------------------------------------- images


def test_plot_image_grid_pixels_and_content(tmp_path):
    images = torch.zeros(10, 12)
    images[3] = 1.0  # one white image among black ones
    path = plots.plot_image_grid(images, (3, 4), tmp_path / "grid.png", nrow=4, pad=1, scale=2)
    image = read_png(path)
    # 3 rows of 4 columns, 1-pixel padding, each image pixel 2x2 PNG pixels
    assert image.shape[:2] == (2 * (3 * (3 + 1) + 1), 2 * (4 * (4 + 1) + 1))
    assert image.shape[:2] == plots.grid_pixels(10, (3, 4), 4, pad=1, scale=2)
    grey = image[..., :3].mean(-1)
    # image 3 sits in row 0, column 3: grid pixels rows 1..3, columns 16..19
    np.testing.assert_allclose(grey[2:8, 32:40], 1.0, atol=1e-6)
    np.testing.assert_allclose(grey[2:8, 2:10], 0.0, atol=1e-6)  # image 0 is black


def test_plot_image_grid_with_title_and_numpy_input(tmp_path):
    images = np.random.default_rng(0).uniform(size=(5, 64))
    path = plots.plot_image_grid(images, (8, 8), tmp_path / "t.png", nrow=8, title="samples")
    assert read_png(path).shape[:2] == plots.grid_pixels(5, (8, 8), 8, title=True)


@pytest.mark.parametrize("image_shape, count", [((8, 8), 16), ((28, 28), 16), ((28, 28), 3)])
def test_image_grids_are_readable_by_default(tmp_path, image_shape, count):
    """At least MIN_GRID_PIXELS wide with whole-pixel zoom (the CLI's grids were 292 px)."""
    images = torch.rand(count, image_shape[0] * image_shape[1])
    path = plots.plot_image_grid(images, image_shape, tmp_path / "g.png", title="samples")
    height, width = read_png(path).shape[:2]
    assert (height, width) == plots.grid_pixels(count, image_shape, 8, title=True)
    assert width >= plots.MIN_GRID_PIXELS
    path = plots.plot_reconstructions(images, images, image_shape, tmp_path / "r.png")
    assert read_png(path).shape[1] >= plots.MIN_GRID_PIXELS
    # nearest-neighbour: one zoomed image pixel is a block of one colour
    scale = plots.grid_pixels(1, image_shape, 1, pad=0)[1] // image_shape[1]
    grid = read_png(plots.plot_image_grid(images[:1], image_shape, tmp_path / "one.png",
                                          pad=0))[..., 0]
    assert scale > 1 and np.ptp(grid[:scale, :scale]) == 0


def test_plot_image_grid_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected shape \(n, 64\).*got \(3, 60\)"):
        plots.plot_image_grid(torch.rand(3, 60), (8, 8), tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"image_shape must be \(height, width\)"):
        plots.plot_image_grid(torch.rand(3, 64), (8, 8, 1), tmp_path / "g.png")
    with pytest.raises(ValueError, match="outside"):
        plots.plot_image_grid(torch.full((2, 4), 1.5), (2, 2), tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"got \(0, 4\)"):
        plots.plot_image_grid(torch.zeros(0, 4), (2, 2), tmp_path / "g.png")
    with pytest.raises(ValueError, match="nrow"):
        plots.plot_image_grid(torch.zeros(2, 4), (2, 2), tmp_path / "g.png", nrow=0)
    assert not (tmp_path / "g.png").exists()


def test_plot_reconstructions(tmp_path):
    x = torch.zeros(6, 16)
    recon = torch.ones(6, 16)
    path = plots.plot_reconstructions(
        x, recon, (4, 4), tmp_path / "r.png", num_images=5, title=None, scale=3
    )
    image = read_png(path)
    assert image.shape[:2] == plots.grid_pixels(10, (4, 4), 5, scale=3)
    grey = image[..., :3].mean(-1)
    top, bottom = grey[3:15, 3:15], grey[18:30, 3:15]  # first original, its reconstruction
    assert top.max() == pytest.approx(0.0, abs=1e-6)
    assert bottom.min() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        plots.plot_reconstructions(x, recon[:5], (4, 4), tmp_path / "r.png")
    with pytest.raises(ValueError, match="recon: expected shape"):
        plots.plot_reconstructions(x, torch.ones(6, 15), (4, 4), tmp_path / "r.png")


# --------------------------------------------------------------------------- 2-D densities


def standard_normal_log_density(points):
    return -0.5 * (points**2).sum(-1)


def test_plot_density_2d_function_and_samples(tmp_path):
    samples = torch.randn(200, 2) * 0.5
    path = plots.plot_density_2d(
        standard_normal_log_density,
        tmp_path / "d.png",
        samples=samples,
        grid_size=30,
        title="AutoNormal",
        dpi=40,
    )
    image = read_png(path)
    assert image.shape[:2] == (200, 200)
    assert is_not_blank(image)
    path = plots.plot_density_2d(
        torch.randn(500, 2), tmp_path / "s.png", samples=samples, grid_size=20, dpi=40
    )
    assert read_png(path).shape[:2] == (200, 200)


def test_plot_density_2d_legend_sits_below_the_axes(tmp_path, saved_figures):
    """Inside the axes, the legend covered the samples in its corner."""
    plots.plot_density_2d(standard_normal_log_density, tmp_path / "d.png",
                          samples=torch.randn(50, 2) + 2.0, grid_size=10)
    (figure,) = saved_figures
    (axes,) = [a for a in figure.axes if a.get_label() != "<colorbar>"]
    assert axes.get_legend() is None and len(figure.legends) == 1
    figure.canvas.draw()
    assert figure.legends[0].get_window_extent().y1 <= axes.get_window_extent().y0


def test_plot_density_2d_errors(tmp_path):
    with pytest.raises(ValueError, match="bounds are needed"):
        plots.plot_density_2d(standard_normal_log_density, tmp_path / "d.png")
    with pytest.raises(ValueError, match=r"samples: expected shape \(n, 2\)"):
        plots.plot_density_2d(
            standard_normal_log_density, tmp_path / "d.png", samples=torch.randn(10, 3)
        )
    with pytest.raises(ValueError, match=r"must return shape \(100,\)"):
        plots.plot_density_2d(
            lambda p: p, tmp_path / "d.png", bounds=((-1, 1), (-1, 1)), grid_size=10
        )
    with pytest.raises(ValueError, match="bounds must be"):
        plots.plot_density_2d(
            standard_normal_log_density, tmp_path / "d.png", bounds=((1, -1), (-1, 1))
        )
    assert not (tmp_path / "d.png").exists()


# --------------------------------------------------------------------------- forest


def forest_table(rows=3):
    import pandas

    index = [f"theta[{i}]" for i in range(rows)]
    columns = pandas.MultiIndex.from_tuples(
        [("guide", "mean"), ("guide", "sd"), ("nuts", "mean"), ("nuts", "sd")]
    )
    values = np.column_stack([np.arange(rows), np.ones(rows), np.arange(rows) + 0.5,
                              np.full(rows, 0.5)])
    return pandas.DataFrame(values, index=index, columns=columns)


def test_plot_forest_from_a_summary_table(tmp_path):
    path = plots.plot_forest(forest_table(3), tmp_path / "f.png", dpi=50)
    image = read_png(path)
    assert image.shape[:2] == (150, 300)  # (1.5 + 0.5 * 3 rows) x 6 inches at 50 dpi
    assert is_not_blank(image)
    # the format follows the extension, as before the forest plot moved here
    svg = plots.plot_forest(forest_table(2), tmp_path / "f.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_plot_forest_errors(tmp_path):
    table = forest_table(2)
    with pytest.raises(ValueError, match=r"missing \[\('hmc', 'mean'\), \('hmc', 'sd'\)\]"):
        plots.plot_forest(table, tmp_path / "f.png", groups=("guide", "hmc"))
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_forest(table.iloc[:0], tmp_path / "f.png")
    with pytest.raises(ValueError, match="backend must be"):
        plots.plot_forest(table, tmp_path / "f.png", backend="plotly")
    with pytest.raises(ValueError, match="needs posteriors and var_names"):
        plots.plot_forest(table, tmp_path / "f.png", backend="arviz")
    assert not (tmp_path / "f.png").exists()
