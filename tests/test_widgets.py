"""Sliders for the static book: every view is computed up front and linked to the slider in the browser."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib
import pytest

from diffusion_rl.widgets import as_widget, slider_view

matplotlib.use("Agg")


def test_slider_view_precomputes_every_view_and_links_them():
    calls = []

    def render(v):
        calls.append(v)
        return f"<b>value {v}</b>"

    box = slider_view([1, 2, 4], render, "k", value=2)
    slider, stack = box.children
    assert calls == [1, 2, 4]
    assert [c.value for c in stack.children] == ["<b>value 1</b>", "<b>value 2</b>", "<b>value 4</b>"]
    assert slider.index == stack.selected_index == 1
    assert slider.label == "2"
    # The link must live in the browser (jslink), or the static page could not switch views.
    assert type(box.link).__name__ == "Link"  # jslink's, not a Python-side observer
    assert box.link.source == (slider, "index") and box.link.target == (stack, "selected_index")


def test_views_become_widgets():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    image = as_widget(fig)
    assert isinstance(image, widgets.Image) and image.value[:4] == b"\x89PNG"
    assert image.layout.width == "100%" and image.layout.max_width.endswith("px")
    assert not plt.get_fignums()  # shown through the widget only
    assert isinstance(as_widget("<i>x</i>"), widgets.HTML)
    button = widgets.Button()
    assert as_widget(button) is button


def test_slider_view_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        slider_view([], str, "k")
    with pytest.raises(ValueError, match="labels"):
        slider_view([1, 2], str, "k", labels=["a"])
