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


def _standing(x: float = 0.0) -> np.ndarray:
    """Walker2d's upright reset pose (1, 9) at root x."""
    qpos = np.zeros((1, 9))
    qpos[0, :2] = (x, 1.25)  # rootz has ref 1.25: qpos 1.25 is the torso at its reset height
    return qpos


def test_ghosts_draw_translucent_walkers_only(gl: str) -> None:
    real = _standing()
    plain = video.render_states(real, width=64, height=48)
    ahead = _standing(0.6)[:, None]  # (T=1, G=1, 9)
    ahead[0, 0, 3] = -0.8  # bend a knee so the ghost is not a copy of the walker
    ghosted = video.render_states(real, width=64, height=48, ghosts=ahead)
    changed = np.abs(ghosted.astype(int) - plain.astype(int)).max(axis=-1) > 0
    assert changed.sum() > 10
    # Only the ghost walker is added: a second floor would repaint most of the frame.
    assert changed.mean() < 0.1
    # +x is to the right in the side view, and the ghost is blue: blue rises where it is drawn.
    assert np.nonzero(changed[0])[1].mean() > _walker_column(plain[0]) + 3
    diff = ghosted[changed].astype(int) - plain[changed].astype(int)
    assert diff[:, 2].mean() > diff[:, 0].mean()
    # Translucent: an opaque ghost of the same colour covers the floor behind it more.
    opaque = video.render_states(real, width=64, height=48, ghosts=ahead, ghost_rgba=(*video.GHOST_RGBA[:3], 1.0))
    assert not np.array_equal(opaque, ghosted)
    # The cached renderer keeps no ghost geoms for the next call.
    np.testing.assert_array_equal(video.render_states(real, width=64, height=48), plain)


def test_nan_ghost_rows_draw_nothing(gl: str) -> None:
    _, qpos, _ = _rollout(6)
    plain = video.render_states(qpos, width=64, height=48)
    ghosts = np.full((len(qpos), 2, 9), np.nan)
    np.testing.assert_array_equal(video.render_states(qpos, width=64, height=48, ghosts=ghosts), plain)
    # One real ghost among NaN rows draws exactly what that ghost alone draws.
    ghosts[3, 1] = qpos[3]
    ghosts[3, 1, 0] += 0.5  # half a metre ahead of the walker
    both = video.render_states(qpos, width=64, height=48, ghosts=ghosts)
    alone = video.render_states(qpos, width=64, height=48, ghosts=ghosts[:, 1:])
    np.testing.assert_array_equal(both, alone)
    assert not np.array_equal(both[3], plain[3])
    np.testing.assert_array_equal(np.delete(both, 3, axis=0), np.delete(plain, 3, axis=0))


def test_render_states_rejects_bad_ghosts(gl: str) -> None:
    qpos = np.repeat(_standing(), 3, axis=0)
    with pytest.raises(ValueError, match="ghosts"):
        video.render_states(qpos, width=32, height=32, ghosts=np.zeros((2, 1, 9)))  # 2 frames, not 3
    with pytest.raises(ValueError, match="ghosts"):
        video.render_states(qpos, width=32, height=32, ghosts=np.zeros((3, 9)))  # no ghost axis
    with pytest.raises(ValueError, match="ghost_rgba"):
        video.render_states(qpos, width=32, height=32, ghosts=np.zeros((3, 2, 9)), ghost_rgba=np.ones((3, 4)))


def test_plan_ghost_qpos_integrates_planned_velocity() -> None:
    rng = np.random.default_rng(0)
    plan = rng.normal(size=(6, 17))
    plan[:, 8] = 1.5  # constant planned forward velocity
    qpos = video.plan_ghost_qpos(plan, x0=2.0)
    assert qpos.shape == (6, 9)
    np.testing.assert_allclose(qpos[:, 0], 2.0 + 1.5 * video.ENV_DT * np.arange(6))
    np.testing.assert_array_equal(qpos[:, 1:], plan[:, :8])
    with pytest.raises(ValueError, match="17"):
        video.plan_ghost_qpos(plan[None], x0=0.0)
    with pytest.raises(ValueError, match="17"):
        video.plan_ghost_qpos(plan[:, :11], x0=0.0)


def test_episode_frames_samples_steps_and_last(gl: str) -> None:
    obs, qpos, _ = _rollout(10)
    x = qpos[:, 0]
    frames = video.episode_frames(obs, x, every=2, width=64, height=48)
    assert frames.shape == (6, 48, 64, 3)  # steps 0, 2, 4, 6, 8, 10
    np.testing.assert_array_equal(frames, video.render_states(qpos[::2], width=64, height=48))
    # T = 9: the last step is not a multiple of `every` but is still shown.
    frames = video.episode_frames(obs[:10], x[:10], every=2, width=64, height=48)
    expected = video.render_states(qpos[[0, 2, 4, 6, 8, 9]], width=64, height=48)
    np.testing.assert_array_equal(frames, expected)


