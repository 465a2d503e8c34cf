"""Publishing: the CI and Pages workflows, the reader's view of the chapters, shipped files without
machine traces, one repository URL, and each chapter's Colab cell run as Colab would run it.

The built pages get the same checks in tests/test_book.py (it imports :func:`machine_traces`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
ASSETS = ROOT / "diffusion_rl" / "assets"
sys.path.insert(0, str(ROOT / "tools"))
import repo_url  # noqa: E402  (tools/ is not a package)

CHAPTERS = repo_url.chapters(ROOT)
CODE_WIDTH = 88
TRACE = re.compile(r"(?<![\w.-])/root\b|/home/|/tmp/|\bshared/")
"""Absolute paths of the machine that made a file, and this project's development folder."""


def machine_traces(text: str, extra: Iterable[str] = ()) -> Iterator[re.Match]:
    """Every absolute path (``/root``, ``/home/``, ``/tmp/``, ``extra`` folders) or ``shared/`` in ``text``."""
    pattern = TRACE if not extra else re.compile("|".join([TRACE.pattern, *(re.escape(e) for e in extra)]))
    return pattern.finditer(text)


def test_machine_traces_finds_what_it_must():
    bad = "python -m diffusion_rl export-expert /root/.cache/x.pt; /home/me/a; /tmp/b; the study (shared/seed)"
    assert len(list(machine_traces(bad))) == 4
    assert not list(machine_traces("runs/expert-sac/checkpoint.pt; https://github.com/a/b; sha256: 0f3e"))
    assert list(machine_traces("built in /work/main/_build", extra=["/work/main"]))


# ----------------------------------------------------------------------------- workflows


def _workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def _readme_packages() -> set[str]:
    """The EGL/Mesa packages the README's system requirement names."""
    m = re.search(r"`sudo apt-get install ([a-z0-9.+ -]+)`", (ROOT / "README.md").read_text())
    assert m, "the README no longer names its apt packages"
    return set(m.group(1).split())


def _apt_packages(workflow: dict) -> set[str]:
    runs = " ".join(step.get("run", "") for step in _steps(workflow))
    found = re.findall(r"apt-get install(?: -\S+)* ((?:[a-z0-9][a-z0-9.+-]+ ?)+)", runs)
    return {pkg for group in found for pkg in group.split()}


def _runs_line(workflow: dict, command: str) -> bool:
    return any(command in [ln.strip() for ln in step.get("run", "").splitlines()] for step in _steps(workflow))


def test_readme_and_makefile_agree_on_the_commands():
    readme, makefile = (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()
    for target in ("book", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M), target
    # The README says what `make test` runs; the Makefile's recipe must run exactly that.
    said = re.search(r"`make test` runs `([^`]+)`", readme).group(1)
    recipe = re.search(r"^test:.*\n\t(.+)$", makefile, re.M).group(1)
    assert said in recipe.replace("$(BIN)/python -m ", ""), (said, recipe)
    from diffusion_rl.gl import EGL_PACKAGES

    assert _readme_packages() == set(EGL_PACKAGES.split()), "README and diffusion_rl.gl name different EGL packages"


def test_ci_workflow_runs_make_test_with_the_readme_setup():
    ci = _workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    (job,) = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = _steps(ci)
    python = [s for s in steps if s.get("uses", "").startswith("actions/setup-python@")]
    assert python and str(python[0]["with"]["python-version"]) == "3.11" and python[0]["with"].get("cache") == "pip"
    assert _runs_line(ci, "make test"), "CI must run the README's test command"
    assert _apt_packages(ci) == _readme_packages()
    caches = [s for s in steps if s.get("uses", "").startswith("actions/cache@")]
    assert any(s["with"]["path"].strip() == ".venv" for s in caches), "the venv is not cached"
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and "_build/html" in uploads[0]["with"]["path"], "the built HTML is not uploaded"
    # The book tests build into pytest's basetemp; the upload reads it from there.
    test_step = next(s for s in steps if s.get("run", "").strip() == "make test")
    basetemp = test_step["env"]["PYTEST_ADDOPTS"].split("--basetemp=")[1].strip()
    assert uploads[0]["with"]["path"].startswith(basetemp + "/book0/")


def test_pages_workflow_builds_with_make_book_and_deploys_with_the_official_actions():
    pages = _workflow("pages.yml")
    assert pages["on"]["push"]["branches"] == ["main"]
    assert pages["permissions"]["pages"] == "write" and pages["permissions"]["id-token"] == "write"
    assert _runs_line(pages, "make book")
    assert _apt_packages(pages) == _readme_packages()
    steps = _steps(pages)
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert upload and upload[0]["with"]["path"] == "_build/html", "make book writes _build/html"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in steps)
    assert "build" in pages["jobs"]["deploy"]["needs"]


