"""Which OpenGL backend MuJoCo renders with: check it, probe it safely, pick one that works.

MuJoCo reads ``MUJOCO_GL`` once, when it is imported, so a backend is chosen before that and
probed in a child process: a broken driver can crash or hang the process that loads it. On a
Colab runtime :func:`select_gl` with ``install=True`` also does the two things that make
offscreen rendering work there: it registers NVIDIA's EGL library with libglvnd on a GPU runtime,
and installs Mesa's EGL and OSMesa with apt where no backend works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["GL_TIMEOUT_S", "INSTALL_HINT", "RenderError", "check_gl", "probe_gl", "select_gl"]

GL_TIMEOUT_S = 60
"""A GL driver that hangs is reported after this many seconds rather than waited on."""

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
"""Present where an NVIDIA kernel driver is loaded."""

NVIDIA_EGL_VENDOR = Path("/usr/share/glvnd/egl_vendor.d/10_nvidia.json")
"""libglvnd finds NVIDIA's EGL through this file; Colab's GPU runtimes lack it."""

_TRIVIAL_MODEL = "<mujoco><worldbody><geom size='0.1'/></worldbody></mujoco>"

_gl_backend: str | None = None


EGL_PACKAGES, OSMESA_PACKAGES = "libegl1 libgl1 libgles2 libegl-mesa0", "libosmesa6"
"""Debian/Ubuntu packages for each backend."""

APT_INSTALL = ["apt-get", "install", "-y", "-qq", *EGL_PACKAGES.split(), *OSMESA_PACKAGES.split()]
"""What :func:`select_gl` installs, as root, when no backend works and ``install=True``."""
APT_UPDATE = ["apt-get", "update", "-qq"]

INSTALL_HINT = (f"install EGL with `sudo apt-get install {EGL_PACKAGES}`, or OSMesa with `sudo apt-get install "
                f"{OSMESA_PACKAGES}` and MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa")
"""What to install, in one line (the doctor's advice)."""

_HOW_TO_RENDER = (
    "To render:\n"
    "  * EGL (headless; GPU drivers or Mesa software rendering), on Debian/Ubuntu:\n"
    f"      sudo apt-get install {EGL_PACKAGES}\n"
    "    and use MUJOCO_GL=egl (diffusion_rl's default when MUJOCO_GL is unset).\n"
    "  * or OSMesa (pure software, slower):\n"
    f"      sudo apt-get install {OSMESA_PACKAGES}\n"
    "    and set MUJOCO_GL=osmesa and PYOPENGL_PLATFORM=osmesa.\n"
    "Set MUJOCO_GL before Python imports mujoco, e.g. `MUJOCO_GL=osmesa jupyter-book build .`,\n"
    "or `os.environ['MUJOCO_GL'] = 'osmesa'` in a notebook's first cell after restarting the kernel."
)


class RenderError(RuntimeError):
    """MuJoCo cannot render offscreen on this machine; the message says how to fix it."""


def _gl_help(backend: str, err: BaseException, mujoco_imported: bool) -> str:
    """Explain a failed offscreen render and what to install or set."""
    scope = (
        "Only rendering needs OpenGL; simulation, training and evaluation do not."
        if mujoco_imported
        # An invalid MUJOCO_GL, or a missing OSMesa, makes `import mujoco` itself fail.
        else "mujoco itself fails to import, so simulation is broken too until this is fixed."
    )
    return f"MuJoCo cannot render offscreen with MUJOCO_GL={backend!r}: {type(err).__name__}: {err}\n{scope} {_HOW_TO_RENDER}"


def check_gl() -> str:
    """Render one tiny offscreen frame and return the MUJOCO_GL backend, or raise RenderError."""
    global _gl_backend
    if _gl_backend is not None:
        return _gl_backend
    backend = os.environ.get("MUJOCO_GL", "")
    # Broken GL surfaces as many exception types (ImportError, AttributeError, RuntimeError,
    # PyOpenGL's FatalError), some of them while mujoco itself is imported.
    try:
        import mujoco
    except Exception as err:
        raise RenderError(_gl_help(backend, err, mujoco_imported=False)) from err
    try:
        model = mujoco.MjModel.from_xml_string(_TRIVIAL_MODEL)
        with mujoco.Renderer(model, height=8, width=8) as renderer:
            renderer.update_scene(mujoco.MjData(model))
            renderer.render()
    except Exception as err:
        raise RenderError(_gl_help(backend, err, mujoco_imported=True)) from err
    _gl_backend = backend
    return backend


# Runs in a child process with the backend to try in its environment.
_PROBE = """
import sys
try:
    from diffusion_rl import gl
    print(gl.check_gl())
except Exception as err:
    print(err if type(err).__name__ == "RenderError" else f"{type(err).__name__}: {err}")
    sys.exit(3)
"""


def _backend_env(backend: str) -> dict[str, str]:
    # PyOpenGL reads PYOPENGL_PLATFORM, MuJoCo reads MUJOCO_GL: they must agree ("glfw" needs neither set).
    return {"MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend} if backend in ("egl", "osmesa") else {"MUJOCO_GL": backend}


def probe_gl(backend: str | None = None, timeout: float = GL_TIMEOUT_S) -> tuple[bool, str]:
    """Render one frame in a child process with ``backend`` (default: the current MUJOCO_GL); returns (works, backend or error)."""
    env = dict(os.environ)
    if backend is not None:
        env.pop("PYOPENGL_PLATFORM", None)
        env.update(_backend_env(backend))
    # The child must import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent.parent), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], check=False, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"rendering one frame hung for {timeout:g} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        return True, lines[-1]
    if proc.returncode < 0:
        return False, f"rendering one frame crashed the process (signal {-proc.returncode})"
    return False, lines[0] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]


def _register_nvidia_egl() -> bool:
    """Point libglvnd at NVIDIA's EGL where the driver is loaded but the vendor file is missing (Colab GPU)."""
    if not NVIDIA_DRIVER.exists() or NVIDIA_EGL_VENDOR.exists():
        return False
    NVIDIA_EGL_VENDOR.parent.mkdir(parents=True, exist_ok=True)
    NVIDIA_EGL_VENDOR.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}\n')
    return True