def test_episode_frames_draws_plan_in_force(gl: str) -> None:
    obs, qpos, _ = _rollout(10)
    x = qpos[:, 0]
    plain = video.episode_frames(obs, x, every=2, width=64, height=48)
    # Two plans that predict reality exactly, begun at steps 0 and 6, each 3 rows long: rows
    # cover steps 0-2 and 6-8, so frames at steps 4 and 10 have no current-step ghost.
    plans = np.stack([obs[0:3], obs[6:9]])
    frames = video.episode_frames(obs, x, plans, np.array([0, 6]), every=2, width=64, height=48, show_plan_end=False)
    differs = [not np.array_equal(f, p) for f, p in zip(frames, plain, strict=True)]
    assert differs == [True, True, False, True, True, False]
    # Exactly: frame k shows plan j's row (step - start), x integrated from the real x at start.
    first, second = video.plan_ghost_qpos(plans[0], x[0]), video.plan_ghost_qpos(plans[1], x[6])
    ghosts = np.full((6, 2, 9), np.nan)
    ghosts[[0, 1, 3, 4], 0] = first[0], first[2], second[0], second[2]
    ghosts[:3, 1], ghosts[3:, 1] = first[-1], second[-1]
    expected = video.render_states(qpos[::2], width=64, height=48, ghosts=ghosts[:, :1])
    np.testing.assert_array_equal(frames, expected)
    # A perfect plan's ghost lies on the walker: it only tints the walker's own pixels.
    near = _near_walker(qpos[::2], width=64, height=48)
    for k in (0, 1, 3, 4):
        changed = np.abs(frames[k].astype(int) - plain[k].astype(int)).max(axis=-1) > 0
        assert changed.any() and not (changed & ~near[k]).any()
    # The plan's last row is drawn too when asked, also after its horizon has passed.
    with_end = video.episode_frames(obs, x, plans, np.array([0, 6]), every=2, width=64, height=48)
    expected = video.render_states(
        qpos[::2], width=64, height=48, ghosts=ghosts, ghost_rgba=np.array([video.GHOST_RGBA, video.PLAN_END_RGBA])
    )
    np.testing.assert_array_equal(with_end, expected)
    assert not np.array_equal(with_end[2], plain[2]) and not np.array_equal(with_end[5], plain[5])


def _near_walker(qpos: np.ndarray, width: int, height: int, margin: int = 1) -> np.ndarray:
    """Masks (T, height, width) of the pixels the walker covers in each pose, grown by margin."""
    # The same view with the walker sunk under the floor differs exactly where it is drawn.
    hidden = qpos.copy()
    hidden[:, 1] -= 10.0
    drawn = video.render_states(qpos, width=width, height=height)
    empty = video.render_states(hidden, width=width, height=height)
    mask = (drawn != empty).any(axis=-1)
    grown = mask.copy()
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            grown |= np.roll(mask, (dy, dx), axis=(1, 2))
    return grown


def test_episode_frames_rejects_bad_shapes() -> None:
    states, x = np.zeros((11, 17)), np.zeros(11)
    plans, steps = np.zeros((2, 4, 17)), np.array([0, 5])
    with pytest.raises(ValueError, match="states"):
        video.episode_frames(states[:, :9], x)
    with pytest.raises(ValueError, match="x of shape"):
        video.episode_frames(states, x[:10])
    with pytest.raises(ValueError, match="together"):
        video.episode_frames(states, x, plans)
    with pytest.raises(ValueError, match="plans of shape"):
        video.episode_frames(states, x, plans[..., :9], steps)
    with pytest.raises(ValueError, match="plan_steps"):
        video.episode_frames(states, x, plans, steps[:1])
    with pytest.raises(ValueError, match="plan_steps"):
        video.episode_frames(states, x, plans, np.array([5, 0]))  # not increasing
    with pytest.raises(ValueError, match="plan_steps"):
        video.episode_frames(states, x, plans, np.array([0, 11]))  # past the last step
    with pytest.raises(ValueError, match="every"):
        video.episode_frames(states, x, every=0)


def test_plan_strip_draws_each_plan_from_one_camera(gl: str) -> None:
    """Strips keep the leading shape, and a different plan gives a different picture from the same camera."""
    rng = np.random.default_rng(0)
    obs = np.zeros((2, 4, 17))
    obs[..., 0] = 1.25  # standing torso height
    obs[1, 1:, 2:8] = rng.uniform(-0.5, 0.5, (3, 6))  # bend the planned joints of the second plan only
    frames = video.plan_strip(obs, width=64, height=48)
    assert frames.shape == (2, 48, 64, 3)
    assert (frames[0] != frames[1]).any()
    with pytest.raises(ValueError, match="H, 17"):
        video.plan_strip(np.zeros((4, 16)))


def test_pose_strip_joins_cropped_poses_and_draws_ghosts(gl: str) -> None:
    """Every k-th pose side by side, each cropped to the walker's band; a second window adds its ghosts."""
    obs = np.zeros((8, 17))
    obs[:, 0] = 1.25
    plain = video.pose_strip(obs, every=2, width=64, height=48, rows=(4, 44))
    assert plain.shape == (40, 4 * 64, 3)
    bent = obs.copy()
    bent[:, 2:8] = 0.5
    assert (video.pose_strip(obs, bent, every=2, width=64, height=48, rows=(4, 44)) != plain).any()


def test_caption_frames_writes_one_or_per_frame_text_in_place() -> None:
    frames = np.zeros((3, 40, 120, 3), np.uint8)
    out = video.caption_frames(frames, "k = 8")
    assert out is frames and all(f.max() == 255 for f in frames) and np.array_equal(frames[0], frames[2])
    each = video.caption_frames(np.zeros((2, 40, 120, 3), np.uint8), ["a", "bbbbbb"])
    assert not np.array_equal(each[0], each[1])
    with pytest.raises(ValueError, match="2 captions for 3 frames"):
        video.caption_frames(frames, ["a", "b"])


def test_side_by_side_holds_the_shorter_video_on_its_last_frame():
    from diffusion_rl.video import side_by_side

    a = np.zeros((5, 4, 3, 3), np.uint8)
    b = np.full((3, 4, 2, 3), 7, np.uint8)
    b[-1] = 9
    out = side_by_side(a, b, gap=1)
    assert out.shape == (5, 4, 3 + 1 + 2, 3)
    assert (out[:, :, 4:] [3:] == 9).all() and (out[:, :, 3] == 255).all()
    with pytest.raises(ValueError, match="height"):
        side_by_side(a, np.zeros((2, 5, 2, 3), np.uint8))
