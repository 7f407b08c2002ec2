"""The package's metadata: one version, every data file of ``innerloop/`` shipped, the changelog.

The wheel itself is built, installed in a fresh venv and run by ``tools/check_package.sh``
(``make package-check``, which CI runs after ``make test``)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import innerloop

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version():
    """pyproject.toml holds the version; ``innerloop.__version__`` is the installed metadata's."""
    version = PROJECT["project"]["version"]
    assert "version" not in PROJECT["project"].get("dynamic", [])
    try:
        installed = importlib.metadata.version("innerloop")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("innerloop is not installed: run `make setup` (pip install -e .), then the tests")
    assert installed == version, (
        f"the installed metadata says {installed}, pyproject.toml {version}: reinstall (`make setup`)")
    assert innerloop.__version__ == version


def test_version_is_pep440():
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", PROJECT["project"]["version"])


def test_every_data_file_is_package_data():
    """Every file of ``innerloop/`` that is not Python source matches a package-data pattern, so the
    wheel carries it (``tools/check_package.sh`` checks the built wheel the same way)."""
    patterns = PROJECT["tool"]["setuptools"]["package-data"]["innerloop"]
    package = ROOT / "innerloop"
    covered = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    data = {p for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in data - covered)
    assert not missing, f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"
    assert package / "py.typed" in covered


def test_metadata_for_an_index():
    project = PROJECT["project"]
    assert project["license"] == "MIT"
    assert {"Homepage", "Documentation", "Issues", "Changelog"} <= set(project["urls"])
    assert "Typing :: Typed" in project["classifiers"]
    assert project["keywords"]
    assert project["scripts"]["innerloop"] == "innerloop.cli:main"
    # make package-check needs them in the dev venv
    assert any(d.startswith("build") for d in project["optional-dependencies"]["dev"])
    assert any(d.startswith("twine") for d in project["optional-dependencies"]["dev"])


def test_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    version = PROJECT["project"]["version"]
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M), (
        f"CHANGELOG.md has no section '## [{version}] - YYYY-MM-DD'")
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    for name in headings:  # every section is linked at the bottom, as Keep a Changelog does
        assert re.search(rf"^\[{re.escape(name)}\]: ", text, re.M), f"no link for [{name}]"


def test_check_script_is_wired():
    """CI runs ``make test`` then ``make package-check``, which runs the script."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make package-check" in ci
    assert ci.index("make test") < ci.index("make package-check")
    assert "tools/check_package.sh" in (ROOT / "Makefile").read_text()
    script = (ROOT / "tools" / "check_package.sh").read_text()
    assert "torch==2.13.0" in script  # an unpinned torch pulls a multi-GB CUDA build
