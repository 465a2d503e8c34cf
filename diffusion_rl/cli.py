"""Command line: ``python -m diffusion_rl <subcommand> --help``.

Each subcommand is a thin shell over one library function, so everything the CLI does can also
be done from Python (and from the book's notebooks).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import NoReturn

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away) that reads ``-1e-05`` as a number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Before Python 3.13 argparse takes "-1e-05" for an option ("expected one argument"), so a negative
        # learning rate never reached the check that names what is wrong with it.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """Expose a config dataclass's fields as ``--field-name`` options, with their docstrings as help."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(_field_docs(klass))
    for f in fields(cls):
        if f.name in getattr(cls, "UNUSED", ()):
            continue
        default = f.default if f.default is not MISSING else None
        kind = type(default) if default is not None else str
        kind = _parse_bool if kind is bool else kind
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
            help=f"{docs.get(f.name, '')} (default: {default})",
        )


def config_from_args(cls, args: argparse.Namespace, **defaults):
    """Build config dataclass ``cls`` from the options :func:`_add_dataclass_args` added; unset ones keep ``defaults``, else cls's."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**defaults, **given})


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_docs(cls) -> dict[str, str]:
    """Read the attribute docstrings under each dataclass field (the CleanRL/tyro convention)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _command_line() -> str:
    from diffusion_rl.runtime import portable_command

    return portable_command(sys.argv[1:])  # recorded in shipped sidecars: no machine paths


# ----------------------------------------------------------------------------- subcommands


def cmd_train_expert(args: argparse.Namespace) -> int:
    from diffusion_rl.expert import SACConfig, train_sac

    path = train_sac(config_from_args(SACConfig, args), args.run_dir, progress=not args.no_progress)
    print(f"checkpoint: {path}")
    return 0


