"""The repository URL has one home: ``repository.url`` in ``_config.yml``.

Jupyter Book reads it there for the Colab and repository buttons. A notebook opened in Colab has
no ``_config.yml`` beside it, so each chapter's install cell must carry the URL literally; this
tool writes that line from ``_config.yml``. After a fork, change ``repository.url`` and run

    python tools/repo_url.py          # rewrite every chapter's install line
    python tools/repo_url.py --check  # exit 1 if a chapter disagrees (tests/test_publish.py runs this check)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIP_LINE = re.compile(r'^(?P<indent>\s*)%pip install -q "git\+(?P<url>[^"]+)"\s*$')


def config_url(root: Path = ROOT) -> str:
    """The repository URL from ``_config.yml`` (``repository.url``), without a trailing slash."""
    return yaml.safe_load((root / "_config.yml").read_text())["repository"]["url"].rstrip("/")


def chapters(root: Path = ROOT) -> list[Path]:
    """The book's notebooks, in ``_toc.yml`` order (root first)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    names = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    return [root / f"{n}.ipynb" for n in names if (root / f"{n}.ipynb").is_file()]


def install_cell(notebook: dict) -> dict | None:
    """The first code cell of ``notebook`` if it holds the Colab ``%pip install`` line, else None."""
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    if code and any(PIP_LINE.match(line) for line in "".join(code[0]["source"]).splitlines()):
        return code[0]
    return None


def notebook_urls(root: Path = ROOT) -> dict[str, str | None]:
    """Each chapter's install URL (None where its first code cell has no install line)."""
    out = {}
    for path in chapters(root):
        cell = install_cell(json.loads(path.read_text(encoding="utf-8")))
        lines = "".join(cell["source"]).splitlines() if cell else []
        found = [m["url"] for m in map(PIP_LINE.match, lines) if m]
        out[path.relative_to(root).as_posix()] = found[0] if found else None
    return out


def sync(root: Path = ROOT) -> list[str]:
    """Write ``_config.yml``'s URL into every chapter's install line; returns the notebooks changed."""
    url, changed = config_url(root), []
    for path in chapters(root):
        nb = json.loads(path.read_text(encoding="utf-8"))  # read right before writing: others edit these too
        cell = install_cell(nb)
        if cell is None:
            continue
        lines = "".join(cell["source"]).split("\n")
        new = [PIP_LINE.sub(lambda m: f'{m["indent"]}%pip install -q "git+{url}"', ln) for ln in lines]
        if new != lines:
            text = "\n".join(new)
            cell["source"] = text.splitlines(keepends=True)
            # nbformat's own layout (indent 1, trailing newline) keeps the diff to the changed line
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path.relative_to(root).as_posix())
    return changed


def main(argv: list[str] | None = None) -> int:
    """Command line: sync the chapters' install lines, or ``--check`` that they agree with _config.yml."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report chapters whose URL differs; exit 1 if any")
    args = p.parse_args(argv)
    if args.check:
        url = config_url()
        bad = {name: got for name, got in notebook_urls().items() if got not in (None, url)}
        for name, got in bad.items():
            print(f"{name}: installs from {got}, _config.yml says {url}")
        return 1 if bad else 0
    for name in sync():
        print(f"updated {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
