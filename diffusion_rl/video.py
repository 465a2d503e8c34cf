"""Render Walker2d poses offscreen and turn them into mp4 videos that embed in the book.

MuJoCo is imported inside the functions, never at module import: a machine without a working
OpenGL backend can still train and evaluate, and only the call that draws pictures fails, with
a :class:`RenderError` that says what to install.
"""

from __future__ import annotations

import base64
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffusion_rl.envs import ENV_ID, make_env  # also sets MUJOCO_GL before mujoco loads
from diffusion_rl.gl import RenderError, check_gl

if TYPE_CHECKING:
    from IPython.display import HTML

__all__ = [
    "DEFAULT_EVERY",
    "DEFAULT_FPS",
    "DEFAULT_HEIGHT",
    "DEFAULT_WIDTH",
    "ENV_DT",
    "GHOST_RGBA",
    "PLAN_END_RGBA",
    "RenderError",
    "check_gl",
    "caption_frames",
    "side_by_side",
    "episode_frames",
    "integrate_x",
    "plan_ghost_qpos",
    "plan_strip",
    "pose_strip",
    "qpos_from_observation",
    "render_states",
    "rollout_frames",
    "save_mp4",
    "show_video",
    "video_html",
]

ENV_DT = 0.008
"""Seconds per Walker2d-v5 step: 4 MuJoCo substeps of 0.002 s, i.e. 125 steps per second."""

DEFAULT_WIDTH = 320
DEFAULT_HEIGHT = 240
DEFAULT_EVERY = 2
"""Render every 2nd step: 500 frames for a full 1000-step episode."""
DEFAULT_FPS = 30
"""With ``DEFAULT_EVERY`` this plays at 0.48x real time, slow enough to follow the gait."""

GHOST_RGBA = (0.3, 0.6, 1.0, 0.35)
"""Colour of a planned pose drawn over the real walker: light blue, translucent."""
PLAN_END_RGBA = (0.3, 0.6, 1.0, 0.15)
"""Fainter colour for the last pose of a plan, where the planner means to be at its horizon."""

# Side view like the gymnasium Walker2d default camera (distance 4, elevation -20, look at
# z = 1.15), but closer, so that a standing walker is over 150 px tall in a 240-px frame shown
# at its native size, and re-centred on the torso each frame: a planned trajectory can jump, and
# a smoothed MuJoCo tracking camera would lag behind it.
_CAM_DISTANCE = 2.4
_CAM_ELEVATION = -12.0
_CAM_AZIMUTH = 90.0
_CAM_LOOKAT_Z = 0.7

def qpos_from_observation(obs: np.ndarray, x: np.ndarray | float = 0.0) -> np.ndarray:
    """Rebuild Walker2d qpos (..., 9) from observations (..., 17) and the root x they omit."""
    # Walker2d-v5 drops rootx so the policy cannot depend on where it is; obs[..., :8] is
    # qpos[1:] (rootz, rooty, 6 joint angles) and obs[..., 8:] is qvel clipped to [-10, 10].
    obs = np.asarray(obs, dtype=np.float64)
    if obs.shape[-1] != 17:
        raise ValueError(f"expected Walker2d observations with 17 dims, got shape {obs.shape}")
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), obs.shape[:-1])
    return np.concatenate([x[..., None], obs[..., :8]], axis=-1)


def integrate_x(obs_seq: np.ndarray, dt: float = ENV_DT, x0: float = 0.0) -> np.ndarray:
    """Root x positions (T,) for observations (T, 17) by integrating the x velocity obs[:, 8]."""
    # obs velocities are clipped at 10 m/s, far above a walker's speed, so x is unaffected.
    vx = np.asarray(obs_seq, dtype=np.float64)[:, 8]
    # Trapezoid rule: each step moves by the mean of the velocities at its two ends, which
    # tracks the simulator's x much closer than using either end alone.
    steps = 0.5 * (vx[1:] + vx[:-1]) * dt
    return x0 + np.concatenate([[0.0], np.cumsum(steps)])