# ----------------------------------------------------------------------------- shipped files


def _asset_texts() -> Iterator[tuple[str, str]]:
    """(name, text) of every shipped file under diffusion_rl/assets, zip members (npz) included."""
    for path in sorted(ASSETS.rglob("*")):
        rel = path.relative_to(ASSETS).as_posix()
        if not path.is_file() or rel.startswith("window_sweep/episodes/"):  # recorded episodes are not shipped
            continue
        data = path.read_bytes()
        yield rel, data.decode("latin-1")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    yield f"{rel}:{member}", member + z.read(member).decode("latin-1")


def test_shipped_files_carry_no_machine_traces():
    names = []
    for name, text in _asset_texts():
        names.append(name)
        traces = [m.group(0) for m in machine_traces(text, extra=(str(ROOT),))]
        assert not traces, f"diffusion_rl/assets/{name} records machine paths: {traces[:5]}"
    assert "expert-walker2d-sac.json" in names and "window_sweep/summary.json" in names


def test_recorded_commands_are_portable(tmp_path):
    from diffusion_rl.runtime import portable_command

    cmd = portable_command(["export-expert", "/root/.cache/runs/expert-sac/checkpoint.pt", "--out",
                            str(tmp_path / "assets" / "p.safetensors"), f"--run-dir={tmp_path}/runs/x"], cwd=tmp_path)
    assert cmd == ("python -m diffusion_rl export-expert .../expert-sac/checkpoint.pt --out assets/p.safetensors "
                   "--run-dir=runs/x")
    assert not list(machine_traces(cmd))


# ----------------------------------------------------------------------------- the chapters


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_code_fits_the_column_and_hides_nbval_markers(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        assert "NBVAL" not in source, f"cell {i}: use the nbval cell tags (nbval-check-output, ...), which readers never see"
        for tag in cell.get("metadata", {}).get("tags", []):
            if tag.startswith("nbval"):
                assert tag in {"nbval-check-output", "nbval-ignore-output", "nbval-skip", "nbval-raise-exception"}, tag
        if cell["cell_type"] == "code":
            long = [line for line in source.splitlines() if len(line) > CODE_WIDTH]
            assert not long, f"cell {i} has lines over {CODE_WIDTH} columns (the book's column): {long[:2]}"
        else:
            assert not cell.get("outputs")


def _nbval(tmp_path: Path, tags: list[str]) -> int:
    """Run pytest --nbval-lax on a one-cell notebook whose stored output is wrong; return pytest's exit code."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)", metadata={"tags": tags}, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    nb.cells = [cell]
    path = tmp_path / f"tags-{'-'.join(tags) or 'none'}.ipynb"
    nbformat.write(nb, path)
    for _ in range(2):  # nbval's kernel takes TCP ports: beside the book build's kernels, one may be gone (seen once)
        run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", path.name],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        if not any(lost in run.stdout + run.stderr for lost in ("Address already in use", "Kernel didn't respond")):
            break
    return run.returncode


def test_nbval_honours_the_cell_tags(tmp_path):
    # --nbval-lax compares outputs only where asked: the tag must do what the old comment did.
    assert _nbval(tmp_path, ["nbval-check-output"]) == 1, "nbval-check-output did not compare the output"
    assert _nbval(tmp_path, []) == 0


def test_repository_url_is_set_in_one_place():
    url = repo_url.config_url(ROOT)
    found = repo_url.notebook_urls(ROOT)
    chapters = {name: got for name, got in found.items() if "bibliography" not in name}
    assert chapters and all(got == url for got in chapters.values()), f"_config.yml says {url}; chapters: {chapters}"
    assert subprocess.run([sys.executable, str(ROOT / "tools" / "repo_url.py"), "--check"], check=False).returncode == 0


def test_repo_url_tool_rewrites_the_install_cells(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "book").mkdir()
    for path in CHAPTERS:
        (tmp_path / "book" / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    config = tmp_path / "_config.yml"
    config.write_text(config.read_text().replace(repo_url.config_url(ROOT), "https://github.com/someone/fork"))
    changed = repo_url.sync(tmp_path)
    assert len(changed) == sum(1 for g in repo_url.notebook_urls(ROOT).values() if g)
    assert set(repo_url.notebook_urls(tmp_path).values()) - {None} == {"https://github.com/someone/fork"}
    assert not repo_url.sync(tmp_path), "a second sync changes nothing"


@pytest.mark.parametrize("path", [p for p in CHAPTERS if repo_url.install_cell(json.loads(p.read_text()))],
                         ids=lambda p: p.stem)
def test_colab_cell_runs_in_a_fresh_kernel(path, monkeypatch, tmp_path):
    """The chapter's first cell as Colab runs it (COLAB_RELEASE_TAG set), with the pip line a no-op here."""
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    source = "".join(repo_url.install_cell(json.loads(path.read_text(encoding="utf-8")))["source"])
    local = "\n".join(repo_url.PIP_LINE.sub(r"\g<indent>import diffusion_rl  # installed here", line)
                      for line in source.splitlines())
    assert local != source
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(local)])
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    monkeypatch.delenv("MUJOCO_GL", raising=False)  # as on Colab: the cell must pick the backend itself
    # The kernel talks over files in tmp_path, not TCP ports: the book build starts kernels beside this test, and a
    # port the client picked can be taken before its kernel binds it ("Address already in use", seen once).
    ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(tmp_path / "kernel")}})
    NotebookClient(nb, timeout=180, kernel_name="python3", config=ipc).execute()  # raises on any error in the cell
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert re.search(r"MuJoCo renders with (egl|osmesa|glfw)\b", text), text


