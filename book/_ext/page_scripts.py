"""Sphinx extension: each page loads each script once, and the widget manager only where there are widgets.

sphinx-thebe and sphinx-togglebutton register their inline configuration scripts once per read of
the sources, and a Jupyter Book build reads twice, so every page would declare ``const
THEBE_JS_URL`` twice: a SyntaxError in the browser. Duplicates are dropped here. The widget
manager (3 MB) is kept only on pages that carry saved widget state, with a small shim: the widget
manager typesets labels through MathJax 2's API, and the book loads MathJax 3.
"""

from __future__ import annotations

from pathlib import Path

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
SHIM = "mathjax_hub_shim.js"


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    files = context.get("script_files")
    if not files:
        return
    attrs = [getattr(js, "attributes", None) or {} for js in files]
    has_widgets = any(a.get("type") == WIDGET_STATE for a in attrs)
    seen, kept = set(), []
    for js, a in zip(files, attrs):
        name = getattr(js, "filename", None) or ""
        key = (name, a.get("body"))
        if key in seen or (not has_widgets and ("widgets/" in name or name.endswith(SHIM))):
            continue
        seen.add(key)
        kept.append(js)
    context["script_files"] = kept


def add_static(app) -> None:
    app.config.html_static_path.append(str(Path(__file__).parent / "static"))


def setup(app):
    app.connect("builder-inited", add_static)
    # Deferred like MathJax and after it, so window.MathJax is MathJax 3's object when it runs.
    app.add_js_file(SHIM, defer="defer", priority=900)
    # After myst-nb and the themes have added their scripts to the page context.
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
