"""The distribution installs actors/, runtime/, schema/ as symbiote.* and nothing top-level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    found = set()
    for top in ("actors", "runtime", "schema"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add(".".join(("symbiote", *rel.parts)))
    return found


def test_every_subpackage_is_listed_in_pyproject() -> None:
    # package-dir remapping means setuptools finds no subpackage by itself: a new folder that
    # is not listed would be missing from a regular (non-editable) install.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _source_packages() == listed


def test_wheel_layout_has_no_top_level_modules(tmp_path: Path) -> None:
    # Build from a copy, so that the build leaves nothing behind in the checkout.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("actors", "runtime", "schema"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(target), str(source)],
        check=True,
        cwd=tmp_path,
    )  # fmt: skip
    top = {p.name for p in target.iterdir()}
    assert not top & {"actors", "runtime", "schema"}
    for package in _source_packages():
        assert (target.joinpath(*package.split(".")) / "__init__.py").exists(), package
    probe = "import symbiote.runtime, symbiote.actors, symbiote.schema; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target), "PATH": ""},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr
