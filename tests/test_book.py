"""The book: it builds from the README's command with warnings as errors, and every page works in a browser.

The browser is headless Chromium (Debian's, with its chromedriver) or Google Chrome with its driver
(GitHub's hosted runners), driven by Selenium. The pages are opened from disk, so anything a page
would fetch from the network fails here. That is deliberate: the built book must work offline
(MathJax and the widget manager are vendored).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from test_publish import machine_traces

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["book/intro"] + [line.split("file:")[1].strip() for line in (ROOT / "_toc.yml").read_text().splitlines() if "file:" in line]
VIDEO = r"<video[^>]*>\s*<source src=\"data:video/mp4;base64,"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


@pytest.fixture(scope="module")
def html(request) -> Path:
    """The book, built once exactly as `make book` builds it (started by conftest.py beside the other tests)."""
    return request.config.book_build.html()


@pytest.mark.slow
def test_every_chapter_is_built_with_its_figures_and_videos(html):
    for chapter in CHAPTERS:
        assert (html / f"{chapter}.html").is_file(), f"{chapter}.html missing"
    data_page = (html / "book" / "02_data.html").read_text()
    assert re.search(VIDEO, data_page), "the episode video is not embedded"
    assert "colab.research.google.com" in data_page, "no Colab launch button"
    figures = re.findall(r'<img[^>]+src="\.\./_images/([^"]+\.png)"', data_page)
    assert len(figures) >= 2, "the chapter's figures are missing (a non-inline matplotlib backend?)"
    assert all((html / "_images" / name).is_file() for name in figures)

    sweep_page = (html / "book" / "08_distribution_shift.html").read_text()
    assert len(re.findall(VIDEO, sweep_page)) == 2, "the best-setting and fall videos"
    assert len(re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', sweep_page)) >= 4, "the sweep's figures are missing"
    assert "window-table" in sweep_page, "the window table is missing"

    # The sliders of chapters 6 (guidance scale) and 7 (window size) carry their precomputed views.
    for chapter in ("book/06_guidance", "book/07_planning"):
        assert WIDGET_STATE in (html / f"{chapter}.html").read_text(), f"{chapter} has no saved slider state"
    for page in html.rglob("*.html"):
        text = page.read_text()
        assert "cdn.jsdelivr.net" not in text and "cdnjs.cloudflare.com" not in text, f"{page} loads a CDN"
        assert "NBVAL" not in text, f"{page.name} shows an nbval marker (use the nbval-* cell tags)"
        traces = [m.group(0) for m in machine_traces(text, extra=(str(ROOT),))]
        assert not traces, f"{page.name} shows paths of the machine that built it: {traces[:5]}"
        for video in re.findall(r"data:video/mp4;base64,([A-Za-z0-9+/=]+)", text):
            assert len(video) * 3 / 4 < 2_000_000, f"a video of {page.name} is over 2 MB"


def _checked_outputs(cell) -> list[tuple[str, str]]:
    """What a checked cell printed: its standard output and the plain-text form of its results (pictures, HTML and
    standard error, where progress bars and warnings go, are not compared)."""
    out: list[tuple[str, str]] = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            if o["name"] != "stdout":
                continue
            if out and out[-1][0] == "stdout":  # how a kernel splits a stream into messages is not output
                out[-1] = ("stdout", out[-1][1] + o["text"])
            else:
                out.append(("stdout", o["text"]))
        elif o["output_type"] in ("execute_result", "display_data") and "text/plain" in o.get("data", {}):
            out.append(("text/plain", o["data"]["text/plain"]))
        elif o["output_type"] == "error":
            out.append(("error", o["ename"]))
    return out


def test_a_checked_output_is_what_a_cell_printed_however_the_kernel_split_it():
    import nbformat

    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("x", outputs=[out("stream", name="stdout", text="1\n"), out("stream", name="stderr", text="50%"),
                                                   out("stream", name="stdout", text="2\n"), out("execute_result", data={"text/plain": "3"})])
    whole = nbformat.v4.new_code_cell("x", outputs=[out("stream", name="stdout", text="1\n2\n"), out("execute_result", data={"text/plain": "3"})])
    assert _checked_outputs(cell) == _checked_outputs(whole)
    whole.outputs[0]["text"] = "1\n2.0\n"
    assert _checked_outputs(cell) != _checked_outputs(whole)


@pytest.mark.slow
def test_checked_cells_print_what_the_chapters_store(html, foreign_cpu):
    # The build executed every chapter already (errors fail it); reading its notebooks compares the cells tagged
    # nbval-check-output with their stored outputs, as `pytest --nbval-lax` would, without running every chapter twice.
    # A cell also tagged cpu-dependent prints numbers of the dataset this machine rebuilt, whose rewards carry its
    # CPU's rounding: it is compared only where the kernels are the recording machine's (conftest.foreign_cpu).
    import nbformat

    executed = html.parent / "jupyter_execute"
    checked = 0
    for chapter in CHAPTERS:
        stored = nbformat.read(ROOT / f"{chapter}.ipynb", as_version=4)
        found = list(executed.rglob(f"{Path(chapter).name}.ipynb"))
        assert len(found) == 1, f"{chapter}: the build's executed notebook is missing ({found})"
        ran = nbformat.read(found[0], as_version=4)
        assert len(ran.cells) == len(stored.cells), f"{chapter}: the build ran another notebook"
        for i, (want, got) in enumerate(zip(stored.cells, ran.cells)):
            tags = want.metadata.get("tags", [])
            if want.cell_type == "code" and "nbval-check-output" in tags and not ("cpu-dependent" in tags and foreign_cpu):
                assert _checked_outputs(got) == _checked_outputs(want), f"{chapter}, cell {i}: output differs from the stored one"
                checked += 1
    assert checked >= 10, f"only {checked} checked cells: did the tags go missing?"


def _browser() -> tuple[str | None, str | None]:
    """(chromedriver, browser binary): Debian's chromium pair, or Google Chrome with its driver (GitHub's runners)."""
    drivers = [shutil.which("chromedriver"), os.path.join(os.environ.get("CHROMEWEBDRIVER", ""), "chromedriver"),
               "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
    driver = next((d for d in drivers if d and os.path.isfile(d) and os.access(d, os.X_OK)), None)
    # A driver runs only its own browser version: Debian's driver goes with Debian's chromium, any other
    # (the runners' Chrome for Testing driver) with Google Chrome first. $CHROME_BIN (set on the runners) wins.
    debian = driver is not None and "chromium" in os.path.realpath(driver) or Path("/usr/lib/chromium/chromium").exists()
    names = ["chromium", "google-chrome", "google-chrome-stable"] if debian else ["google-chrome", "google-chrome-stable", "chromium"]
    found = [os.environ.get("CHROME_BIN")] + [shutil.which(n) for n in names + ["chromium-browser"]]
    return driver, next((b for b in found if b and os.path.isfile(b)), None)


def _chrome():
    """Headless Chromium or Chrome, or a failure that says how to install it (`make test` does)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (in requirements.txt)")
    driver_path, binary = _browser()
    if driver_path is None:
        pytest.fail("chromedriver not found: sudo apt-get install chromium chromium-driver (make test does this)")
    opts = webdriver.ChromeOptions()
    if binary:
        opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=opts)