# ----------------------------------------------------------------------------- the landing figure


def test_landing_figure_grows_with_the_curves_it_is_given():
    import matplotlib

    matplotlib.use("Agg")
    from diffusion_rl import figures, sweep

    study = figures.study_curves()
    assert [c.windows for c in study] == [(2, 3, 4, 5, 6, 7, 8), (8,)]  # the study's window w is k = w + 1
    assert study[0].scores[0] == 90.3 and study[1].scores == (84.1,)
    ours = figures.sweep_curves(sweep.load_results().summary)
    assert [len(c.windows) for c in ours] == [8, 8] and all(lo <= m <= hi for c in ours for m, (lo, hi) in zip(c.scores, c.ci95))
    extra = figures.WindowCurve("a later method", (1, 4, 8), (100.0, 95.0, 90.0), ((99, 101), (93, 97), (85, 95)), color="green")
    import matplotlib.pyplot as plt

    fig = figures.plot_window_curves(study + ours + [extra])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)  # later tests count the open figures
    assert labels == [c.label for c in study + ours + [extra]]


def test_printed_folders_name_no_machine_paths(tmp_path, monkeypatch):
    import tempfile

    from diffusion_rl.runtime import display_path

    monkeypatch.chdir(tmp_path)
    assert display_path(tmp_path / "runs" / "x") == "runs/x"
    assert display_path(Path.home() / ".minari" / "datasets") == "~/.minari/datasets"
    outside = Path(tempfile.gettempdir()) / "diffuser-live-abc"
    monkeypatch.chdir(Path.home())
    assert display_path(outside) == "$TMPDIR/diffuser-live-abc"
    assert not list(machine_traces(display_path(outside)))


def test_clean_notebooks_keeps_only_the_outputs_nbval_checks(tmp_path):
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location("clean_notebooks", Path(__file__).parents[1] / "tools" / "clean_notebooks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    nb = nbformat.v4.new_notebook()
    for tags in (["nbval-check-output"], []):
        cell = nbformat.v4.new_code_cell("print(1)", metadata={"tags": tags}, execution_count=7)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n"),
                        nbformat.v4.new_output("display_data", data={"text/plain": "a figure"})]
        nb.cells.append(cell)
    nb.metadata["widgets"] = {"state": "a saved slider"}
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    tool.clean(path)
    kept, stripped = nbformat.read(path, as_version=4).cells
    assert [o["output_type"] for o in kept.outputs] == ["stream"] and kept.execution_count == 1
    assert stripped.outputs == [] and stripped.execution_count is None
    assert "widgets" not in nbformat.read(path, as_version=4).metadata
