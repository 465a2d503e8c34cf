"""The shared experiment runner: rows, summary, record, resume, byte-identical reruns, bad input."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import module_dataset, tiny_common, tiny_runs

from diffusion_rl import experiment, pretrained
from diffusion_rl.experiment import Arm, Comparison
from diffusion_rl.training import DiffuserConfig, ValueConfig

DATA = "walker2d/experiment-tiny-v0"
COMMON = tiny_common(DATA)
shared_root, minari_root = module_dataset(DATA)

ARMS = [Arm("k1", 1), Arm("k4", 4), Arm("k4-guided", 4, 0.3), Arm("k4-before", 4, 0.3, planner_options=(("guide_placement", "before"),)),
        Arm("k2-ddim1", 2, ddim_steps=1), Arm("k4-clip", 4, planner_options=(("clip_actions", True),)),
        Arm("adaptive", None, controller="state-error", threshold=0.5), Arm("k2-warm", 2, warm_start=2)]
COMPARE = [Comparison("k4", "k4-guided"), Comparison("k4-guided", "k4-before")]
SEEDS = [10000, 10001, 10002]
IDENT = {"source": "test"}


@pytest.fixture(scope="module")
def planner(shared_root, tmp_path_factory):
    d, v = tiny_runs(shared_root, tmp_path_factory, DiffuserConfig(total_steps=60, checkpoint_every=60, **COMMON),
                     ValueConfig(total_steps=30, checkpoint_every=30, **COMMON))
    return pretrained.load_run(str(d), str(v))


def run(planner, out, arms=ARMS, compare=COMPARE):
    return experiment.run_experiment(planner, arms, SEEDS, out, IDENT, "python -m diffusion_rl study test", compare,
                                     max_steps=40, progress=False)


def test_rows_summary_and_record(planner, tmp_path):
    summary = run(planner, tmp_path)
    with open(tmp_path / "episodes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], int(r["seed"])) for r in rows] == [(a.name, s) for a in ARMS for s in SEEDS]
    T = planner.diffusion.n_timesteps
    for r in rows:
        window, steps, plans, evals = int(r["window"]), int(r["env_steps"]), int(r["plans"]), int(r["denoiser_evals"])
        assert 0 <= float(r["clipped_action_share"]) <= 1
        if r["setting"] == "adaptive":
            assert r["controller"] == "state-error-0.5" and steps / 8 <= plans <= steps and evals == plans * T
            continue
        assert r["controller"] == f"fixed-k{window}" and plans == -(-steps // window)  # a fixed window replans every k steps
        expected = {"k2-ddim1": plans, "k2-warm": T + 2 * (plans - 1)}.get(r["setting"], plans * T)
        assert evals == expected, r
    clip = [float(r["clipped_action_share"]) for r in rows if r["setting"] == "k4-clip"]
    assert max(clip) == 0.0, "clipped inside the sampler: nothing left for the environment to clip"
    assert [s["name"] for s in summary["settings"]] == [a.name for a in ARMS]
    assert {(c["baseline"], c["treatment"]) for c in summary["comparisons"]} == {("k4", "k4-guided"), ("k4-guided", "k4-before")}
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["command"].startswith("python -m diffusion_rl") and set(record["files_sha256"]) == {"episodes.csv", "summary.json"}
    assert experiment.load_rows(tmp_path)[0]["setting"] == "k1"
    (tmp_path / "episodes.csv").write_text((tmp_path / "episodes.csv").read_text().replace("k1,", "k9,", 1))
    with pytest.raises(ValueError, match="SHA-256"):
        experiment.load_rows(tmp_path)


def test_a_rerun_resumes_and_rebuilds_byte_for_byte(planner, tmp_path):
    run(planner, tmp_path / "a")
    first = {n: (tmp_path / "a" / n).read_bytes() for n in ("episodes.csv", "summary.json", "record.json")}
    # Lose two arms' kept rows (as a kill before they finished would), rerun: the same files come back.
    for name in ("k4-before", "k4-clip", "adaptive"):
        (tmp_path / "a" / ".rows" / f"{name}.json").unlink()
    run(planner, tmp_path / "a")
    assert {n: (tmp_path / "a" / n).read_bytes() for n in first} == first
    run(planner, tmp_path / "b")  # a fresh folder: the same bytes again
    assert {n: (tmp_path / "b" / n).read_bytes() for n in first} == first


def test_another_study_in_the_folder_is_refused(planner, tmp_path):
    run(planner, tmp_path, arms=ARMS[:2], compare=[])
    with pytest.raises(ValueError, match="another study"):
        run(planner, tmp_path, arms=ARMS[:1], compare=[])
    with pytest.raises(ValueError, match="does not have"):
        run(planner, tmp_path / "other", arms=ARMS[:1])


@pytest.mark.parametrize("arms, match", [
    ([Arm("a", 1), Arm("a", 2)], "unique"),
    ([Arm("a", 1, planner_options=(("temperature", 2.0),))], "Unknown planner option"),
    ([Arm("a", 1, 0.3, planner_options=(("guide_placement", "during"),))], "placement"),
    ([Arm("a", None, controller="state-error", threshold=-1.0)], "threshold"),
    ([Arm("a", 9)], "integer in 1"),
])
def test_bad_arms_are_refused_before_anything_is_written(planner, tmp_path, arms, match):
    with pytest.raises(ValueError, match=match):
        experiment.run_experiment(planner, arms, SEEDS, tmp_path / "out", IDENT, progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_study_name_is_a_one_line_error(capsys):
    from diffusion_rl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["study", "nonsense"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_two_parts_then_the_whole_give_the_files_of_one_run(planner, tmp_path):
    run(planner, tmp_path / "whole")
    parts = tmp_path / "parts"
    for i in (1, 2):
        assert experiment.run_experiment(planner, ARMS, SEEDS, parts, IDENT, "python -m diffusion_rl study test", COMPARE,
                                         max_steps=40, progress=False, part=(i, 2)) is None
        assert not (parts / "episodes.csv").exists(), "a part writes rows only"
    done = {p.stem for p in (parts / ".rows").glob("*.json")}
    assert done == {a.name for a in ARMS}, "the two shares cover every arm"
    share = experiment._share(ARMS, (1, 2))
    assert share and share.isdisjoint(experiment._share(ARMS, (2, 2)))
    run(planner, parts)
    for name in ("episodes.csv", "summary.json", "record.json"):
        assert (parts / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    with pytest.raises(ValueError, match="part must be"):
        experiment._share(ARMS, (3, 2))
