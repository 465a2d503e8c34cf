"""The guidance study's arms and its choice of the best steering setting (the runner itself is tested in test_experiment.py)."""

from __future__ import annotations

import json

import pytest
from conftest import module_dataset, tiny_common, tiny_runs

from diffusion_rl import guidance_study as gs
from diffusion_rl import pretrained
from diffusion_rl.experiment import MEASURES, load_rows
from diffusion_rl.training import DiffuserConfig, ValueConfig


def test_every_data_set_and_window_gets_each_method_over_its_scale():
    arms = gs.guidance_arms()
    names = [a.name for a in arms]
    assert len(names) == len(set(names))
    for d in gs.GUIDANCE_DATA:
        for k in gs.WINDOWS:
            mine = [a for a in arms if a.name.startswith(f"{d.short}-k{k}-")]
            methods = [dict(a.labels)["method"] for a in mine]
            assert methods.count("unguided") == 1 and methods.count("gradient") == len(d.gradient_scales)
            assert methods.count("best-of-n") == len(gs.SAMPLES)
            assert methods.count("classifier-free") == (len(gs.WEIGHTS) if d.conditional else 0)
            for a in mine:
                labels = dict(a.labels)
                assert labels["dataset"] == d.dataset_id and a.window == k and a.ddim_steps == gs.DDIM_STEPS
                scale = {"unguided": None, "gradient": a.guidance_scale, "best-of-n": a.n_samples}.get(labels["method"])
                if labels["method"] == "classifier-free":
                    scale = dict(a.planner_options)["classifier_free"][1]
                    assert a.planner == d.conditional
                else:
                    assert a.planner == d.planner
                assert labels["scale"] == scale


def test_objective_arms_measure_what_they_target():
    for data in gs.OBJECTIVE_DATA:
        arms = gs.objective_arms(data)
        speed = [a for a in arms if dict(a.labels)["target_speed"] is not None]
        assert all(a.measures == ("mean_speed",) and a.planner == data.planner for a in arms if a in speed)
        assert [dict(a.planner_options).get("objective", dict(a.planner_options).get("inpaint")) for a in speed] == \
            [("speed", v) for v in data.speed_targets]
        assert all(set(a.measures) <= set(MEASURES) for a in arms)
        assert all(dict(a.labels)["method"] == data.steering.method and dict(a.labels)["scale"] == data.steering.scale for a in arms)
        height = [a for a in arms if dict(a.labels)["target_height"] is not None]
        assert [dict(a.planner_options)["objective"] for a in height] == [("height", h) for h in data.height_targets]
        assert all(a.measures == ("mean_height",) for a in height)
    assert any(len(d.speed_targets) >= 5 for d in gs.OBJECTIVE_DATA)  # the "at least 5 targets"
    mexpert = gs.OBJECTIVE_DATA[0]
    assert all(a.n_samples == gs.OBJECTIVE_SAMPLES for a in gs.objective_arms(mexpert))
    # the best-steering choice never picks an objective arm
    arms = [a for d in gs.OBJECTIVE_DATA for a in gs.objective_arms(d) + gs.objective_tuning_arms(d)]
    summary = {"settings": [{"name": a.name, "normalized": {"mean": 1000.0}} for a in arms]
               + [{"name": f"{mexpert.short}-k{k}-{m}", "normalized": {"mean": 1.0}} for k in gs.WINDOWS for m in ("unguided", "free1")]}
    data = gs.GuidanceData(mexpert.dataset_id, mexpert.planner, None, (0.1,), mexpert.short)
    assert all(c["setting"].endswith("free1") for c in gs.choose_best(summary, [data]).values())


def test_each_way_of_steering_by_an_objective_sets_its_own_options():
    objective = ("speed", 1.5)
    assert gs.Steering("best-of-n", 16).arm_options(objective) == {"n_samples": 16, "planner_options": (("objective", objective),)}
    assert gs.Steering("gradient", 3.0).arm_options(objective) == {"guidance_scale": 3.0, "planner_options": (("objective", objective),)}
    assert gs.Steering("inpainting").arm_options(objective) == {"planner_options": (("inpaint", objective),)}
    with pytest.raises(ValueError, match="steering method"):
        gs.Steering("prayer")


def test_the_objective_steering_is_chosen_by_falls_then_speed_error():
    ways = (gs.Steering("best-of-n", 16), gs.Steering("gradient", 1.0), gs.Steering("inpainting"))
    data = gs.ObjectiveData("d", "p", "tiny", (1.0, 2.0), tuning_speeds=(1.0, 2.0), tried=ways)
    outcome = {"best-of-16": (0, 0.5), "gradient1": (0, 0.1), "inpainting": (3, 0.0)}  # (falls per target, |error|)
    summary = {"settings": [{"name": f"tiny-{w}-speed{v:g}", "falls": f, "labels": {"target_speed": v}, "mean_speed": {"mean": v + e}}
                            for w, (f, e) in outcome.items() for v in (1.0, 2.0)]}
    assert gs.choose_objective_steering(summary, data) == {"method": "gradient", "scale": 1.0, "falls": 0, "mean_abs_error": 0.1}
    assert [a.name for a in gs.objective_tuning_arms(data)] == [f"tiny-{w}-speed{v:g}" for w in outcome for v in (1.0, 2.0)]
    assert gs.objective_tuning_arms(gs.OBJECTIVE_DATA[0]) == []  # no tuning speeds: nothing tried in the study


