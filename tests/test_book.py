"""The README's book command works: the whole book builds with warnings as errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_book_builds_without_warnings(tmp_path):
    jb = shutil.which("jupyter-book") or str(Path(sys.executable).with_name("jupyter-book"))
    out = subprocess.run([jb, "build", str(ROOT), "--path-output", str(tmp_path), "-W", "--keep-going"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    chapters = [line.split("file:")[1].strip() for line in (ROOT / "_toc.yml").read_text().splitlines() if "file:" in line]
    for chapter in ["book/intro", *chapters]:
        page = html / f"{chapter}.html"
        assert page.is_file(), f"{page} missing"
    data_page = (html / "book" / "01_data.html").read_text()
    assert re.search(r"<video[^>]*>\s*<source src=\"data:video/mp4;base64,", data_page), "the episode video is not embedded"
    assert "colab.research.google.com" in data_page, "no Colab launch button"
    figures = re.findall(r'<img[^>]+src="\.\./_images/([^"]+\.png)"', data_page)
    assert len(figures) >= 2, "the chapter's figures are missing (a non-inline matplotlib backend?)"
    assert all((html / "_images" / name).is_file() for name in figures)

    sweep_page = (html / "book" / "08_distribution_shift.html").read_text()
    assert len(re.findall(r"<video[^>]*>\s*<source src=\"data:video/mp4;base64,", sweep_page)) == 2, "the best-setting and fall videos"
    assert len(re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', sweep_page)) >= 4, "the sweep's figures are missing"
    assert "window-table" in sweep_page, "the window table is missing"
