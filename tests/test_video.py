"""Tests for diffusion_rl.video: observation <-> pose mapping, rendering, mp4 files, GL errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from diffusion_rl import video
from diffusion_rl.envs import make_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gl() -> str:
    """The working MUJOCO_GL backend; rendering tests are skipped, with the reason, without one."""
    try:
        return video.check_gl()
    except video.RenderError as err:
        pytest.skip(f"no offscreen OpenGL here, rendering tests skipped:\n{err}")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter, so MUJOCO_GL is read before mujoco is imported."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _rollout(steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations, true qpos and true qvel along a random-action episode (no early stop)."""
    env = make_env(terminate_when_unhealthy=False)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    data = env.unwrapped.data
    observations, qpos, qvel = [obs], [data.qpos.copy()], [data.qvel.copy()]
    for _ in range(steps):
        obs, *_ = env.step(rng.uniform(-1.0, 1.0, size=env.action_space.shape))
        observations.append(obs)
        qpos.append(data.qpos.copy())
        qvel.append(data.qvel.copy())
    env.close()
    return np.array(observations), np.array(qpos), np.array(qvel)


def test_qpos_from_observation_round_trip() -> None:
    obs, qpos, qvel = _rollout(30)
    np.testing.assert_allclose(video.qpos_from_observation(obs, x=qpos[:, 0]), qpos)
    np.testing.assert_allclose(obs[:, 8:], np.clip(qvel, -10.0, 10.0))  # v5 clips velocities
    # A scalar x broadcasts, and a single observation maps to a single pose.
    single = video.qpos_from_observation(obs[5], x=1.5)
    assert single.shape == (9,) and single[0] == 1.5
    np.testing.assert_allclose(single[1:], qpos[5, 1:])
    with pytest.raises(ValueError, match="17"):
        video.qpos_from_observation(np.zeros(11))


def test_integrate_x_follows_simulator() -> None:
    obs, qpos, _ = _rollout(200, seed=1)
    x = video.integrate_x(obs, x0=qpos[0, 0])
    assert x.shape == (len(obs),) and x[0] == qpos[0, 0]
    # Velocity integration drifts a little; within a few cm over 200 steps (1.6 s) is plenty
    # for drawing a plan.
    assert np.max(np.abs(x - qpos[:, 0])) < 0.05


def test_render_states_shape_and_content(gl: str) -> None:
    _, qpos, _ = _rollout(10)
    frames = video.render_states(qpos[::5], width=64, height=48)
    assert frames.shape == (len(qpos[::5]), 48, 64, 3)
    assert frames.dtype == np.uint8
    assert frames.std() > 10  # a real picture, not a blank buffer
    # The camera follows the torso: moved 3 m, the walker is drawn at the same place.
    moved = qpos[:1].copy()
    moved[0, 0] += 3.0
    still, shifted = video.render_states(np.concatenate([qpos[:1], moved]), width=64, height=48)
    assert abs(_walker_column(still) - _walker_column(shifted)) < 1.0
    assert abs(_walker_column(still) - 32) < 4  # and near the middle


def _walker_column(frame: np.ndarray) -> float:
    """Mean column of the walker's pixels: it is the only coloured thing (the floor is grey)."""
    rgb = frame.astype(int)
    coloured = rgb.max(axis=-1) - rgb.min(axis=-1) > 40
    assert coloured.sum() > 10, "walker not visible"
    return float(np.nonzero(coloured)[1].mean())


def test_rollout_frames_returns_frames_and_return(gl: str) -> None:
    rng = np.random.default_rng(0)
    frames, ret = video.rollout_frames(
        lambda obs: rng.uniform(-1.0, 1.0, size=6), seed=0, max_steps=10, width=32, height=32, every=3
    )
    # Frames at reset, after steps 3, 6, 9, and the last step (10).
    assert frames.shape == (5, 32, 32, 3)
    assert isinstance(ret, float) and np.isfinite(ret)


def test_save_mp4_round_trip(tmp_path: Path) -> None:
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(7, 33, 40, 3), dtype=np.uint8)  # odd height gets padded
    path = video.save_mp4(frames, tmp_path / "sub" / "clip.mp4", fps=10)
    assert path == tmp_path / "sub" / "clip.mp4"
    assert 0 < path.stat().st_size < 200_000
    read = iio.imread(path, plugin="pyav") if _has_pyav() else _read_ffmpeg(path)
    assert read.shape[0] == 7 and read.shape[1:3] == (34, 40)
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"]  # no temp file left


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _read_ffmpeg(path: Path) -> np.ndarray:
    """Decode an mp4 with imageio-ffmpeg (the same ffmpeg that wrote it)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def test_save_mp4_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        video.save_mp4(np.zeros((3, 8, 8, 3), dtype=np.float32), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


def test_video_html_embeds_base64_mp4(tmp_path: Path) -> None:
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    html = video.video_html(frames, width=200)
    assert html.startswith("<video controls loop autoplay muted playsinline")
    assert 'width="200"' in html and "data:video/mp4;base64," in html
    path = video.save_mp4(frames, tmp_path / "a.mp4")
    assert video.video_html(path) == video.video_html(str(path))
    assert video.show_video(path).data == video.video_html(path)


def test_check_gl_explains_invalid_backend() -> None:
    result = _run_python(
        """
        from diffusion_rl import video
        try:
            video.check_gl()
        except video.RenderError as err:
            print(err)
        else:
            raise SystemExit("check_gl did not raise")
        """,
        MUJOCO_GL="nonsense",
    )
    assert result.returncode == 0, result.stderr
    assert "MUJOCO_GL='nonsense'" in result.stdout
    assert "apt-get install libegl1" in result.stdout and "libosmesa6" in result.stdout


def test_broken_egl_fails_rendering_only() -> None:
    # Pointing libglvnd at no EGL vendor is what a machine without libegl-mesa0 (or a GPU
    # driver's EGL) looks like; mujoco still imports, so simulation must keep working.
    result = _run_python(
        """
        import numpy as np
        from diffusion_rl import video
        from diffusion_rl.envs import make_env
        try:
            video.check_gl()
        except video.RenderError as err:
            print(err)
        else:
            raise SystemExit("check_gl did not raise")
        env = make_env()
        env.reset(seed=0)
        obs, reward, *_ = env.step(np.zeros(env.action_space.shape))
        print("STEP OK", obs.shape)
        """,
        MUJOCO_GL="egl",
        __EGL_VENDOR_LIBRARY_FILENAMES="/nonexistent/egl_vendor.json",
    )
    assert result.returncode == 0, result.stderr
    assert "apt-get install libegl1 libgl1 libgles2 libegl-mesa0" in result.stdout
    assert "MUJOCO_GL=osmesa" in result.stdout
    assert "STEP OK (17,)" in result.stdout
