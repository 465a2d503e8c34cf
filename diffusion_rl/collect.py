"""Build a real Minari dataset by rolling out the expert policy (``make-dataset``).

Minari built its own Walker2d sets with an SB3 SAC expert, stochastic actions and reset seeds
counting up from 123; we do the same with our expert. Each episode's action noise comes from a
generator seeded by that episode's reset seed, so an episode is fully determined by its seed,
whatever order the parallel environments finish in. Other recipes (:mod:`diffusion_rl.recipes`, such
as DART's noisy executed actions with clean recorded labels under random pushes) go through the same
machinery: ``make-dataset --recipe NAME``.

The dataset is written into a staging folder and moved into place only when Minari has finished,
so a killed or failed build never leaves a folder that looks like a dataset. Each finished episode is
also kept (one atomic ``.npz`` per reset seed) until the dataset is in place, so a build killed during
collection resumes with the episodes it had: rerun the same command.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from diffusion_rl.checkpoint import atomic_write_bytes, atomic_write_json
from diffusion_rl.data import (
    DatasetError,
    datasets_root,
    is_complete_dataset,
    local_dataset_path,
    validate_dataset_id,
)
from diffusion_rl.disturbances import Disturbance, DisturbanceWrapper
from diffusion_rl.envs import ENV_ID, make_env
from diffusion_rl.runtime import display_path, torch_threads

__all__ = ["collect_episodes", "dataset_summary", "make_dataset", "random_policy_return"]

FIRST_SEED = 123
"""Reset seed of the first episode, as in Minari's MuJoCo datasets."""

NoisyPolicy = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(observations (B, obs_dim), standard-normal noise (B, act_dim)) -> actions (B, act_dim).

It may instead return a pair (executed, recorded) of such arrays: the environment steps with the first,
the data set records the second (DART's clean labels for noisy actions)."""


_EPISODE_FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")


class EpisodeCache:
    """Finished episodes of a build not yet written, one atomic ``episode-<seed>.npz`` each.

    ``key`` names what determines an episode besides its seed (the policy's SHA-256, the environment);
    a folder made under another key is emptied, so a changed policy never mixes into a build.
    """

    def __init__(self, folder: Path, key: dict) -> None:
        self.folder = Path(folder)
        record = self.folder / "cache.json"
        try:
            same = json.loads(record.read_text()) == key
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(self.folder, ignore_errors=True)
            atomic_write_json(record, key)

    def load(self, seed: int) -> dict | None:
        """The cached episode of ``seed``, or None if absent or unreadable (it is then collected again)."""
        path = self.folder / f"episode-{seed}.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                ep = {k: f[k] for k in _EPISODE_FIELDS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        n = len(ep["actions"])
        if n == 0 or len(ep["observations"]) != n + 1 or any(len(ep[k]) != n for k in _EPISODE_FIELDS[2:]):
            return None
        return ep

    def save(self, seed: int, ep: dict) -> None:
        """Keep one finished episode."""
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(ep[k]) for k in _EPISODE_FIELDS})
        atomic_write_bytes(self.folder / f"episode-{seed}.npz", buf.getvalue())

    def ids(self, first_seed: int, n_episodes: int | None = None) -> list[int]:
        """Episode indices (seed - first_seed) present in the cache, within the build's range."""
        seeds = (p.stem.removeprefix("episode-") for p in self.folder.glob("episode-*.npz"))
        ks = sorted(int(x) - first_seed for x in seeds if x.lstrip("-").isdigit())
        return [k for k in ks if k >= 0 and (n_episodes is None or k < n_episodes)]