def _wait(driver, script: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; return its value (falsy on timeout)."""
    end = time.time() + timeout
    value = driver.execute_script(f"return {script}")
    while not value and time.time() < end:
        time.sleep(0.25)
        value = driver.execute_script(f"return {script}")
    return value


@pytest.mark.slow
def test_every_page_works_in_a_browser(html):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = _chrome()
    moved = 0
    try:
        for chapter in CHAPTERS:
            page = html / f"{chapter}.html"
            source = page.read_text()
            driver.get(page.as_uri())
            assert _wait(driver, "document.readyState === 'complete'"), chapter
            # Saved widget state alone is not a slider: where the build made the dataset, chapter 2 keeps tqdm's progress bar.
            if WIDGET_STATE in source:
                widget = ".widget-slider" if "SelectionSliderModel" in source else ".jupyter-widgets"
                assert _wait(driver, f"document.querySelectorAll('{widget}').length > 0"), f"{chapter}: widgets did not render"
            n_videos = len(re.findall(VIDEO, source))
            if n_videos:
                ready = _wait(driver, f"Array.from(document.querySelectorAll('video')).filter(v => v.readyState >= 1).length >= {n_videos}")
                assert ready, f"{chapter}: a video does not load"
            broken = driver.execute_script(
                "return Array.from(document.querySelectorAll('img')).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src.slice(0, 80))")
            assert not broken, f"{chapter}: images that do not load: {broken}"
            # Figures, slider views and tables fit the text column (code cells may scroll sideways).
            wide = driver.execute_script(
                "return Array.from(document.querySelectorAll('.cell_output img, .cell_output .widget-image, .cell_output table'))"
                ".filter(e => e.getBoundingClientRect().right > e.closest('.cell_output').getBoundingClientRect().right + 1)"
                ".map(e => e.tagName + '.' + e.className.slice(0, 40))")
            assert not wide, f"{chapter}: wider than the page's text column: {wide}"
            # Code and text outputs fit the column too: no <pre> sticks out of the article or scrolls sideways.
            wide_pre = driver.execute_script(
                "const col = document.querySelector('article.bd-article').getBoundingClientRect();"
                "return Array.from(document.querySelectorAll('article.bd-article pre'))"
                ".filter(p => p.getBoundingClientRect().right > col.right + 1 || p.scrollWidth > p.clientWidth + 1)"
                ".map(p => p.textContent.slice(0, 60))")
            assert not wide_pre, f"{chapter}: code wider than the column at 1280 px: {wide_pre}"
            # Display equations and output areas fit the column too, also those inside hint, solution and
            # hidden-code dropdowns (opened here so that they are laid out); MathJax typesets asynchronously.
            driver.execute_script("document.querySelectorAll('details').forEach(d => { d.open = true; })")
            assert _wait(driver, "Array.from(document.querySelectorAll('div.math')).every(m => m.querySelector('mjx-container'))"), \
                f"{chapter}: MathJax did not typeset every display equation"
            wide_math = driver.execute_script(
                "const col = document.querySelector('article.bd-article').getBoundingClientRect();"
                "return Array.from(document.querySelectorAll('div.math mjx-container, div.cell_output'))"
                ".filter(e => { const r = (e.querySelector(':scope > svg') || e).getBoundingClientRect();"
                "  return r.width > 0 && (r.right > col.right + 1 || e.scrollWidth > e.clientWidth + 1); })"
                ".map(e => e.tagName + ': ' + (e.closest('div.math') || e).textContent.slice(0, 60))")
            assert not wide_math, f"{chapter}: display equations or outputs wider than the column at 1280 px: {wide_math}"
            # A video is never shown wider than it was rendered: scaling up blurs the walker.
            blown_up = driver.execute_script(
                "return Array.from(document.querySelectorAll('video')).filter(v => v.videoWidth > 0 && "
                "v.getBoundingClientRect().width > v.videoWidth + 1).map(v => [v.videoWidth, v.getBoundingClientRect().width])")
            assert not blown_up, f"{chapter}: videos shown wider than rendered (native, shown): {blown_up}"
            # The 88-column code cells fit without even the CSS fallback's wrapping (book/_static/book.css).
            wrapped = driver.execute_script(
                "return Array.from(document.querySelectorAll('div.cell_input pre')).filter(p => {"
                "p.style.whiteSpace = 'pre'; const over = p.scrollWidth > p.clientWidth + 1; p.style.whiteSpace = ''; return over; })"
                ".map(p => p.textContent.slice(0, 60))")
            assert not wrapped, f"{chapter}: code cells that only fit by wrapping: {wrapped}"
            assert "NBVAL" not in driver.execute_script("return document.body.innerText"), f"{chapter} shows NBVAL"
            if chapter != "book/bibliography":  # the first screen (1280 x 720): what the chapter teaches, and Colab
                learn = driver.execute_script(
                    "const e = Array.from(document.querySelectorAll('article strong'))"
                    ".find(s => s.textContent.startsWith('What you will learn'));"
                    "return e ? e.getBoundingClientRect().top + window.scrollY : null")
                assert learn is not None and learn < 720, f"{chapter}: 'What you will learn' is not on the first screen ({learn})"
                colab = driver.execute_script(
                    "const a = document.querySelector('a[href*=\"colab.research.google.com\"]');"
                    "const b = a && a.closest('.dropdown').querySelector('button');"
                    "return b ? b.getBoundingClientRect().top + window.scrollY : null")
                assert colab is not None and colab < 720, f"{chapter}: no launch-in-Colab button on the first screen"

            for slider in driver.find_elements(By.CSS_SELECTOR, ".widget-slider"):
                view = slider.find_element(By.XPATH, "following-sibling::*[1]")
                before = hashlib.sha1(view.get_attribute("innerHTML").encode()).hexdigest()
                slider.find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(Keys.ARROW_RIGHT)
                time.sleep(0.5)
                after = hashlib.sha1(view.get_attribute("innerHTML").encode()).hexdigest()
                assert after != before, f"{chapter}: moving a slider did not change its view"
                moved += 1

            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, f"{chapter}: browser errors: {errors}"
    finally:
        driver.quit()
    assert moved >= 2, "expected the guidance-scale and window-size sliders"
