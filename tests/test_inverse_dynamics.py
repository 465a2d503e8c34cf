"""The inverse-dynamics actor: training (exact resume), export with its validation error, safe loading,
refusal of a model from other data, and its actions in the closed loop; evaluate's controller options."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import kill_at_first_checkpoint, module_dataset, tiny_common

from diffusion_rl import pretrained
from diffusion_rl.checkpoint import CheckpointError, load_checkpoint
from diffusion_rl.cli import main
from diffusion_rl.control import FixedWindow, InverseDynamicsActions
from diffusion_rl.models import InverseDynamics
from diffusion_rl.planner import rollout
from diffusion_rl.training import InverseDynamicsConfig, read_loss_log, train

DATA = "walker2d/tiny-v0"
COMMON = {**tiny_common(DATA), "horizon": 2}  # no U-Net here: any horizon >= 2 gives transition pairs
TINY = InverseDynamicsConfig(**{**{k: v for k, v in COMMON.items() if k not in InverseDynamicsConfig.UNUSED},
                                "hidden": 16, "batch_size": 16, "total_steps": 80, "checkpoint_every": 20, "validation_share": 0.2})
CLI_ARGS = ["--dataset-id", DATA, "--horizon", "2", "--hidden", "16", "--batch-size", "16", "--log-every", "10",
            "--ema-start", "20", "--ema-every", "2", "--threads", "1", "--device", "cpu", "--validation-share", "0.2",
            "--no-progress"]

shared_root, minari_root = module_dataset(DATA)


@pytest.fixture(scope="module")
def run(shared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("inverse")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(shared_root))
        train(TINY, out, progress=False)
    return out


@pytest.fixture(scope="module")
def planner():
    return pretrained.load("walker2d-h8", device="cpu")


def test_the_cli_hides_options_an_mlp_has_no_use_for():
    from diffusion_rl.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["train-inverse-dynamics"]
    opts = {o for a in sub._actions for o in a.option_strings}
    assert {"--hidden", "--layers", "--validation-share", "--total-steps"} <= opts
    assert not {"--dim-mults", "--n-diffusion-steps", "--schedule"} & opts


def test_training_lowers_the_loss_and_measures_held_out_episodes(run):
    log = read_loss_log(run)
    assert log[-1]["loss"] < log[0]["loss"]
    state = load_checkpoint(run / "checkpoint.pt", kind="inverse-dynamics")
    val = json.loads((run / "validation.json").read_text())
    assert val["step"] == state["step"] == TINY.total_steps
    assert state["validation"]["mse_normalized"] == val["mse_normalized"] > 0
    assert val["rms_action"] > 0 and val["windows"] > 0


def test_sigkill_then_rerun_gives_the_uninterrupted_weights(run, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "diffusion_rl", "train-inverse-dynamics", "--run-dir", str(out),
            "--total-steps", str(TINY.total_steps), "--checkpoint-every", str(TINY.checkpoint_every), *CLI_ARGS]
    kill_at_first_checkpoint(args, out / "checkpoint.pt")
    assert 0 < load_checkpoint(out / "checkpoint.pt")["step"] < TINY.total_steps, "the kill should land mid-run"
    subprocess.run(args, check=True, capture_output=True)
    for part in ("ema", "model"):
        a, b = load_checkpoint(out / "checkpoint.pt")[part], load_checkpoint(run / "checkpoint.pt")[part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_export_records_the_validation_error_and_loads_safely(run, tmp_path, planner):
    path = tmp_path / "tiny-inverse-dynamics.safetensors"
    meta = pretrained.export_network(run, path, kind="inverse-dynamics")
    assert meta["validation"] == load_checkpoint(run / "checkpoint.pt")["validation"]
    assert meta["steps"] == TINY.total_steps and meta["seed"] == 0 and "train-inverse-dynamics" in meta["train_command"]
    actor = pretrained.load_inverse_dynamics(path)
    assert (actor.obs_dim, actor.act_dim) == (17, 6)
    with pytest.raises(ValueError, match="walker2d/tiny-v0"):  # right shapes, but another dataset than the planner's
        actor.check_planner(planner)
    with pytest.raises(CheckpointError, match="'diffuser' checkpoint"):  # a denoiser run is not exported as an actor
        pretrained.export_network(run, tmp_path / "x.safetensors", kind="diffuser")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_model_for_other_shapes_is_refused_with_the_shapes_named(planner):
    from diffusion_rl.data import Normalizer

    foreign = InverseDynamicsActions(InverseDynamics(11, 3, 8), Normalizer(np.zeros(14), np.ones(14), "gaussian"))
    with pytest.raises(ValueError, match="11-dim states to 3-dim actions.*17-dim states and 6-dim actions"):
        rollout(planner, [0], max_steps=2, inverse_dynamics=foreign)


class ZeroActions(torch.nn.Module):
    """An actor that always names the (normalized) action 0: the data's mean action."""

    obs_dim, act_dim = 17, 6

    def forward(self, s, s_next):
        return torch.zeros(*s.shape[:-1], 6)


