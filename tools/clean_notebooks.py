"""Strip outputs from the book's notebooks before committing, except cells checked by nbval.

Cells tagged ``nbval-check-output`` keep their (small, deterministic) output so that
``tests/test_book.py`` (and ``pytest --nbval-lax``) have something to compare against. Usage:

    python tools/clean_notebooks.py book/*.ipynb            # strip in place
    python tools/clean_notebooks.py --execute book/02_data.ipynb   # run first, then strip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TAG = "nbval-check-output"


def clean(path: Path) -> None:
    nb = json.loads(path.read_text())
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in ("tags",)}
        keep = TAG in cell["metadata"].get("tags", [])
        if keep:
            count += 1
            cell["execution_count"] = count
            cell["outputs"] = [o for o in cell["outputs"] if o.get("output_type") in ("stream", "execute_result")]
            for o in cell["outputs"]:
                if "execution_count" in o:
                    o["execution_count"] = count
        else:
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"] = {k: nb["metadata"][k] for k in ("kernelspec", "language_info") if k in nb["metadata"]}
    nb["metadata"].get("language_info", {}).pop("version", None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def execute(path: Path) -> None:
    """Run a notebook top to bottom in its own folder and save the outputs in place."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--execute", action="store_true", help="execute each notebook in place first")
    args = parser.parse_args()
    for path in args.notebooks:
        if args.execute:
            execute(path)
        clean(path)
        print(f"cleaned {path}")


if __name__ == "__main__":
    main()
