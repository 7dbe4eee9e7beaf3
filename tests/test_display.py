"""Jupyter display of results and reports (:mod:`erf_tools.display`) and the notebook progress callback."""
from __future__ import annotations

import base64
import io
import re
import sys
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from erf_tools import display
from erf_tools.analysis import analyze
from tests.test_plotting import gaussian_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Checker(HTMLParser):
    """Collects tags and text, and fails on a closing tag that does not match the open one (malformed HTML)."""

    VOID = {"img", "br"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def parsed(markup: str) -> _Checker:
    checker = _Checker()
    checker.feed(markup)
    checker.close()
    assert not checker.stack, f"unclosed tags {checker.stack}"
    return checker


def embedded_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):])
    assert data.startswith(PNG_MAGIC)
    return Image.open(io.BytesIO(data))


def test_result_html_has_a_thumbnail_and_says_what_the_map_is():
    result = gaussian_result("uniconvnet_t", sigma=5)
    markup = result._repr_html_()
    assert '<img src="data:image/png;base64,' in markup
    page = parsed(markup)
    (src,) = page.images
    assert embedded_png(src).size == (64, 64)  # small maps keep their pixels ...
    assert 'width="192" height="192"' in markup  # ... shown 3× enlarged, about the thumbnail size
    text = " ".join(page.text)
    for part in ("uniconvnet_t", "stages.3", "64×64 px", "architecture probe (active init, seed 0)", "replknet"):
        assert part in text
    assert re.search(r"images\s*3", text)


def test_png_repr_of_a_large_map_is_a_small_thumbnail_made_fast():
    result = gaussian_result(size=1024, sigma=60)
    display.result_png(result)  # first call imports matplotlib's colormaps; timed below is the repeat cost
    started = time.perf_counter()
    png = result._repr_png_()
    markup = result._repr_html_()
    elapsed = time.perf_counter() - started
    assert png.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(png))
    assert image.size == (170, 170) and max(image.size) <= display.THUMBNAIL_PX  # 6×6 block means of 1024²
    assert len(markup) < 60_000 and elapsed < 0.5


def test_thumbnail_colours_follow_the_log_scale():
    rgb = display.thumbnail_rgb(np.array([[1.0, 1e-2], [1e-3, 0.0]]))
    from matplotlib import colormaps

    expected = colormaps["inferno"](np.array([1.0, 1 / 3, 0.0, 0.0]), bytes=True)[:, :3]
    np.testing.assert_array_equal(rgb.reshape(4, 3), expected)
    signed = display.thumbnail_rgb(np.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(signed[0, 0], colormaps["RdBu_r"](1.0, bytes=True)[:3])


def test_report_html_shows_the_headline_numbers():
    result = gaussian_result(sigma=5)
    report = analyze(result, bootstrap=0)
    report.confidence_intervals["agd_score"] = (0.912, 0.987)
    page = parsed(report._repr_html_())
    cells = dict(zip(page.text[1::2], page.text[2::2]))  # after the heading: label, value, label, value, ...
    assert cells["AGD score"] == f"{report.agd_score:.3f} [0.912, 0.987]"
    assert cells["AGD score (raw map)"] == f"{report.agd_score_raw:.3f}"
    assert cells["σ major / minor (px)"] == (f"{report.spread['sigma_major']:.2f} / "
                                             f"{report.spread['sigma_minor']:.2f}")
    assert cells["σ major / minor (px)"].startswith("5.0")
    assert cells["R²"] == f"{report.r_squared:.3f}"
    assert cells["noise model"] == report.noise_model == "map-only"
    assert cells["images"] == "3"
    assert cells["flags"] == (", ".join(report.flags) or "none")


def test_notebook_progress_prints_every_tenth_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm then raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.std", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    progress = display.notebook_progress("resnet18")
    for done in range(1, 21):
        progress(done, 20)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "resnet18: 1/20 images (5 %)"
    assert lines[1] == "resnet18: 2/20 images (10 %)" and lines[-1] == "resnet18: 20/20 images (100 %)"
    assert len(lines) == 11
    compare = display.notebook_progress("measuring")  # run_compare's form: progress(model, done, total)
    compare("a", 1, 1)
    compare("b", 1, 2)
    assert capsys.readouterr().out.splitlines() == ["measuring a: 1/1 images (100 %)", "measuring b: 1/2 images (50 %)"]


def test_notebook_progress_uses_a_tqdm_text_bar_when_tqdm_is_there(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # the text bar, as in a notebook without widgets
    progress = display.notebook_progress("resnet18")
    for done in (1, 2, 4):
        progress(done, 4)
    err = capsys.readouterr().err
    assert "resnet18" in err and "4/4" in err
