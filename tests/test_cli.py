"""The command line: discoverable, and user mistakes get a message instead of a traceback."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_rl", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for sub in ("train-expert", "export-expert", "make-dataset"):
        assert sub in out.stdout


def test_bad_dataset_id_is_a_clean_error():
    out = run("make-dataset", "--dataset-id", "../../etc/passwd-v0", "--episodes", "1")
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_export_of_a_missing_checkpoint_is_a_clean_error(tmp_path):
    out = run("export-expert", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.safetensors"))
    assert out.returncode == 2 and "No checkpoint" in out.stderr and "Traceback" not in out.stderr
