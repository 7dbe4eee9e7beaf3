"""Figures render: files exist with the expected pixel size, are not blank, and comparisons share one colour scale."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib import patheffects
from matplotlib.image import AxesImage
from matplotlib.patches import Ellipse, Rectangle
from PIL import Image

from erf_tools import plotting
from erf_tools.analysis import analyze
from erf_tools.results import ERFResult


def gaussian_result(model: str = "toy", *, size: int = 64, sigma: float = 6.0, peak: float = 1.0,
                    centre: tuple[float, float] | None = None, target: str = "stages.3",
                    weights: dict | None = None) -> ERFResult:
    """A synthetic ERF result: an isotropic Gaussian of height ``peak`` on a small floor."""
    y, x = np.indices((size, size))
    cy, cx = centre or (size / 2, size / 2)
    erf_map = peak * (np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)) + 1e-4)
    return ERFResult(
        map=erf_map, per_image_maps=None, per_image_downsample=1, num_images=3, num_rejected=0, rejected_images=[],
        image_ids=["a", "b", "c"], target=target, feature_shape=(8, 4, 4), centre_unit=(2, 2),
        receptive_field_centre=(cy, cx), total_stride=(16.0, 16.0), input_size=(size, size), model=model,
        protocol="replknet", options={}, weights=weights or {"source": "active", "init_mode": "active", "seed": 0},
        image_source={"kind": "sample"}, preprocessing={}, seed=0,
    )


def distinct_colours(path) -> int:
    with Image.open(path) as image:
        return len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0))


def images_of(figure) -> list[AxesImage]:
    return [artist for ax in figure.axes for artist in ax.get_images()]


@pytest.fixture(scope="module")
def results() -> list[ERFResult]:
    # very different magnitudes, as between models (random-init ResNet ~1e4, RepLKNet ~1e-4)
    return [gaussian_result("narrow", sigma=3, peak=5e4), gaussian_result("wide", sigma=12, peak=6e-4),
            gaussian_result("mid", sigma=7, peak=1.0)]


@pytest.mark.parametrize("scale", plotting.SCALES)
def test_compare_figure_png_has_the_figure_size_and_is_not_blank(results, tmp_path, scale):
    figure = plotting.compare_figure(results, scale=scale, dpi=100)
    width, height = figure.get_size_inches()
    (path,) = plotting.save_figure(figure, tmp_path / "cmp", ["png"])
    assert path == tmp_path / "cmp.png" and path.is_file()
    with Image.open(path) as image:
        assert image.size == (round(width * 100), round(height * 100))
    assert distinct_colours(path) > 50


def test_shared_colour_scale_is_really_shared(results):
    for normalise in plotting.NORMALISATIONS:
        figure = plotting.compare_figure(results, scale="linear", normalise=normalise)
        images = images_of(figure)
        assert len(images) == len(results)
        norms = {(image.norm.vmin, image.norm.vmax) for image in images}
        assert len(norms) == 1, f"panels use different colour limits with normalise={normalise}"
        expected = max(float(plotting.display_map(r.map, normalise).max()) for r in results)
        assert norms.pop()[1] == pytest.approx(expected)
        assert len([ax for ax in figure.axes if ax.get_label() == "<colorbar>"]) == 1


def test_log_scale_spans_the_requested_decades(results):
    figure = plotting.compare_figure(results, scale="log", log_decades=4)
    norm = images_of(figure)[0].norm
    assert norm.vmax == pytest.approx(1.0) and norm.vmin == pytest.approx(1e-4)


def test_figures_state_protocol_size_images_and_weights(results):
    mixed = results + [gaussian_result("rand", weights={"source": "random", "seed": 0, "silenced_branches": ["x"]})]
    text = plotting.caption(mixed)
    for part in ("protocol replknet", "64×64 px", "3 sample images", "all-branches-active", "random init"):
        assert part in text
    figure = plotting.compare_figure(mixed)
    assert "protocol replknet" in figure.get_suptitle() and "3 sample images" in figure.get_suptitle()
    assert "weights:" in plotting.stage_grid({"a": results}).get_suptitle()
    assert "64×64 px" in plotting.radial_profile_figure(results).get_suptitle()
    assert "all-branches-active" in plotting.erf_figure(results[0]).get_suptitle()


def test_contours_and_squares_come_from_the_agd_report(tmp_path):
    result = gaussian_result(sigma=5)
    report = analyze(result, bootstrap=0)
    figure = plotting.compare_figure([result], [report], contours=True, squares=True)
    ax = figure.axes[0]
    ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
    squares = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(ellipses) == len(plotting.CONTOUR_SIGMAS)
    assert ellipses[0].width / 2 == pytest.approx(report.fit.sigma_major, rel=1e-6)
    assert len(squares) == sum(a.side is not None for a in report.area_ratios)
    assert sorted(round(s.get_width()) for s in squares) == sorted(a.side for a in report.area_ratios if a.side)
    with pytest.raises(ValueError, match="reports"):
        plotting.compare_figure([result], contours=True)


def test_overlay_labels_have_a_dark_box_and_outline_and_panels_name_their_weights():
    probe = gaussian_result(sigma=5)
    trained = gaussian_result("uniconvnet_t", sigma=8, weights={"source": "pretrained",
                                                                 "file": "uniconvnet_t_1k_224_ema.pth"})
    reports = [analyze(r, bootstrap=0) for r in (probe, trained)]
    figure = plotting.compare_figure([probe, trained], reports, contours=True, squares=True)
    first, second = [ax for ax in figure.axes if ax.get_images()]
    labels = first.texts
    assert [t.get_text() for t in labels if t.get_text().startswith("r(99 %)")]  # the once-unreadable label
    for text in labels:
        box = text.get_bbox_patch()
        assert box is not None and box.get_facecolor()[:3] == (0.0, 0.0, 0.0) and box.get_alpha() >= 0.7
        (outline,) = text.get_path_effects()
        assert isinstance(outline, patheffects.withStroke)
    squares = [p for p in first.patches if isinstance(p, Rectangle)]
    assert squares and all(len(p.get_path_effects()) == 2 for p in squares)  # dark stroke under each line
    (marker,) = first.get_lines()  # the receptive-field centre
    assert marker.get_marker() == "+" and len(marker.get_path_effects()) == 2
    assert first.get_title() == "toy\nAGD score 1.01\narchitecture probe\n(active init, seed 0)"  # Gaussian within noise
    assert second.get_title().endswith("trained\n(uniconvnet_t_1k_224_ema.pth)")


def test_erf_figure_pixel_size(tmp_path):
    figure = plotting.erf_figure(gaussian_result(), size=4.0, dpi=80)
    (path,) = plotting.save_figure(figure, tmp_path / "one.png")
    with Image.open(path) as image:
        assert image.size == (320, round(4.0 * 1.12 * 80))
    assert distinct_colours(path) > 50


def test_save_figure_writes_every_format_atomically(results, tmp_path):
    paths = plotting.save_figure(plotting.compare_figure(results), tmp_path / "sub" / "fig.png", ["png", "pdf", "svg"])
    assert [p.name for p in paths] == ["fig.png", "fig.pdf", "fig.svg"]
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert b"<svg" in paths[2].read_bytes()[:2000]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["fig.pdf", "fig.png", "fig.svg"]  # no temp files
    with pytest.raises(ValueError, match="not supported"):
        plotting.save_figure(plotting.compare_figure(results), tmp_path / "x", ["jpg"])


def test_radial_profiles_on_one_axis_about_the_rf_centre(results):
    shifted = gaussian_result("shifted", sigma=4, centre=(20.0, 24.0))
    figure = plotting.radial_profile_figure([*results, shifted])
    lines = figure.axes[0].get_lines()
    assert len(lines) == 4
    x, y = lines[-1].get_data()
    assert y[0] == pytest.approx(1.0)  # peak-normalised, centred on the receptive-field centre
    assert np.all(np.diff(y[np.isfinite(y)]) <= 1e-12)
    assert figure.axes[0].get_yscale() == "log"


def test_stage_grid_has_one_row_per_model_and_one_column_per_stage(results):
    stages = [gaussian_result("m", sigma=s, target=f"stages.{i}") for i, s in enumerate((2, 4, 8, 16))]
    figure = plotting.stage_grid({"m": stages, "n": stages[:2]})
    panels = [ax for ax in figure.axes if ax.get_images()]
    assert len(panels) == 6
    assert len({(im.norm.vmin, im.norm.vmax) for im in images_of(figure)}) == 1
    assert panels[0].get_title().startswith("stages.0")


def test_bad_inputs_are_refused(results):
    signed = gaussian_result()
    signed.map = signed.map - signed.map.mean()
    with pytest.raises(ValueError, match="negative"):
        plotting.compare_figure([signed], scale="log")
    plotting.compare_figure([signed], scale="linear")  # signed maps are shown on a diverging scale
    with pytest.raises(ValueError, match="scale"):
        plotting.compare_figure(results, scale="sqrt")
    with pytest.raises(ValueError, match="at least one"):
        plotting.compare_figure([])


def test_heatmap_footer_states_the_interval_and_warns_about_too_few_images():
    result = gaussian_result(sigma=6.0)
    report = analyze(result, bootstrap=20)
    text = plotting.score_footer(report, result)
    assert text.startswith(f"AGD score {report.agd_score:.3f}") and f"from {result.num_images} images" in text
