"""Choosing MuJoCo's OpenGL backend: probes in child processes, the Colab fixes, the errors."""

from __future__ import annotations

import json
import os
import sys

import pytest

from diffusion_rl import gl

_real_run = gl.subprocess.run


@pytest.fixture
def before_mujoco(monkeypatch):
    """As in a fresh kernel: mujoco not imported yet, and MUJOCO_GL restored after the test."""
    monkeypatch.delitem(sys.modules, "mujoco", raising=False)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setenv("PYOPENGL_PLATFORM", "egl")


def test_probe_reports_a_working_and_a_broken_backend():
    assert gl.probe_gl("egl") == (True, "egl")
    works, error = gl.probe_gl("nonsense")
    assert not works and "nonsense" in error


def test_select_gl_takes_the_first_backend_that_renders(before_mujoco):
    os.environ["MUJOCO_GL"] = "nonsense"
    assert gl.select_gl(("nonsense", "egl")) == "egl"
    assert os.environ["MUJOCO_GL"] == "egl" and os.environ["PYOPENGL_PLATFORM"] == "egl"


def test_select_gl_says_what_to_install_when_nothing_renders(before_mujoco, monkeypatch):
    calls = []
    monkeypatch.setattr(gl, "APT_INSTALL", [sys.executable, "-c", "import sys; sys.exit(0)"])
    monkeypatch.setattr(gl.subprocess, "run", lambda *a, **k: calls.append(a[0]) or _real_run(*a, **k))
    with pytest.raises(gl.RenderError, match=r"No OpenGL backend renders here \(nonsense: .*\)[\s\S]*apt-get install libosmesa6"):
        gl.select_gl(("nonsense",))
    assert gl.APT_INSTALL not in calls  # nothing installed unless asked
    with pytest.raises(gl.RenderError):
        gl.select_gl(("nonsense",), install=True)
    assert calls.count(gl.APT_INSTALL) == 1  # asked: installed once, then probed again
    assert os.environ["MUJOCO_GL"] == "egl"  # a failed choice changes nothing

    # An install that fails refreshes the package lists and tries once more; no apt-get at all is no crash.
    calls.clear()
    monkeypatch.setattr(gl, "APT_INSTALL", [sys.executable, "-c", "import sys; sys.exit(100)"])
    monkeypatch.setattr(gl, "APT_UPDATE", [sys.executable, "-c", "pass"])
    with pytest.raises(gl.RenderError):
        gl.select_gl(("nonsense",), install=True)
    assert calls.count(gl.APT_INSTALL) == 2 and calls.count(gl.APT_UPDATE) == 1
    monkeypatch.setattr(gl, "APT_INSTALL", ["/nonexistent/apt-get"])
    with pytest.raises(gl.RenderError):
        gl.select_gl(("nonsense",), install=True)



def test_after_mujoco_is_imported_the_backend_in_force_is_kept():
    import mujoco  # noqa: F401

    assert gl.select_gl(("osmesa",)) == os.environ["MUJOCO_GL"]


def test_nvidia_egl_is_registered_only_where_the_driver_is_loaded(tmp_path, monkeypatch):
    driver, vendor = tmp_path / "nvidia-version", tmp_path / "egl_vendor.d" / "10_nvidia.json"
    monkeypatch.setattr(gl, "NVIDIA_DRIVER", driver)
    monkeypatch.setattr(gl, "NVIDIA_EGL_VENDOR", vendor)
    assert not gl._register_nvidia_egl() and not vendor.exists()  # no driver: nothing written
    driver.write_text("NVRM version: 580")
    assert gl._register_nvidia_egl()
    assert json.loads(vendor.read_text())["ICD"]["library_path"] == "libEGL_nvidia.so.0"
    vendor.write_text("{}")
    assert not gl._register_nvidia_egl() and vendor.read_text() == "{}"  # an existing file is left alone