def _apt_install() -> None:
    """Install Mesa's EGL and OSMesa; refresh the package lists once if the first try fails."""
    for command in (APT_INSTALL, APT_UPDATE, APT_INSTALL):
        try:
            done = subprocess.run(command, check=False, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):  # no apt-get here, or it hangs: the probes will say so
            return
        if done.returncode == 0 and command is APT_INSTALL:
            return


def select_gl(candidates: Sequence[str] = ("egl", "osmesa"), install: bool = False) -> str:
    """Set MUJOCO_GL to the first of ``candidates`` that renders here and return it; raise RenderError if none does.

    Call it before anything imports mujoco. ``install=True`` (for Colab) may write NVIDIA's EGL
    vendor file and run apt-get; leave it off elsewhere.
    """
    if "mujoco" in sys.modules:
        # Too late to switch: MuJoCo has read MUJOCO_GL already. Keep the one in force if it works.
        return check_gl()
    if install:
        try:
            _register_nvidia_egl()
        except OSError:  # not root: leave the system alone and probe what is there
            pass
    errors = {}
    for attempt in range(2 if install else 1):
        for backend in candidates:
            works, detail = probe_gl(backend)
            if works:
                os.environ.pop("PYOPENGL_PLATFORM", None)
                os.environ.update(_backend_env(backend))
                return backend
            errors[backend] = detail
        if install and attempt == 0:
            _apt_install()
    tried = "; ".join(f"{b}: {e}" for b, e in errors.items())
    raise RenderError(f"No OpenGL backend renders here ({tried}).\n{_HOW_TO_RENDER}")
