"""Create a virtual environment that sees the *calling* interpreter's packages.

``python -m venv --system-site-packages`` links a new venv to the *base*
interpreter, so when ``python`` is itself a venv's interpreter (the way people
work) the new venv cannot import what that venv installed (torch, curvlinops,
...). This script also adds the calling interpreter's site-packages through a
``.pth`` file, after the new venv's own site-packages, so a package installed
into the new venv (the patched laplace) still shadows the caller's copy.

    python upstream/make_venv.py DEST [--without-pip]
"""

from __future__ import annotations

import argparse
import site
import subprocess
import sys
from pathlib import Path


def caller_site_dirs() -> list[str]:
    """The calling interpreter's site-packages folders (venv or not)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if Path(d).is_dir()]


def make_venv(dest: Path, with_pip: bool = True) -> Path:
    """Create the venv at ``dest``; returns its Python interpreter."""
    cmd = [sys.executable, "-m", "venv", "--system-site-packages", str(dest)]
    if not with_pip:
        cmd.append("--without-pip")
    subprocess.run(cmd, check=True)
    python = dest / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "_caller_site_packages.pth").write_text(
        "\n".join(caller_site_dirs()) + "\n"
    )
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--without-pip", action="store_true")
    args = parser.parse_args()
    print(make_venv(args.dest, with_pip=not args.without_pip))


if __name__ == "__main__":
    main()