def test_inverse_dynamics_acts_toward_the_next_planned_state_and_the_plan_acts_at_its_last_row(planner):
    actor = InverseDynamicsActions(ZeroActions(), planner.normalizer)
    r = rollout(planner, [10_003], controller=FixedWindow(8), max_steps=12, record=True, inverse_dynamics=actor)[0]
    mean_action = np.clip(planner.normalizer.shift[:6], -1, 1).astype(np.float32)
    rows = np.arange(12) % 8
    assert np.allclose(r.actions[rows != 7], mean_action, atol=1e-6)
    assert np.allclose(r.actions[7], np.clip(r.plans[0][7, :6], -1, 1), atol=1e-6)  # the plan has no row after 7


def test_the_shipped_actor_has_a_sidecar_with_its_validation_error():
    meta = pretrained.read_sidecar(pretrained.ASSETS / pretrained.INVERSE_DYNAMICS["walker2d"])
    assert meta["kind"] == "inverse-dynamics" and meta["dataset_id"] == "walker2d/local-expert-v0"
    assert 0 < meta["validation"]["rms_action"] < meta["validation"]["action_std"]
    assert meta["train_command"].startswith("python -m diffusion_rl train-inverse-dynamics") and meta["wall_time_s"] > 0


@pytest.mark.parametrize("args, match", [
    (["--controller", "state-error", "--threshold", "-0.1"], ">= 0"),
    (["--controller", "state-error", "--threshold", "nan"], ">= 0"),
    (["--controller", "state-error", "--threshold", "inf"], "finite"),
    (["--controller", "oracle"], "Unknown controller"),
    (["--controller", "fixed", "--threshold", "0.3"], "not --threshold"),
    (["--controller", "fixed", "--warm-start", "0"], "1..20"),
    (["--controller", "fixed", "--warm-start", "21"], "1..20"),
    (["--controller", "fixed", "--ddim-steps", "0"], "1..20"),
    (["--controller", "fixed", "--ddim-steps", "21"], "1..20"),
    (["--inverse-dynamics", "hopper"], "No inverse-dynamics model named 'hopper'"),
])
def test_bad_controller_options_exit_2_with_one_line(args, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", "--episodes", "1", "--max-steps", "2", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err, err
    assert pytest.importorskip("re").search(match, err), err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_evaluate_without_options_runs_the_shipped_default_controller(capsys, monkeypatch):
    default = pretrained.DEFAULT_CONTROL[pretrained.DEFAULT_PLANNER]  # evaluate's default planner, with its controller
    assert main(["evaluate", "--episodes", "1", "--max-steps", "30", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    name = default["controller"]
    label = f"fixed-k{default['window'] or 1}" if name == "fixed" else f"{name}-{default['threshold']:g}"
    assert out["controller"] == label and out.get("ddim_steps") == default["ddim_steps"]
    assert math.isfinite(out["denoiser_evals_per_step"]) and out["steps_per_plan"] >= 1