def collect_episodes(
    policy: NoisyPolicy,
    n_episodes: int | None = None,
    min_steps: int = 100_000,
    first_seed: int = FIRST_SEED,
    n_envs: int = 16,
    env_id: str = ENV_ID,
    progress: bool = True,
    cache: EpisodeCache | None = None,
    disturb: Callable[[int], Disturbance] | None = None,
    goal: Callable[[int], np.ndarray] | None = None,
) -> list:
    """Roll out ``policy`` and return Minari ``EpisodeBuffer`` objects, one per episode, in seed order.

    With ``n_episodes`` set, exactly that many episodes; otherwise the fewest episodes (in seed
    order) whose steps add up to at least ``min_steps``. Episodes found in ``cache`` are reused, and
    each newly finished one is saved there. ``disturb(seed)``: the disturbance each episode meets.
    ``goal(seed)``: entries appended to the policy's observation in that episode (not recorded).
    """
    from minari.data_collector import EpisodeBuffer
    from tqdm.auto import tqdm

    # With ``disturb``, every environment is wrapped (with nothing to do until an episode sets its disturbance).
    envs = [DisturbanceWrapper(make_env(env_id), Disturbance()) if disturb else make_env(env_id) for _ in range(n_envs)]
    act_dim = envs[0].action_space.shape[0]
    finished: dict[int, dict] = {}
    slots: list[dict | None] = [None] * n_envs
    next_episode = 0
    prefix, prefix_steps = 0, 0  # episodes 0 .. prefix-1 are finished and hold prefix_steps steps

    def reached(k: int, steps: int) -> bool:
        return k >= n_episodes if n_episodes is not None else steps >= min_steps

    def extend_prefix() -> None:
        # Extend the finished prefix in seed order, stopping where the target is met.
        nonlocal prefix, prefix_steps
        while prefix in finished and not reached(prefix, prefix_steps):
            prefix_steps += len(finished[prefix]["actions"])
            prefix += 1

    def more() -> bool:
        return n_episodes is None or next_episode < n_episodes

    def start(slot: int) -> None:
        nonlocal next_episode
        while more() and next_episode in finished:  # reused from the cache
            next_episode += 1
        if not more() or reached(prefix, prefix_steps):
            return
        seed = first_seed + next_episode
        if disturb is not None:
            envs[slot].disturbance = disturb(seed)  # read by the wrapper's reset and steps
        obs, _ = envs[slot].reset(seed=seed)
        slots[slot] = {"id": next_episode, "seed": seed, "rng": np.random.default_rng(seed),
                       "goal": None if goal is None else np.asarray(goal(seed), np.float64),
                       "observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        next_episode += 1

    bar = tqdm(total=n_episodes or min_steps, unit="episode" if n_episodes else "step", desc="collect", disable=not progress)
    if cache is not None:
        for k in cache.ids(first_seed, n_episodes):
            if (ep := cache.load(first_seed + k)) is not None:
                finished[k] = {"id": k, "seed": first_seed + k, **ep}
        extend_prefix()
        bar.update(len(finished) if n_episodes else prefix_steps)
        if finished:
            bar.write(f"collect: reusing {len(finished)} finished episodes of an interrupted build")
    for s in range(n_envs):
        start(s)
    while not reached(prefix, prefix_steps):
        active = [s for s in range(n_envs) if slots[s] is not None]
        obs = np.stack([slots[s]["observations"][-1] for s in active])
        noise = np.stack([slots[s]["rng"].standard_normal(act_dim) for s in active])
        if goal is not None:
            obs = np.concatenate([obs, np.stack([slots[s]["goal"] for s in active])], axis=1)
        actions = policy(obs, noise)
        executed, recorded = actions if isinstance(actions, tuple) else (actions, actions)
        for s, action, label in zip(active, executed, recorded, strict=True):
            ep = slots[s]
            o, r, term, trunc, _ = envs[s].step(action)
            ep["observations"].append(o)
            ep["actions"].append(np.asarray(label, np.float32))
            ep["rewards"].append(float(r))
            ep["terminations"].append(bool(term))
            ep["truncations"].append(bool(trunc))
            if not n_episodes:
                bar.update(1)
            if term or trunc:
                finished[ep["id"]] = ep
                if cache is not None:
                    cache.save(ep["seed"], ep)
                slots[s] = None
                extend_prefix()
                if n_episodes:
                    bar.update(1)
                start(s)
    bar.close()
    for env in envs:
        env.close()

    return [
        EpisodeBuffer(
            id=ep["id"],
            seed=ep["seed"],
            observations=np.asarray(ep["observations"], np.float64),
            actions=np.asarray(ep["actions"], np.float32),
            rewards=np.asarray(ep["rewards"], np.float64),
            terminations=np.asarray(ep["terminations"]),
            truncations=np.asarray(ep["truncations"]),
        )
        for ep in (finished[k] for k in range(prefix))
    ]


def random_policy_return(seeds=range(20), env_id: str = ENV_ID) -> float:
    """Mean return of uniformly random actions over fixed seeds: the 'random' reference score."""
    env = make_env(env_id)
    returns = []
    for seed in seeds:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        ret, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            ret, done = ret + r, term or trunc
        returns.append(ret)
    env.close()
    return float(np.mean(returns))


@contextmanager
def _minari_root(path: Path):
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cache_folder(root: Path, dataset_id: str) -> Path:
    return root / f".episodes-{dataset_id.replace('/', '--')}"


def _clean_stale(root: Path, dataset_id: str) -> None:
    for stale in root.glob(".staging-*"):
        pid = stale.name.split("-")[1]
        # Left by a build that was killed; a build still running elsewhere keeps its folder.
        if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    final = local_dataset_path(dataset_id)
    if final.exists() and not is_complete_dataset(final):
        # A half-written folder (from an interrupted minari call, say) would shadow a rebuild.
        shutil.rmtree(final)
    elif final.exists():
        # Killed between moving the dataset into place and dropping its kept episodes.
        shutil.rmtree(_cache_folder(root, dataset_id), ignore_errors=True)


@contextmanager
def _build_lock(root: Path, dataset_id: str):
    """An exclusive lock on building ``dataset_id`` under ``root`` (released when the process dies)."""
    import fcntl

    path = root / f".lock-{dataset_id.replace('/', '--')}"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_dataset(
    dataset_id: str | None = None,
    n_episodes: int | None = None,
    min_steps: int = 100_000,
    policy_path: str | os.PathLike | None = None,
    first_seed: int = FIRST_SEED,
    force: bool = False,
    progress: bool = True,
    policy: NoisyPolicy | None = None,
    policy_meta: dict | None = None,
    recipe: str = "expert",
    options: dict | None = None,
):
    """Build (or reuse) the Minari dataset ``dataset_id`` from the expert policy by ``recipe``; returns the MinariDataset.

    An existing complete dataset is reused unless ``force``. ``policy``/``policy_meta`` override the
    shipped expert (tests use a small untrained actor) for the ``expert`` recipe. ``recipe``: a name in
    :data:`diffusion_rl.recipes.RECIPES`, with its ``options``; ``dataset_id`` None is the recipe's own id.
    """
    import minari

    from diffusion_rl.data import load_dataset
    from diffusion_rl.recipes import get_recipe

    # Everything the user gave is checked before anything is written.
    rec = get_recipe(recipe)
    recipe_options = rec.make_options(options)
    if policy is not None and recipe != "expert":
        raise ValueError(f"The {recipe} recipe needs the expert's actor: give policy_path, not a policy function.")
    if rec.assemble is not None and (policy_path is not None or n_episodes is not None or min_steps != 100_000):
        raise ValueError(f"The {recipe} recipe assembles its episodes from existing data: it takes no policy, episode count or step count.")
    if rec.check is not None:
        rec.check(recipe_options)  # its sources, before anything is written
    dataset_id = rec.dataset_id if dataset_id is None else dataset_id
    validate_dataset_id(dataset_id)
    root = datasets_root()
    root.mkdir(parents=True, exist_ok=True)
    # One build at a time per dataset (two notebooks, or a test and a book build, may ask at once):
    # whoever waits finds the finished dataset and reuses it.
    with _build_lock(root, dataset_id):
        _clean_stale(root, dataset_id)
        final = local_dataset_path(dataset_id)
        if final.exists():
            if not force:
                ds = load_dataset(dataset_id, download=False)
                made_by = ds.storage.metadata.get("algorithm_name")
                if made_by != (wanted := rec.algorithm_name(recipe_options)):
                    raise DatasetError(
                        f"{dataset_id} already exists, made as {made_by!r}, not by the {recipe} recipe ({wanted!r}). "
                        "Rebuild it with --force (force=True) or choose another dataset id."
                    )
                too_small = ds.total_episodes != n_episodes if n_episodes is not None else ds.total_steps < min_steps
                if too_small and rec.assemble is None:
                    raise DatasetError(
                        f"{dataset_id} already exists with {ds.total_episodes} episodes and {ds.total_steps} steps, not the "
                        f"{f'{n_episodes} episodes' if n_episodes is not None else f'{min_steps}+ steps'} asked for. "
                        "Rebuild it with --force (force=True) or choose another dataset id."
                    )
                return ds
            shutil.rmtree(final)

        from diffusion_rl.expert import load_policy, shipped_policy_path

        if rec.assemble is not None:
            def load_data(name: str) -> list[dict]:
                # A finished data set is taken whatever its size; a missing one is built as its recipe builds it.
                built = is_complete_dataset(local_dataset_path(get_recipe(name).dataset_id))
                return _episode_dicts(make_dataset(recipe=name, progress=progress, min_steps=0 if built else 100_000))

            assembly = rec.assemble(recipe_options, load_data)
            episodes = [_episode_buffer(k, ep) for k, ep in enumerate(assembly.episodes)]
            algorithm, actions_text, policy_meta = rec.algorithm, assembly.actions, assembly.policy_meta
        else:
            if policy is None:
                actor, policy_meta = load_policy(policy_path or shipped_policy_path(rec.policy))
                behaviour = rec.behaviour(actor, recipe_options)
            else:
                behaviour = replace(rec.behaviour(None, recipe_options), policy=policy)  # the expert recipe, another policy

            cache = None
            if (policy_sha := (policy_meta or {}).get("sha256")) is not None:
                # An episode is fixed by its seed, the policy, the environment and the recipe: key the kept episodes on those.
                key = {"policy_sha256": policy_sha, "env_id": ENV_ID, "format": 1, **behaviour.key}
                cache = EpisodeCache(_cache_folder(root, dataset_id), key)
            with torch_threads(1):
                episodes = collect_episodes(behaviour.policy, n_episodes, min_steps, first_seed, progress=progress, cache=cache,
                                            disturb=behaviour.disturb, goal=behaviour.goal)
            algorithm, actions_text = behaviour.algorithm, behaviour.actions
        returns = np.array([ep.rewards.sum() for ep in episodes])
        meta = policy_meta or {}
        reference = meta
        if policy is None and policy_path is None and rec.policy != "expert":
            reference = load_policy(shipped_policy_path("expert"))[1]  # every data set is scored against the expert
        ref_max = reference.get("eval_stochastic", {}).get("mean")
        command = "python -m diffusion_rl make-dataset" + ("" if recipe == "expert" else f" --recipe {recipe}")
        who = "SAC expert" if rec.policy == "expert" else f"SAC {rec.policy} policy"
        seeds = "" if rec.assemble is not None else f", reset seeds {first_seed}..{first_seed + len(episodes) - 1}"
        description = (
            f"Walker2d-v5 episodes from the diffusion_rl {who}, {actions_text}{seeds}. "
            f"Policy sha256 {meta.get('sha256', 'n/a')}, deterministic eval return "
            f"{meta.get('eval_deterministic', {}).get('mean', float('nan')):.1f}, stochastic "
            f"{meta.get('eval_stochastic', {}).get('mean', float('nan')):.1f}"
            f"{'' if reference is meta else f'; scores are referenced to the expert, stochastic {ref_max:.1f}'}. "
            f"Built by `{command}`. Not the official Minari mujoco/walker2d/expert-v0."
        )

        staging = root / f".staging-{os.getpid()}-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with _minari_root(staging), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                minari.create_dataset_from_buffers(
                    dataset_id=dataset_id,
                    buffer=episodes,
                    env=make_env().spec,
                    algorithm_name=algorithm,
                    author="diffusion-rl contributors",
                    author_email="see the repository",
                    code_permalink="diffusion_rl/collect.py",
                    ref_min_score=random_policy_return() if ref_max is not None else None,
                    ref_max_score=ref_max,
                    description=description,
                    requirements=["mujoco>=3.0", "gymnasium>=1.0"],
                )
            staged = staging.joinpath(*dataset_id.split("/"))
            final.parent.mkdir(parents=True, exist_ok=True)
            if not (final.parent / "namespace_metadata.json").exists() and (staged.parent / "namespace_metadata.json").exists():
                # Atomically: a kill mid-copy must not leave a truncated file that later builds keep.
                atomic_write_bytes(final.parent / "namespace_metadata.json", (staged.parent / "namespace_metadata.json").read_bytes())
            os.replace(staged, final)  # the one step that makes the dataset visible
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(_cache_folder(root, dataset_id), ignore_errors=True)
        ds = load_dataset(dataset_id, download=False)
        if len(returns) != ds.total_episodes:
            raise DatasetError(f"Wrote {len(returns)} episodes but read back {ds.total_episodes}.")
        return ds


