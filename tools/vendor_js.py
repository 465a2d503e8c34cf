"""Vendor the browser code the built book needs, so its math and sliders work offline.

By default the book's pages load MathJax from a CDN. Pages that hold widgets also load require.js,
and @jupyter-widgets/html-manager's ``embed-amd.js``, which in turn fetches the widget code from a
CDN. The project's machines reach package registries only. So this script downloads pinned releases
from the npm registry and checks each one twice: against the registry's SHA-512 and against the
SHA-256 pinned below. It copies the self-contained files into ``_vendor`` (served as the book's static files):

- the widget manager's ``embed.js`` bundle (base and controls widgets built in), its code-split
  chunks and web fonts;
- MathJax's ``tex-svg.js``, which draws glyphs as SVG paths and needs no font files.

Run it only to change a version; its output is committed. ``_config.yml`` points at these files.

    python tools/vendor_js.py
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "_vendor"
PACKAGES = {
    # name: (npm package, version, sha256 of the tarball, files kept from it)
    "widgets": ("@jupyter-widgets/html-manager", "1.0.6", "6c198ceb99ba7e7526990a1de16e8147ad7d3a714e3fb06741183623c04b5f6e",
                lambda n: n == "LICENSE" or n in ("dist/embed.js", "dist/embed.js.LICENSE.txt")
                or (n.startswith("dist/") and (n.endswith(".embed.js") or n.endswith(".woff2")))),
    "mathjax": ("mathjax", "3.2.2", "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09",
                lambda n: n in ("LICENSE", "es5/tex-svg.js")),
}


def fetch(package: str, version: str, sha256: str) -> bytes:
    """The release tarball, verified against the registry's SHA-512 and the pinned SHA-256."""
    meta = json.load(urllib.request.urlopen(f"https://registry.npmjs.org/{package}/{version}", timeout=60))
    data = urllib.request.urlopen(meta["dist"]["tarball"], timeout=300).read()
    algo, _, digest = meta["dist"]["integrity"].partition("-")
    if algo != "sha512" or hashlib.sha512(data).digest() != base64.b64decode(digest):
        raise SystemExit(f"{package}@{version}: the tarball does not match the registry's integrity hash")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{package}@{version}: SHA-256 {hashlib.sha256(data).hexdigest()}, pinned {sha256}")
    return data


def main() -> None:
    for name, (package, version, sha256, keep) in PACKAGES.items():
        dest = VENDOR / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(fetch(package, version, sha256))) as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix("package/")
                if member.isfile() and keep(rel):
                    (dest / Path(rel).name).write_bytes(tar.extractfile(member).read())
        (dest / "VERSION").write_text(f"{package}@{version} (npm tarball sha256 {sha256})\n")
        print(f"{package}@{version} -> {dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")


if __name__ == "__main__":
    main()
