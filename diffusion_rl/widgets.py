"""Sliders that work both in a live notebook and in the book's static HTML.

A slider in a static page has no kernel behind it, so nothing can be computed when it moves.
:func:`slider_view` therefore computes the view for every slider position when the cell runs,
puts the views in a :class:`ipywidgets.Stack`, and links the slider's position to the Stack's
selected child with :func:`ipywidgets.jslink`. The link lives in the browser: the widget state that
the book build saves into the page carries every view, and moving the slider switches between them
with or without a kernel.

Views are plain widgets (``Image`` for figures, ``HTML`` for text and videos), not captured
``Output`` areas, so they render the same in Jupyter, Colab and the static page.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["as_widget", "slider_view"]


def as_widget(view: Any):
    """A widget showing ``view``: a widget as is, a matplotlib figure as a PNG image, anything else as HTML."""
    import ipywidgets as widgets

    if isinstance(view, widgets.Widget):
        return view
    if hasattr(view, "savefig"):
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        # 100 dpi, as the inline backend: a figure drawn 7 inches wide fills the book's column at full size.
        view.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(view)  # shown through the widget only, not a second time by the inline backend
        png = buf.getvalue()
        natural = int.from_bytes(png[16:20], "big")  # the PNG header's width field
        # As wide as the page allows, never wider than drawn: no sideways scrolling on narrow pages
        # (no margin either: 100% plus the default widget margin overflowed by 4 px).
        return widgets.Image(value=png, format="png",
                             layout=widgets.Layout(width="100%", max_width=f"{natural}px", height="auto", margin="0"))
    if hasattr(view, "_repr_html_"):
        view = view._repr_html_()
    return widgets.HTML(value=str(view))


def slider_view(
    values: Sequence[Any],
    render: Callable[[Any], Any],
    description: str,
    value: Any = None,
    labels: Sequence[str] | None = None,
    progress: bool = False,
):
    """A slider over ``values`` above ``render(v)`` for the chosen v, every view computed now and switched in the browser.

    ``render`` returns a matplotlib figure, an HTML string (or an object with ``_repr_html_``,
    such as :func:`diffusion_rl.video.show_video`'s), or a widget. ``value`` picks the starting
    position (default: the first). Returns a ``VBox`` (slider, stack) to display; its ``link`` is
    the browser-side link between them.
    """
    import ipywidgets as widgets

    values = list(values)
    if not values:
        raise ValueError("slider_view needs at least one value.")
    labels = [str(v) for v in values] if labels is None else [str(s) for s in labels]
    if len(labels) != len(values):
        raise ValueError(f"Got {len(labels)} labels for {len(values)} values.")
    start = 0 if value is None else values.index(value)
    items = values
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(values, desc=description, leave=False)
    views = [as_widget(render(v)) for v in items]
    slider = widgets.SelectionSlider(
        options=list(zip(labels, range(len(values)))), index=start, description=description,
        continuous_update=True, style={"description_width": "initial"}, layout=widgets.Layout(width="480px"),
    )
    stack = widgets.Stack(views, selected_index=start)
    box = widgets.VBox([slider, stack])
    box.link = widgets.jslink((slider, "index"), (stack, "selected_index"))
    return box
