"""The push study: agents x push forces through the shared runner, the expert as an agent, resume, bad agents.

Bad disturbance values (negative or NaN force, a push longer than its interval, ...) are refused by
:class:`~diffusion_rl.disturbances.Disturbance` and tested in test_disturbances.py; the runner's own
resume and bad-arm cases in test_experiment.py. Here a tiny planner stands in for the shipped ones.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
from conftest import module_dataset, tiny_common, tiny_runs

from diffusion_rl import experiment, pretrained, studies
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.experiment import Arm
from diffusion_rl.studies import Agent
from diffusion_rl.training import DiffuserConfig, ValueConfig

DATA = "walker2d/push-tiny-v0"
COMMON = tiny_common(DATA)
shared_root, minari_root = module_dataset(DATA)

AGENTS = studies.PUSH_AGENTS + (Agent("other-k2", "other", window=2),)  # a second planner, as a DART-trained one would be
FORCES = (0.0, 300.0)
SEEDS, TUNING = [10000, 10001], [20000, 20001]
MAX_STEPS = 30
PUSH = Disturbance(push_duration=5, push_interval=10)  # pushes within the short episodes
FILES = ("episodes.csv", "summary.json", "record.json")


@pytest.fixture(scope="module")
def planner(shared_root, tmp_path_factory):
    # Horizon 8, so that the shipped default's controller (k = 4, 1-step DDIM) fits.
    common = {**COMMON, "horizon": 8}
    d, v = tiny_runs(shared_root, tmp_path_factory, DiffuserConfig(total_steps=40, checkpoint_every=40, **common),
                     ValueConfig(total_steps=20, checkpoint_every=20, **common))
    return pretrained.load_run(str(d), str(v))


def study(planner, out):
    def load(name: str):
        return planner, {"source": {"planner": name}}

    return studies.push_study(out, command="python -m diffusion_rl study push", progress=False, agents=AGENTS, forces=FORCES,
                              seeds=SEEDS, tuning_seeds=TUNING, max_steps=MAX_STEPS, load=load, push=PUSH)


def read_rows(folder):
    with open(folder / "episodes.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(planner, shared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("push")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(shared_root))  # the tiny planner's data normalizes the returns
        return out, study(planner, out)


def test_rows_summary_and_record(finished):
    out, summary = finished
    rows = read_rows(out)
    assert {"agent", "push_force", "seed", "return", "normalized", "fell", "env_steps", "diverged"} <= set(rows[0])
    assert [(r["agent"], float(r["push_force"]), int(r["seed"])) for r in rows] == [
        (a.name, f, s) for a in AGENTS for f in FORCES for s in SEEDS]
    default = [r for r in rows if r["agent"] == "default"]
    _, control = studies.default_planner()
    assert {r["controller"] for r in default} == {f"fixed-k{control['window']}"}  # the shipped default's own controller
    for r in rows:
        assert int(r["env_steps"]) <= MAX_STEPS and int(r["fell"]) in (0, 1)
    settings = {(s["agent"], s["disturbance"]["push_force"]): s for s in summary["settings"]}
    assert set(settings) == {(a.name, f) for a in AGENTS for f in FORCES}
    for s in settings.values():
        assert set(s["normalized"]) == {"mean", "ci95"} and len(s["fall_rate"]["ci95"]) == 2  # bootstrap, Wilson
    pairs = {(c["baseline"], c["treatment"]) for c in summary["comparisons"]}
    against_expert = {(f"expert-push{f:g}", f"{a.name}-push{f:g}") for a in AGENTS[1:] for f in FORCES}
    between = {(f"{b}-push{f:g}", f"{t}-push{f:g}") for b, t in studies.PUSH_PAIRS for f in FORCES}
    assert between and pairs == against_expert | between
    assert all({"normalized", "fell"} <= set(c) for c in summary["comparisons"])
    assert set(summary["notes"]["expert_forces"]["expert_fall_rate"]) == {"0", "300"}
    record = json.loads((out / "record.json").read_text())
    assert record["spec"]["expert"]["sha256"] == json.loads(pretrained.ASSETS.joinpath("expert-walker2d-sac.json").read_text())["sha256"]
    others = {a.planner for a in AGENTS if a.planner not in (None, studies.DEFAULT, studies.REFERENCE_PLANNER)}
    others |= {studies.default_planner()[0]} - {studies.REFERENCE_PLANNER}
    assert record["spec"]["planners"] == {name: {"source": {"planner": name}} for name in others}
    assert (out / "tuning" / "summary.json").exists() and {int(r["seed"]) for r in read_rows(out / "tuning")} == set(TUNING)
    assert experiment.load_rows(out)[0]["agent"] == "expert"


def test_paired_agents_are_compared_at_every_force(finished):
    from diffusion_rl import push_figures

    _, summary = finished
    for baseline, treatment in studies.PUSH_PAIRS:
        rows = push_figures.paired_by_force(summary, baseline, treatment)
        assert [r["force"] for r in rows] == list(FORCES)
        assert all(r["baseline"]["agent"] == baseline and r["treatment"]["agent"] == treatment for r in rows)
        assert push_figures.pair_table_html(summary, baseline, treatment).count("<tr>") == len(FORCES) + 1
    with pytest.raises(ValueError, match="pairs no arms"):
        push_figures.paired_by_force(summary, "k1-ddpm20", "expert")


def test_expert_rows_are_its_policy_episodes(finished):
    import gymnasium as gym

    from diffusion_rl.expert import load_policy, policy_episodes

    out, _ = finished
    rows = [r for r in read_rows(out) if r["agent"] == "expert"]
    actor, _ = load_policy()
    spec = replace(gym.spec("Walker2d-v5"), max_episode_steps=MAX_STEPS)
    for force in FORCES:
        episodes = policy_episodes(actor, SEEDS, deterministic=True, env_id=spec, disturbance=replace(PUSH, push_force=force))
        mine = [r for r in rows if float(r["push_force"]) == force]
        assert [(int(r["seed"]), float(r["return"]), int(r["env_steps"]), bool(int(r["fell"]))) for r in mine] == [
            (e["seed"], round(e["return"], 3), e["length"], e["fell"]) for e in episodes]
    pushed = {int(r["seed"]): float(r["return"]) for r in rows if float(r["push_force"]) == 300}
    calm = {int(r["seed"]): float(r["return"]) for r in rows if float(r["push_force"]) == 0}
    assert pushed != calm, "the pushes reach the expert's episodes"


def test_a_killed_study_reruns_to_the_same_files(planner, finished, tmp_path):
    out, _ = finished
    first = {(part, n): (out / part / n).read_bytes() for part in ("", "tuning") for n in FILES}
    # A kill before these arms finished loses their kept rows (the expert's and two planners'); the rerun restores the same bytes.
    for name in ("expert-push300", "k2-ddim2-push0", "other-k2-push300"):
        (out / ".rows" / f"{name}.json").unlink()
    (out / "tuning" / ".rows" / "default-push300.json").unlink()
    (out / "episodes.csv").unlink()
    study(planner, out)
    assert {key: (out / key[0] / key[1]).read_bytes() for key in first} == first
    study(planner, tmp_path)  # a fresh folder: the same bytes again
    assert {key: (tmp_path / key[0] / key[1]).read_bytes() for key in first} == first


@pytest.mark.parametrize("arm, match", [
    (Arm("e", 1, agent="expert"), "window"),
    (Arm("e", None, 0.3, agent="expert"), "guidance_scale"),
    (Arm("p", 1, planner="nowhere"), "not given"),
])
def test_bad_arms_are_refused_before_anything_is_written(planner, tmp_path, arm, match):
    with pytest.raises(ValueError, match=match):
        experiment.run_experiment(planner, [arm], SEEDS, tmp_path / "out", {}, progress=False, max_steps=MAX_STEPS)
    assert not (tmp_path / "out").exists()


def test_bad_agents_are_refused():
    with pytest.raises(ValueError, match="unique"):
        studies.push_arms([Agent("a", "walker2d-h8"), Agent("a", "walker2d-h8")], [0])
    with pytest.raises(ValueError, match="names no planner"):
        studies.push_arms([Agent("b")], [0])
    with pytest.raises(ValueError, match="push_force"):
        studies.push_arms([Agent("expert")], [-1.0])


def test_the_study_command_knows_the_push_study():
    from diffusion_rl.cli import build_parser

    assert build_parser().parse_args(["study", "push"]).name == "push"
    assert studies.study_folder("push").name == "push_study"


def test_the_robust_default_is_the_rule_applied_to_the_tuning_stage():
    def setting(agent, force, falls, score, evals=1.0):
        return {"agent": agent, "disturbance": {"push_force": force}, "falls": falls, "normalized": {"mean": score},
                "denoiser_evals_per_step": evals}

    agents = (Agent("expert"), Agent("a", "p", window=1), Agent("b", "p", window=2), Agent("c", "q", window=1))
    summary = {"settings": [setting("expert", 0, 0, 100), setting("expert", 300, 9, 80),
                            setting("a", 0, 0, 99), setting("a", 300, 5, 90),
                            setting("b", 0, 0, 99, 0.5), setting("b", 300, 5, 90, 0.5),  # as robust as a, cheaper
                            setting("c", 0, 0, 97), setting("c", 300, 0, 99)]}  # the most robust, but misses 98% undisturbed
    chosen = studies.choose_push_default(summary, agents)
    assert chosen["agent"] == "b" and chosen["planner"] == "p" and chosen["control"]["window"] == 2
    with pytest.raises(ValueError, match="keeps 101"):
        studies.choose_push_default(summary, agents, keep=101)


def test_the_shipped_default_is_the_push_studys_choice():
    folder = studies.study_folder("push") / "tuning"
    chosen = studies.choose_push_default(json.loads((folder / "summary.json").read_text()))
    assert (chosen["planner"], chosen["control"]) == (pretrained.DEFAULT_PLANNER, pretrained.DEFAULT_CONTROL[pretrained.DEFAULT_PLANNER])