@functools.lru_cache(maxsize=2)
def _walker_renderer(width: int, height: int):
    """A Renderer plus its own MjData for the Walker2d model, shared by calls of one size."""
    import mujoco

    env = make_env(ENV_ID)
    model = env.unwrapped.model
    env.close()
    # Shadows and reflections cost several times the rest of the frame on software GL.
    model.vis.quality.shadowsize = 0
    model.mat_reflectance[:] = 0.0
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, height)
    renderer = mujoco.Renderer(model, height=height, width=width)
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    return renderer, mujoco.MjData(model)


def _tracking_camera(torso_x: float):
    """A free camera looking at the torso from the side, as gymnasium's default does."""
    import mujoco

    cam = mujoco.MjvCamera()
    cam.type = mujoco.mjtCamera.mjCAMERA_FREE
    cam.distance = _CAM_DISTANCE
    cam.elevation = _CAM_ELEVATION
    cam.azimuth = _CAM_AZIMUTH
    cam.lookat[:] = (torso_x, 0.0, _CAM_LOOKAT_Z)
    return cam


def render_states(
    qpos: np.ndarray,
    qvel: np.ndarray | None = None,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    camera: str | int | None = None,
    ghosts: np.ndarray | None = None,
    ghost_rgba: tuple[float, ...] | np.ndarray = GHOST_RGBA,
) -> np.ndarray:
    """Render Walker2d poses qpos (T, 9) as uint8 frames (T, H, W, 3); camera None tracks the torso."""
    import mujoco

    check_gl()
    qpos = np.atleast_2d(np.asarray(qpos, dtype=np.float64))
    renderer, data = _walker_renderer(int(width), int(height))
    model = renderer.model
    if qpos.shape[1] != model.nq:
        raise ValueError(f"expected qpos with {model.nq} dims, got shape {qpos.shape}")
    # Velocities do not change the picture; they are accepted so a full state can be passed.
    qvel = np.zeros((len(qpos), model.nv)) if qvel is None else np.atleast_2d(qvel)
    if ghosts is not None:
        ghosts, ghost_rgba = _check_ghosts(ghosts, ghost_rgba, len(qpos), model.nq)
        ghost_data = mujoco.MjData(model)
        # Renderer.update_scene draws with a default MjvOption; the ghosts use the same one.
        option, perturb = mujoco.MjvOption(), mujoco.MjvPerturb()
    torso = model.body("torso").id
    frames = np.empty((len(qpos), height, width, 3), dtype=np.uint8)
    for i, (q, v) in enumerate(zip(qpos, qvel, strict=True)):
        data.qpos[:] = q
        data.qvel[:] = v
        mujoco.mj_forward(model, data)
        cam = _tracking_camera(data.xpos[torso, 0]) if camera is None else camera
        renderer.update_scene(data, camera=cam)
        if ghosts is not None:
            _add_ghosts(renderer.scene, model, ghost_data, option, perturb, ghosts[i], ghost_rgba)
        renderer.render(out=frames[i])
    return frames


