"""Pictures of the walker are big enough to judge a pose: at least 150 px tall as rendered."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_rl import video
from diffusion_rl.envs import make_env

MIN_PX = 150


@pytest.fixture(scope="module")
def standing() -> np.ndarray:
    try:
        video.check_gl()
    except video.RenderError as err:
        pytest.skip(f"no offscreen OpenGL here:\n{err}")
    obs, _ = make_env().reset(seed=0)
    return obs


def _walker_rows(plain: np.ndarray, marked: np.ndarray) -> int:
    """Rows where a bright ghost drawn over the walker changed the picture: the walker's height in px."""
    rows = np.flatnonzero((np.abs(plain.astype(int) - marked.astype(int)).sum(-1) > 30).any(1))
    return int(rows.max() - rows.min() + 1) if len(rows) else 0


def test_video_frames_show_a_tall_walker(standing):
    q = video.qpos_from_observation(standing[None], 0.0)
    plain = video.render_states(q)[0]
    marked = video.render_states(q, ghosts=q[:, None], ghost_rgba=(1.0, 1.0, 0.0, 1.0))[0]
    assert plain.shape[:2] == (video.DEFAULT_HEIGHT, video.DEFAULT_WIDTH)
    height = _walker_rows(plain, marked)
    assert MIN_PX <= height < video.DEFAULT_HEIGHT - 4, f"walker {height} px tall in a {video.DEFAULT_HEIGHT}-px frame"


def test_plan_strip_shows_tall_walkers(standing):
    obs = np.repeat(standing[None], 8, 0)
    plain = video.plan_strip(obs, ghost_rgba=(0.3, 0.6, 1.0, 0.0))  # ghosts invisible: the real walker only
    marked = video.plan_strip(obs, ghost_rgba=(1.0, 1.0, 0.0, 1.0))
    assert plain.shape == (280, 640, 3)
    assert _walker_rows(plain, marked) >= MIN_PX