def test_the_best_setting_is_chosen_per_data_set_and_window():
    def setting(name, mean):
        return {"name": name, "normalized": {"mean": mean}}

    data = gs.GUIDANCE_DATA[:1]
    summary = {"settings": [setting("expert-k1-unguided", 99.0), setting("expert-k1-gradient0.1", 90.0),
                            setting("expert-k1-best-of-4", 95.0), setting("expert-k4-unguided", 50.0),
                            setting("expert-k4-free2", 70.0), setting("expert-k4-best-of-64", 60.0)]}
    best = gs.choose_best(summary, data)
    assert best == {"expert-k1": {"setting": "expert-k1-best-of-4", "normalized": 95.0},
                    "expert-k4": {"setting": "expert-k4-free2", "normalized": 70.0}}
    with pytest.raises(ValueError):
        gs.choose_best({"settings": [setting("expert-k1-unguided", 1.0)]}, data)


# ---------------------------------------------------------------- the whole study, on a tiny planner

DATA = "walker2d/guidance-tiny-v0"
shared_root, minari_root = module_dataset(DATA)


@pytest.fixture(scope="module")
def finished(shared_root, tmp_path_factory):
    common = {**tiny_common(DATA), "horizon": 8}
    d, v = tiny_runs(shared_root, tmp_path_factory, DiffuserConfig(total_steps=20, checkpoint_every=20, **common),
                     ValueConfig(total_steps=10, checkpoint_every=10, **common))
    planner = pretrained.load_run(str(d), str(v))
    data = (gs.GuidanceData(DATA, gs.OBJECTIVE_DATA[0].planner, None, (0.1,), "tiny"),)
    objectives = (gs.ObjectiveData(DATA, gs.OBJECTIVE_DATA[0].planner, "tinyobj", (1.0, 2.0), (1.1,), gs.Steering("inpainting"), (1.5,),
                                   (gs.Steering("inpainting"),)),)

    def load(name: str):
        return planner, {"source": {"planner": name}}

    out = tmp_path_factory.mktemp("guidance")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(shared_root))
        kwargs = {"data": data, "seeds": [10000, 10001], "tuning_seeds": [20000], "max_steps": 6, "load": load,
                  "progress": False, "behaviour": {"tiny": DATA}, "objectives": objectives}
        for i in (1, 2):
            assert gs.guidance_study(out, part=(i, 2), **kwargs) is None  # rows only
        assert not (out / "summary.json").exists()
        return out, gs.guidance_study(out, command="python -m diffusion_rl study guidance", **kwargs)


def test_the_study_tunes_steering_and_evaluates_objectives_too(finished):
    out, summary = finished
    tuning = json.loads((out / "tuning" / "summary.json").read_text())
    tuned = {s["name"] for s in tuning["settings"]}
    evaluated = {s["name"] for s in summary["settings"]}
    objective_data = gs.ObjectiveData(DATA, gs.OBJECTIVE_DATA[0].planner, "tinyobj", (1.0, 2.0), (1.1,), gs.Steering("inpainting"), (1.5,),
                                      (gs.Steering("inpainting"),))
    objectives = {a.name for a in gs.objective_arms(objective_data)}
    trials = {a.name for a in gs.objective_tuning_arms(objective_data)}
    assert trials and trials <= tuned and not evaluated & trials
    assert tuned and not tuned & objectives and evaluated == (tuned - trials) | objectives
    assert set(summary["notes"]["objective_steering"]) == {DATA}
    assert {c["baseline"] for c in summary["comparisons"]} == {"tiny-k1-unguided", "tiny-k4-unguided"}
    assert set(summary["notes"]["behaviour_policy"]) == {"tiny"} and summary["notes"]["data"][DATA]["fell"]
    rows = load_rows(out)
    speed = [r for r in rows if r["target_speed"] not in ("", None)]
    assert {float(r["target_speed"]) for r in speed} == {1.0, 2.0}
    assert all(r["mean_speed"] not in ("", None) for r in speed)
    assert all(r["mean_speed"] in ("", None) for r in rows if r["target_speed"] in ("", None) and r["target_height"] in ("", None))


def test_the_shipped_study_has_the_interface_columns_and_every_setting_on_the_evaluation_seeds():
    from diffusion_rl import studies

    folder = studies.study_folder("guidance")
    rows = load_rows(folder)  # checks the files against the record's SHA-256
    for column in ("dataset", "method", "scale", "window", "seed", "return", "normalized", "fell",
                   "target_speed", "mean_speed"):
        assert column in rows[0], column
    assert {r["method"] for r in rows} == {"unguided", "gradient", "best-of-n", "classifier-free"}
    per_setting: dict[str, list[int]] = {}
    for r in rows:
        per_setting.setdefault(r["setting"], []).append(int(r["seed"]))
        assert (r["mean_speed"] is None) == (r["target_speed"] is None)  # speed measured exactly on speed rows
    assert all(sorted(seeds) == list(range(10_000, 10_030)) for seeds in per_setting.values())
    speeds = {r["target_speed"] for r in rows if r["target_speed"] is not None}
    assert len(speeds) >= 5  # the "at least 5 targets"
    tuning = json.loads((folder / "tuning" / "summary.json").read_text())
    assert tuning["episodes_per_setting"] == 10


def test_the_study_names_each_objective_planners_speed_arms():
    speeds = gs.objective_data("walker2d-h8-speeds")
    assert speeds.planner == "walker2d-h8-speeds" and speeds.steering == gs.Steering("gradient", 3.0)
    arm = gs.speed_arm(speeds, 2.1)
    assert arm in gs.objective_arms(speeds) and arm.guidance_scale == 3.0 and dict(arm.labels)["target_speed"] == 2.1
    with pytest.raises(ValueError, match="walker2d-h8-speeds"):
        gs.objective_data("walker2d-h8")
