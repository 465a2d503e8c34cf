"""diffusion_rl: diffusion-model planning for reinforcement learning on MuJoCo Walker2d.

Importing the package sets ``MUJOCO_GL=egl`` as a default (an existing value wins) so that
MuJoCo renders offscreen on machines without a display. This must happen before ``mujoco`` is
imported anywhere, which is why it lives at the very top of the package.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    # PyOpenGL reads this one; MuJoCo reads MUJOCO_GL. Keep them in agreement.
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

__version__ = "0.1.0"

__all__ = ["__version__"]