def cmd_export_expert(args: argparse.Namespace) -> int:
    from diffusion_rl.expert import export_policy

    meta = export_policy(args.checkpoint, args.out, command=_command_line())
    det, sto = meta["eval_deterministic"], meta["eval_stochastic"]
    print(f"wrote {meta['file']} (env steps {meta['env_steps']}, wall {meta['wall_time_s']:.0f} s)")
    print(f"deterministic return over {len(meta['eval_seeds'])} seeds: {det['mean']:.1f} +- {det['std']:.1f}")
    print(f"stochastic return over {len(meta['eval_seeds'])} seeds:    {sto['mean']:.1f} +- {sto['std']:.1f}")
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    import json

    from diffusion_rl.collect import dataset_summary, make_dataset

    options = {k: getattr(args, k) for k in ("action_noise", "max_push", "checkpoint") if getattr(args, k) is not None}  # the recipe checks them
    ds = make_dataset(
        args.dataset_id, n_episodes=args.episodes, min_steps=args.steps, policy_path=args.policy,
        first_seed=args.first_seed, force=args.force, progress=not args.no_progress, recipe=args.recipe, options=options,
    )
    print(json.dumps(dataset_summary(ds), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffusion_rl.training import CONFIGS, train

    path = train(config_from_args(CONFIGS[args.command.removeprefix("train-")], args), args.run_dir, progress=not args.no_progress)
    print(f"checkpoint: {path}")
    return 0


def _load_planner(args: argparse.Namespace):
    from diffusion_rl import pretrained

    if args.diffuser:
        return pretrained.load_run(args.diffuser, args.value)
    return pretrained.load(args.planner, device=args.device)


def _steering(args: argparse.Namespace) -> dict:
    """The planner options of evaluate's steering flags (classifier-free guidance, a test-time objective), checked."""
    import math

    steering = {}
    if args.target_return is not None and args.classifier_free_weight is None:
        raise ValueError("--target-return is the condition of classifier-free guidance: give --classifier-free-weight too.")
    if args.classifier_free_weight is not None:
        target = 1.0 if args.target_return is None else args.target_return
        steering["classifier_free"] = (target, args.classifier_free_weight)  # the planner checks both, and the model
    targets = {name: v for name, v in (("speed", args.target_speed), ("height", args.target_height)) if v is not None}
    if len(targets) > 1:
        raise ValueError("Give one test-time objective: --target-speed or --target-height, not both.")
    if (args.objective_weight is not None or args.inpaint) and not targets:
        raise ValueError("--objective-weight and --inpaint act on a test-time objective: give --target-speed or --target-height too.")
    for name, target in targets.items():
        if not math.isfinite(target):
            raise ValueError(f"--target-{name} must be a finite number, got {target}.")
        if args.inpaint:
            if args.objective_weight is not None:
                raise ValueError("--inpaint writes the target into the plan; it takes no --objective-weight.")
            steering["inpaint"] = (name, target)  # guidance and selection, if asked for, still follow the value network
            continue
        if args.guidance_scale is None and args.samples == 1:
            raise ValueError(f"--target-{name} steers through guidance or selection: give --guidance-scale or --samples > 1 too.")
        weight = args.objective_weight
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"--objective-weight must be a finite number >= 0, got {weight}.")
        steering["objective"] = (name, target) if weight is None else (name, target, weight)
    return steering


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    import math

    from diffusion_rl.control import controller_from_name
    from diffusion_rl.evaluation import evaluate
    from diffusion_rl.pretrained import DEFAULT_CONTROL, load_inverse_dynamics

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ValueError(f"--threshold must be a finite number >= 0, got {args.threshold}.")
    control = {"controller": args.controller, "window": args.window, "threshold": args.threshold, "ddim_steps": args.ddim_steps,
               "warm_start": args.warm_start}
    if all(v is None for v in control.values()) and not args.diffuser:
        control = dict(DEFAULT_CONTROL[args.planner])  # the shipped planner's default: the best point of the control study
    controller = controller_from_name(control["controller"] or "fixed", window=control["window"], threshold=control["threshold"])
    steering = _steering(args)
    planner = _load_planner(args).with_options(guide_placement=args.guide_placement, clip_actions=args.clip_actions, **steering)
    inverse = load_inverse_dynamics(args.inverse_dynamics) if args.inverse_dynamics else None
    from diffusion_rl.disturbances import Disturbance

    disturbance = config_from_args(Disturbance, args)
    summary = evaluate(
        planner, guidance_scale=args.guidance_scale, n_samples=args.samples,
        seeds=range(args.first_seed, args.first_seed + args.episodes), ddim_steps=control["ddim_steps"],
        max_steps=args.max_steps, progress=not args.no_progress, controller=controller, warm_start=control["warm_start"],
        inverse_dynamics=inverse, disturbance=disturbance,
    )
    print(json.dumps({k: v for k, v in summary.items() if k not in ("returns", "seeds")}, indent=2))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from diffusion_rl.finetune import FinetuneConfig, finetune

    path = finetune(config_from_args(FinetuneConfig, args), args.run_dir, progress=not args.no_progress)
    print(f"checkpoint: {path}")
    return 0


def cmd_finetune_report(args: argparse.Namespace) -> int:
    from diffusion_rl.finetune import report_runs

    report = report_runs(args.runs, args.out, snapshots_of=args.snapshots_of, progress=not args.no_progress,
                         compare_at=args.compare_at, add=args.add)
    for r in report["runs"]:
        t = r["tuning"]
        print(f"{r['name']}: k = {t['window']}, {t['normalized']:.1f}% of the data, {t['falls']} falls, {r['env_steps']} env steps, {r['wall_time_s']:.0f} s")
    return 0


def cmd_export_finetuned(args: argparse.Namespace) -> int:
    from diffusion_rl.finetune import export_finetuned

    meta = export_finetuned(args.run, args.name, args.out_dir, command=_command_line())
    ft = meta["finetune"]
    print(f"wrote {meta['file']} ({ft['iterations']} iterations, {ft['env_steps']} env steps, {ft['wall_time_s']:.0f} s)")
    return 0


def cmd_export_planner(args: argparse.Namespace) -> int:
    from diffusion_rl.evaluation import export_planner

    meta = export_planner(
        args.diffuser, args.value, name=args.name, out_dir=args.out_dir, guidance_scale=args.guidance_scale,
        episodes=args.episodes, command=_command_line(), progress=not args.no_progress,
    )
    for key, row in meta["score"].items():
        print(f"{key}: {row['mean_return']:.1f} +- {row['std_return']:.1f}, {row['percent_of_data']:.1f}% of data, {row['falls']} falls, {row['wall_time_s']:.0f} s")
    return 0


def cmd_export_inverse_dynamics(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from diffusion_rl import pretrained

    out_dir = Path(args.out_dir) if args.out_dir else pretrained.ASSETS
    meta = pretrained.export_network(args.run, out_dir / f"{args.name}-inverse-dynamics.safetensors", {"export_command": _command_line()},
                                     kind="inverse-dynamics")
    print(json.dumps({k: meta[k] for k in ("file", "steps", "wall_time_s", "validation", "sha256") if k in meta}, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from diffusion_rl.disturbances import Disturbance
    from diffusion_rl.sweep import PRESETS, SweepConfig, run_sweep

    cfg = config_from_args(SweepConfig, args, **PRESETS[args.preset])
    disturbance = config_from_args(Disturbance, args)
    cfg = replace(cfg, disturbance=disturbance if disturbance.active else None)
    summary = run_sweep(cfg, args.out, command=_command_line(), progress=not args.no_progress)
    print(f"{'setting':<12} {'episodes':>8} {'return':>22} {'% of data':>10} {'falls':>6}")
    for s in summary["settings"]:
        lo, hi = s["return"]["ci95"]
        print(f"{s['setting']:<12} {s['episodes']:>8} {s['return']['mean']:>8.1f} [{lo:6.0f}, {hi:6.0f}] {s['normalized']['mean']:>10.1f} {s['falls']:>6}")
    for name, t in summary["trend"].items():
        print(f"trend ({name}): Spearman rho {t['spearman_rho']:+.3f}, permutation p = {t['p_value']:.4f}, slope {t['slope']:+.2f} points per window")
    print(f"results: {args.out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import json

    from diffusion_rl.studies import run_study

    part = None
    if args.part is not None:
        i, _, n = args.part.partition("/")
        if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
            raise ValueError(f"--part must be i/n with 1 <= i <= n (for example 1/2), got {args.part!r}.")
        part = (int(i), int(n))
    summary = run_study(args.name, args.out, command=_command_line(), progress=not args.no_progress, part=part)
    if summary is None:
        print(f"part {args.part} done; when every part is, rerun without --part to write the results")
        return 0
    for s in summary["settings"]:
        lo, hi = s["normalized"]["ci95"]
        print(f"{s['name']:<22} {s['normalized']['mean']:6.1f}% [{lo:6.1f}, {hi:6.1f}]  falls {s['falls']:>2}/{s['episodes']}")
    for c in summary["comparisons"]:
        d = c.get("normalized")
        if d:
            print(f"{c['treatment']} - {c['baseline']}: {d['mean']:+.1f} points {json.dumps([round(v, 1) for v in d['ci95']])}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from diffusion_rl.benchmark import run_benchmark

    run_benchmark(quick=args.quick)
    return 0


def cmd_doctor(args: argparse.Namespace | None) -> int:
    from diffusion_rl.doctor import run_doctor

    return 0 if run_doctor()["ok"] else 1


def _add_disturbance_args(p: argparse.ArgumentParser) -> None:
    """The Disturbance options (--push-force ...), as one group."""
    from diffusion_rl.disturbances import Disturbance

    _add_dataclass_args(p.add_argument_group("disturbances (pushes on the torso, shifted dynamics; seeded by each episode's seed)"), Disturbance)


def _add_planner_args(p: argparse.ArgumentParser) -> None:
    from diffusion_rl.pretrained import DEFAULT_PLANNER, PRETRAINED

    p.add_argument("--planner", default=DEFAULT_PLANNER, choices=sorted(PRETRAINED), metavar="NAME",
                   help=f"shipped planner: {', '.join(sorted(PRETRAINED))} (default: {DEFAULT_PLANNER})")
    p.add_argument("--diffuser", default=None, help="use this train-diffuser run (folder or checkpoint.pt) instead")
    p.add_argument("--value", default=None, help="with --diffuser: the train-value run for guidance")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from diffusion_rl.expert import SACConfig

    parser = _Parser(prog="python -m diffusion_rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    p = sub.add_parser("train-expert", help="train (or resume) the SAC expert on Walker2d-v5")
    p.add_argument("--run-dir", default="runs/expert-sac", help="checkpoint and curve folder; rerun to resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dataclass_args(p, SACConfig)
    p.set_defaults(func=cmd_train_expert)

    p = sub.add_parser("export-expert", help="evaluate a SAC checkpoint and write its policy as safetensors + JSON")
    p.add_argument("checkpoint", help="checkpoint.pt of a train-expert run")
    p.add_argument("--out", default=None, help="output .safetensors (default: the package's shipped policy)")
    p.set_defaults(func=cmd_export_expert)

    from diffusion_rl.collect import FIRST_SEED
    from diffusion_rl.recipes import RECIPES

    p = sub.add_parser("make-dataset", help="roll out the expert and write a Minari dataset (reused if complete)")
    p.add_argument("--recipe", choices=list(RECIPES), default="expert",
                   help="how to collect: " + "; ".join(f"{r.name}: {r.summary} ({r.dataset_id})" for r in RECIPES.values()) + " (default: expert)")
    p.add_argument("--dataset-id", default=None, help="Minari id to write (default: the recipe's, in --recipe's list)")
    p.add_argument("--steps", type=int, default=100_000, help="collect whole episodes until this many steps (default: 100000)")
    p.add_argument("--episodes", type=int, default=None, help="collect exactly this many episodes instead (small test sets)")
    p.add_argument("--policy", default=None, help="expert .safetensors (default: the shipped policy)")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"reset seed of episode 0 (default: {FIRST_SEED})")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete dataset exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--action-noise", type=float, default=None, help="expert-dart: std of the noise on executed actions (default: 0.2)")
    p.add_argument("--max-push", type=float, default=None, help="expert-dart: largest push force in N, drawn per episode (default: 200)")
    p.add_argument("--checkpoint", default=None,
                   help="medium-replay: the medium SAC run's checkpoint, whose replay buffer it reads (default: runs/medium-sac/checkpoint.pt)")
    p.set_defaults(func=cmd_make_dataset)

    from diffusion_rl.training import DiffuserConfig, InverseDynamicsConfig, ValueConfig

    for name, cls, what in [("train-diffuser", DiffuserConfig, "the temporal U-Net denoiser"), ("train-value", ValueConfig, "the value network for guidance"),
                            ("train-inverse-dynamics", InverseDynamicsConfig, "the inverse-dynamics model a = f(s, s') (an actor for plans)")]:
        p = sub.add_parser(name, help=f"train (or resume) {what}")
        p.add_argument("--run-dir", default=f"runs/{name[6:]}-h8", help="checkpoint and loss-log folder; rerun to resume")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_dataclass_args(p, cls)
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-inverse-dynamics", help="export a train-inverse-dynamics run as safetensors + sidecar (with its validation error)")
    p.add_argument("--run", default="runs/inverse-dynamics-h8", help="train-inverse-dynamics run folder or checkpoint.pt (default: runs/inverse-dynamics-h8)")
    p.add_argument("--name", default="walker2d", help="model name: writes <name>-inverse-dynamics.safetensors (default: walker2d)")
    p.add_argument("--out-dir", default=None, help="output folder (default: the package's assets)")
    p.set_defaults(func=cmd_export_inverse_dynamics)

    p = sub.add_parser("evaluate", help="closed-loop episodes of a planner: mean return, falls, percent of the data")
    _add_planner_args(p)
    p.add_argument("--controller", default=None, help="when to replan: fixed (every --window steps), state-error "
                   "(when the real state leaves the plan's prediction by more than --threshold) or likelihood (when the "
                   "denoiser's reconstruction of the rest of the plan from the real state errs by more than --threshold). "
                   "With none of --controller, --window, --threshold, --ddim-steps, --warm-start: the shipped planner's default "
                   "controller, the best point of the control study (see pretrained.DEFAULT_CONTROL)")
    p.add_argument("--window", type=int, default=None, help="fixed controller: executed window k, actions run per plan, 1..H (default: 1)")
    p.add_argument("--threshold", type=float, default=None,
                   help="state-error controller: replan when the RMS distance to the planned state, in data standard deviations, exceeds this")
    p.add_argument("--inverse-dynamics", default=None, metavar="NAME",
                   help="act with this inverse-dynamics model (a shipped name such as walker2d, or a .safetensors path) "
                   "toward the plan's next state, instead of the plan's own action")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-guidance scale kappa (default: unguided)")
    p.add_argument("--samples", type=int, default=1, help="plans per replanning; >1 keeps the best by value (default: 1)")
    p.add_argument("--classifier-free-weight", type=float, default=None, metavar="W",
                   help="classifier-free guidance toward --target-return with weight W >= 0 (a planner trained with --returns-condition)")
    p.add_argument("--target-return", type=float, default=None,
                   help="classifier-free guidance's return, in units of the expert's discounted return-to-go (default: 1.0)")
    p.add_argument("--target-speed", type=float, default=None, metavar="V",
                   help="test-time objective: walk at V m/s, through --guidance-scale or --samples (replaces the value network)")
    p.add_argument("--target-height", type=float, default=None, metavar="H",
                   help="test-time objective: hold the torso at H m, through --guidance-scale or --samples")
    p.add_argument("--objective-weight", type=float, default=None, metavar="C",
                   help="steer by the value network's return plus C times the objective, instead of the objective alone")
    p.add_argument("--inpaint", action="store_true",
                   help="write the objective's target into every intermediate plan instead of steering toward it")
    p.add_argument("--ddim-steps", type=int, default=None, help="use the DDIM sampler with this many steps")
    p.add_argument("--warm-start", type=int, default=None,
                   help="start each replan from the previous plan, shifted and re-noised to N of the sampler's levels (default: from pure noise)")
    p.add_argument("--guide-placement", choices=["after", "before"], default="after",
                   help="guide each reverse step's result (after, the study's notebook) or x_t before the step (before, Diffuser's code) (default: after)")
    p.add_argument("--clip-actions", action="store_true", help="keep planned actions inside [-1, 1] while sampling, not only when executed")
    p.add_argument("--episodes", type=int, default=20, help="episodes (default: 20)")
    p.add_argument("--first-seed", type=int, default=10_000, help="reset seed of the first episode (default: 10000)")
    p.add_argument("--max-steps", type=int, default=1000, help="episode length limit (default: 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_disturbance_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export-planner", help="export trained runs as the package's planner and score it in closed loop")
    p.add_argument("--diffuser", required=True, help="train-diffuser run folder or checkpoint.pt")
    p.add_argument("--value", default=None, help="train-value run folder or checkpoint.pt (default: none; the planner then cannot guide)")
    p.add_argument("--name", default="walker2d-h8", help="planner name (default: walker2d-h8)")
    p.add_argument("--out-dir", default=None, help="output folder (default: the package's assets)")
    p.add_argument("--guidance-scale", type=float, default=0.3, help="guidance scale for the guided score (default: 0.3, chosen on seeds 20000-20039)")
    p.add_argument("--episodes", type=int, default=20, help="evaluation episodes per setting (default: 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_planner)

    from diffusion_rl.finetune import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune a shipped planner's last denoising steps with PPO on the reward (DPPO); rerun to resume")
    p.add_argument("--run-dir", default="runs/finetune", help="checkpoint, snapshots and curve.csv folder; rerun to resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dataclass_args(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("finetune-report", help="score finetune runs (and one run's snapshots) on the tuning seeds 20000-20029")
    p.add_argument("runs", nargs="+", help="finetune run folders")
    p.add_argument("--out", default="diffusion_rl/assets/finetune_runs", help="writes runs.json and each run's curve.csv here")
    p.add_argument("--snapshots-of", default=None, help="name of the run whose snapshots are scored too")
    p.add_argument("--compare-at", type=int, default=None, help="also score every run's snapshot after this many iterations")
    p.add_argument("--add", action="store_true", help="keep the report's other runs and add (or rescore) these")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune_report)

    p = sub.add_parser("export-finetuned", help="export a finetune run as a shipped planner (safetensors + sidecar)")
    p.add_argument("--run", default="runs/finetune", help="finetune run folder (default: runs/finetune)")
    p.add_argument("--name", required=True, help="planner name: writes <name>-diffuser.safetensors")
    p.add_argument("--out-dir", default=None, help="output folder (default: the package's assets)")
    p.set_defaults(func=cmd_export_finetuned)

    from diffusion_rl.sweep import PRESETS, SweepConfig

    p = sub.add_parser("sweep", help="the window-size experiment: closed-loop episodes per executed window, with statistics")
    p.add_argument("--out", default="runs/window-sweep", help="results folder; rerun the same command to finish an interrupted sweep")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="full: every window unguided and guided, 30 episodes; study: the study's 8 settings x 10 episodes (default: full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dataclass_args(p, SweepConfig)
    _add_disturbance_args(p)
    p.set_defaults(func=cmd_sweep)

    from diffusion_rl.studies import STUDIES

    p = sub.add_parser("study", help="a closed-loop study on seeds 10000-10029 (settings tuned on 20000-20029), results with 95%% CIs")
    p.add_argument("name", choices=sorted(STUDIES), help="which study: " + ", ".join(f"{k} (ships in diffusion_rl/assets/{v.folder})" for k, v in STUDIES.items()))
    p.add_argument("--out", default=None, help="results folder (default: the study's shipped folder); rerun to resume")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="guidance: run the I-th of N shares of the work (N processes at once), then rerun without it to write the results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("benchmark", help="training and planning speed on this machine, as ratios to the reference figures")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("doctor", help="versions, GL rendering, datasets present, shipped files verified: run this first when something is wrong")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m diffusion_rl``."""
    if (sys.argv[1:] if argv is None else argv) == ["doctor"]:
        # Building the parser imports torch and gymnasium; the doctor must run even where those are broken.
        return cmd_doctor(None)
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    from diffusion_rl.checkpoint import CheckpointError
    from diffusion_rl.data import DatasetError
    from diffusion_rl.training import TrainingError

    try:
        return func(args)
    except (DatasetError, CheckpointError, TrainingError, ValueError, OSError) as exc:
        # A user mistake (or a full disk, a read-only or misnamed path) gets its message, not a
        # traceback into torch or minari.
        if os.environ.get("DIFFUSION_RL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints and datasets are intact, rerun the same command to resume", file=sys.stderr)
        return 130
