"""The wheel that `pip install git+<repo>` builds (what a Colab chapter installs) carries every shipped file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_the_code_and_every_shipped_asset(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "Warning" not in build.stderr, build.stderr[-3000:]  # setuptools warns before it drops data folders
    (wheel,) = tmp_path.glob("diffusion_rl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "diffusion_rl"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in tracked if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if "/episodes/" in n], "the recorded sweep episodes (156 MB) must not ship"