def _check_ghosts(
    ghosts: np.ndarray, ghost_rgba: tuple[float, ...] | np.ndarray, n_frames: int, nq: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ghost poses (T, G, nq) and colours (4,) or (G, 4); return both as arrays."""
    ghosts = np.asarray(ghosts, dtype=np.float64)
    if ghosts.ndim != 3 or ghosts.shape[0] != n_frames or ghosts.shape[2] != nq:
        raise ValueError(f"expected ghosts of shape ({n_frames}, G, {nq}) for {n_frames} frames, got {ghosts.shape}")
    rgba = np.asarray(ghost_rgba, dtype=np.float32)
    if rgba.shape not in ((4,), (ghosts.shape[1], 4)):
        raise ValueError(f"expected ghost_rgba of shape (4,) or ({ghosts.shape[1]}, 4), got {rgba.shape}")
    return ghosts, np.broadcast_to(rgba, (ghosts.shape[1], 4))


def _add_ghosts(scene, model, ghost_data, option, perturb, poses: np.ndarray, rgba: np.ndarray) -> None:
    """Append one recoloured copy of the walker's bodies to scene per pose without NaNs."""
    import mujoco

    for pose, colour in zip(poses, rgba, strict=True):
        if np.isnan(pose).any():
            continue
        ghost_data.qpos[:] = pose
        mujoco.mj_forward(model, ghost_data)
        start = scene.ngeom
        # Only dynamic geoms: the floor belongs to the static world and is drawn once already.
        mujoco.mjv_addGeoms(model, ghost_data, option, perturb, mujoco.mjtCatBit.mjCAT_DYNAMIC, scene)
        if scene.ngeom >= scene.maxgeom:
            # mjv_addGeoms silently stops at maxgeom; a half-drawn ghost would mislead.
            raise ValueError(f"too many ghosts: the scene holds at most {scene.maxgeom} geoms")
        for geom in scene.geoms[start : scene.ngeom]:
            geom.rgba[:] = colour
            # mjv_addGeoms decides transparency from the model's colour, before we recolour.
            geom.transparent = colour[3] < 1.0


def plan_ghost_qpos(plan_observations: np.ndarray, x0: float) -> np.ndarray:
    """Poses qpos (H, 9) of one plan's observations (H, 17), x integrated from x0 at row 0."""
    plan = np.asarray(plan_observations, dtype=np.float64)
    if plan.ndim != 2 or plan.shape[1] != 17 or not len(plan):
        raise ValueError(f"expected one plan of observations (H, 17), got shape {plan.shape}")
    return qpos_from_observation(plan, integrate_x(plan, x0=float(x0)))


def plan_strip(
    observations: np.ndarray,
    spacing: float = 0.45,
    width: int = 640,
    height: int = 280,
    ghost_rgba: tuple[float, ...] = (0.3, 0.6, 1.0, 0.6),
) -> np.ndarray:
    """Plans' poses side by side, ``spacing`` metres apart: observations (..., H, 17) -> frames (..., height, width, 3).

    The first pose (the real, conditioning state) is drawn solid and the planned ones as ghosts,
    from a fixed side camera that frames the whole row, so strips of different plans compare.
    Neighbouring poses overlap a little: that keeps each walker over 150 px tall at 640 px wide,
    a width that fits the book's text column.
    """
    import mujoco

    obs = np.asarray(observations, dtype=np.float64)
    if obs.ndim < 2 or obs.shape[-1] != 17:
        raise ValueError(f"expected plan observations of shape (..., H, 17), got {obs.shape}")
    lead, horizon = obs.shape[:-2], obs.shape[-2]
    poses = qpos_from_observation(obs, spacing * np.arange(horizon)).reshape(-1, horizon, 9)
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_FREE
    # Frame the row: 1.8 m of height (a standing walker is 1.45 m) or the row's length, whichever
    # needs the camera further back; MuJoCo's vertical field of view is 45 degrees.
    row = spacing * (horizon - 1) + 1.0
    camera.distance = max(row * height / width, 1.8) / (2 * np.tan(np.radians(22.5)))
    camera.azimuth, camera.elevation = 90.0, -5.0
    camera.lookat[:] = (spacing * (horizon - 1) / 2, 0.0, 0.75)
    frames = render_states(poses[:, 0], ghosts=poses[:, 1:], ghost_rgba=ghost_rgba, camera=camera, width=width, height=height)
    return frames.reshape(*lead, height, width, 3)


def pose_strip(
    observations: np.ndarray,
    ghost_observations: np.ndarray | None = None,
    every: int = 1,
    width: int = 180,
    height: int = 240,
    rows: tuple[int, int] = (6, 234),
) -> np.ndarray:
    """Every ``every``-th pose of a window (H, 17) side by side in one image, optionally with a second window as ghosts.

    Each pose keeps its own tracking camera, so the strip compares shapes, not positions;
    ``rows`` crops each frame to the band that holds the walker.
    """
    qpos = plan_ghost_qpos(observations, 0.0)[::every]
    ghosts = None if ghost_observations is None else plan_ghost_qpos(ghost_observations, 0.0)[::every, None]
    frames = render_states(qpos, width=width, height=height, ghosts=ghosts)
    return np.concatenate(list(frames[:, rows[0] : rows[1]]), axis=1)


def episode_frames(
    states: np.ndarray,
    x: np.ndarray,
    plans: np.ndarray | None = None,
    plan_steps: np.ndarray | None = None,
    every: int = DEFAULT_EVERY,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    show_plan_end: bool = True,
) -> np.ndarray:
    """Frames of a recorded episode (states (T+1, 17), root x (T+1,)) with its plans as ghosts."""
    states = np.asarray(states, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if states.ndim != 2 or states.shape[1] != 17 or not len(states):
        raise ValueError(f"expected states of shape (T+1, 17), got {states.shape}")
    if x.shape != states.shape[:1]:
        raise ValueError(f"expected x of shape ({len(states)},) to match states, got {x.shape}")
    if int(every) != every or every < 1:
        raise ValueError(f"every must be a positive integer, got {every}")
    last = len(states) - 1
    # Always keep the last step so the end of the episode (a fall, say) is on screen.
    steps = np.unique(np.append(np.arange(0, last + 1, int(every)), last))
    qpos = qpos_from_observation(states[steps], x[steps])
    if plans is None and plan_steps is None:
        return render_states(qpos, width=width, height=height)
    if plans is None or plan_steps is None:
        raise ValueError("plans and plan_steps must be given together")
    plans = np.asarray(plans, dtype=np.float64)
    plan_steps = np.asarray(plan_steps)
    if plans.ndim != 3 or plans.shape[2] != 17 or not plans.shape[0] or not plans.shape[1]:
        raise ValueError(f"expected plans of shape (P, H, 17), got {plans.shape}")
    if plan_steps.shape != plans.shape[:1] or not np.issubdtype(plan_steps.dtype, np.integer):
        raise ValueError(
            f"expected integer plan_steps of shape ({len(plans)},), got {plan_steps.dtype} {plan_steps.shape}"
        )
    if plan_steps[0] < 0 or plan_steps[-1] > last or np.any(np.diff(plan_steps) <= 0):
        raise ValueError(f"plan_steps must increase strictly within [0, {last}], got {plan_steps}")
    horizon = plans.shape[1]
    ghosts = np.full((len(steps), 2 if show_plan_end else 1, qpos.shape[1]), np.nan)
    # The plan in force at step t is the last one begun at or before t.
    in_force = np.searchsorted(plan_steps, steps, side="right") - 1
    planned_by_plan: dict[int, np.ndarray] = {}
    for i, (t, j) in enumerate(zip(steps, in_force, strict=True)):
        if j < 0:
            continue  # no plan made yet
        start = plan_steps[j]
        if j not in planned_by_plan:
            # Anchored at the real x where the plan began, so the ghost drifts from the walker
            # exactly as far as the plan's velocities disagree with what really happened.
            planned_by_plan[j] = plan_ghost_qpos(plans[j], x[start])
        planned = planned_by_plan[j]
        if t - start < horizon:
            ghosts[i, 0] = planned[t - start]
        if show_plan_end:
            ghosts[i, 1] = planned[-1]
    rgba = np.array([GHOST_RGBA, PLAN_END_RGBA])[: ghosts.shape[1]]
    return render_states(qpos, width=width, height=height, ghosts=ghosts, ghost_rgba=rgba)


def side_by_side(*videos: np.ndarray, gap: int = 4) -> np.ndarray:
    """Frames of several videos (T_i, H, W, 3) next to each other; a shorter one holds its last frame."""
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    if len({v.shape[1] for v in videos}) != 1:
        raise ValueError(f"videos must share their height, got {[v.shape[1] for v in videos]}")
    T = max(len(v) for v in videos)
    padded = [np.concatenate([v, np.repeat(v[-1:], T - len(v), 0)]) for v in videos]
    spacer = np.full((T, videos[0].shape[1], gap, 3), 255, np.uint8)
    parts = [x for v in padded for x in (v, spacer)][:-1]
    return np.concatenate(parts, axis=2)


def caption_frames(frames: np.ndarray, text: str | Sequence[str], xy: tuple[int, int] = (8, 6), size: int = 16) -> np.ndarray:
    """Write ``text`` (one for all frames, or one per frame) in white onto frames (T, H, W, 3), in place; returns them."""
    from PIL import Image, ImageDraw, ImageFont

    texts = [text] * len(frames) if isinstance(text, str) else list(text)
    if len(texts) != len(frames):
        raise ValueError(f"got {len(texts)} captions for {len(frames)} frames")
    font = ImageFont.load_default(size=size)
    for frame, caption in zip(frames, texts):
        image = Image.fromarray(frame)
        ImageDraw.Draw(image).text(xy, caption, fill="white", font=font)
        frame[:] = np.asarray(image)
    return frames


def rollout_frames(
    policy: Callable[[np.ndarray], np.ndarray],
    seed: int,
    max_steps: int = 1000,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    every: int = DEFAULT_EVERY,
) -> tuple[np.ndarray, float]:
    """Run one seeded Walker2d-v5 episode with policy(obs) -> action; return (frames, return)."""
    env = make_env(ENV_ID)
    try:
        obs, _ = env.reset(seed=seed)
        qposes = [env.unwrapped.data.qpos.copy()]
        total = 0.0
        for step in range(1, max_steps + 1):
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += float(reward)
            # Always keep the last pose so a fall is visible even between sampled frames.
            done = terminated or truncated or step == max_steps
            if step % every == 0 or done:
                qposes.append(env.unwrapped.data.qpos.copy())
            if done:
                break
    finally:
        env.close()
    return render_states(np.stack(qposes), width=width, height=height), total


def save_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = DEFAULT_FPS) -> Path:
    """Write uint8 frames (T, H, W, 3) as an h264/yuv420p mp4, atomically; return the path."""
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    # yuv420p stores colour at half resolution, so odd sizes are padded by one edge pixel.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so os.replace is an atomic rename; the .mp4 suffix tells ffmpeg the container.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            size=(frames.shape[2], frames.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            # faststart puts the index first, so browsers can play before the end arrives.
            output_params=["-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def video_html(
    frames_or_path: np.ndarray | str | os.PathLike,
    width: int | None = None,
    fps: int = DEFAULT_FPS,
) -> str:
    """An HTML <video> tag with the mp4 inlined as base64, so a built page needs no extra file."""
    if isinstance(frames_or_path, np.ndarray):
        with tempfile.TemporaryDirectory() as tmp:
            data = save_mp4(frames_or_path, Path(tmp) / "video.mp4", fps=fps).read_bytes()
    else:
        data = Path(frames_or_path).read_bytes()
    size = f' width="{int(width)}"' if width is not None else ""
    # Never wider than the text column (a narrow page shrinks it); without `width`, never scaled up.
    style = ' style="max-width: 100%; height: auto"'
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f"<video controls loop autoplay muted playsinline{size}{style}>"
        f'<source src="data:video/mp4;base64,{b64}" type="video/mp4"></video>'
    )


def show_video(
    frames_or_path: np.ndarray | str | os.PathLike,
    width: int | None = None,
    fps: int = DEFAULT_FPS,
) -> HTML:
    """Display frames or an mp4 file inline in a notebook, embedded in the saved output."""
    from IPython.display import HTML

    return HTML(video_html(frames_or_path, width=width, fps=fps))