def _episode_dicts(ds) -> list[dict]:
    """A Minari dataset's episodes as plain dicts, with their reset seeds."""
    seeds = [m.get("seed") for m in ds.storage.get_episode_metadata(range(ds.total_episodes))]
    return [{"seed": None if seed is None else int(seed), **{k: np.asarray(getattr(ep, k)) for k in _EPISODE_FIELDS}}
            for seed, ep in zip(seeds, ds.iterate_episodes(), strict=True)]


def _episode_buffer(k: int, ep: dict):
    """Minari's ``EpisodeBuffer`` for episode ``k`` of an assembled recipe."""
    from minari.data_collector import EpisodeBuffer

    return EpisodeBuffer(id=k, seed=ep["seed"], observations=np.asarray(ep["observations"], np.float64),
                         actions=np.asarray(ep["actions"], np.float32), rewards=np.asarray(ep["rewards"], np.float64),
                         terminations=np.asarray(ep["terminations"], bool), truncations=np.asarray(ep["truncations"], bool))


def dataset_summary(ds) -> dict:
    """Episodes, steps, mean/std return, falls and the reference scores of a Minari dataset."""
    returns = np.array([float(np.sum(ep.rewards)) for ep in ds.iterate_episodes()])
    falls = sum(bool(ep.terminations[-1]) for ep in ds.iterate_episodes())
    md = ds.storage.metadata
    return {
        "dataset_id": ds.spec.dataset_id,
        "episodes": int(ds.total_episodes),
        "steps": int(ds.total_steps),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "falls": int(falls),
        "ref_min_score": md.get("ref_min_score"),
        "ref_max_score": md.get("ref_max_score"),
        "path": display_path(local_dataset_path(ds.spec.dataset_id)),  # printed in the book: no machine folders
    }
