"""Command line: ``python -m diffusion_rl <subcommand> --help``.

Each subcommand is a thin shell over one library function, so everything the CLI does can also
be done from Python (and from the book's notebooks).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import MISSING, fields
from typing import Callable

__all__ = ["main", "build_parser"]


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """Expose a config dataclass's fields as ``--field-name`` options, with their docstrings as help."""
    docs = _field_docs(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        kind = type(default) if default is not None else str
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
            help=f"{docs.get(f.name, '')} (default: {default})",
        )


def _field_docs(cls) -> dict[str, str]:
    """Read the attribute docstrings under each dataclass field (the CleanRL/tyro convention)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _command_line() -> str:
    return "python -m diffusion_rl " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ----------------------------------------------------------------------------- subcommands


def cmd_train_expert(args: argparse.Namespace) -> int:
    from diffusion_rl.expert import config_from_args, train_sac

    path = train_sac(config_from_args(args), args.run_dir, progress=not args.no_progress)
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

    ds = make_dataset(
        args.dataset_id, n_episodes=args.episodes, min_steps=args.steps, policy_path=args.policy,
        first_seed=args.first_seed, force=args.force, progress=not args.no_progress,
    )
    print(json.dumps(dataset_summary(ds), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from diffusion_rl.expert import SACConfig

    parser = argparse.ArgumentParser(prog="python -m diffusion_rl", description=__doc__.splitlines()[0])
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
    from diffusion_rl.data import DEFAULT_DATASET_ID

    p = sub.add_parser("make-dataset", help="roll out the expert and write a Minari dataset (reused if complete)")
    p.add_argument("--dataset-id", default=DEFAULT_DATASET_ID, help=f"Minari id to write (default: {DEFAULT_DATASET_ID})")
    p.add_argument("--steps", type=int, default=100_000, help="collect whole episodes until this many steps (default: 100000)")
    p.add_argument("--episodes", type=int, default=None, help="collect exactly this many episodes instead (small test sets)")
    p.add_argument("--policy", default=None, help="expert .safetensors (default: the shipped policy)")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"reset seed of episode 0 (default: {FIRST_SEED})")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete dataset exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_make_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m diffusion_rl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    from diffusion_rl.checkpoint import CheckpointError
    from diffusion_rl.data import DatasetError

    try:
        return func(args)
    except (DatasetError, CheckpointError) as exc:
        # A user mistake gets its message, not a traceback into torch or minari.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished checkpoints and datasets are intact, rerun the same command to resume", file=sys.stderr)
        return 130
