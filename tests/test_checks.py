"""The strict checks of .ci/run can fail: each is run, as .ci/run runs it, on a copy of the
project with one planted fault, and must fail naming it (and pass without the fault).

Slow tier: each builds or checks the whole project once or twice.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    """The command of ``name`` in this interpreter's environment."""
    found = pathlib.Path(sys.executable).parent / name
    if not found.exists():
        pytest.skip(f"{name} is not installed (the lint and docs extras)")
    return str(found)


def project_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """The files the checks read: the package, the docs, their configuration."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("jaxlayerx", "docs", "typings", "examples", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "mkdocs.yml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, copy / name)
    return copy


def run(command: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def plant(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_mkdocs_strict_fails_on_one_docstring_warning(tmp_path):
    project = project_copy(tmp_path)
    site = tmp_path / "site"
    mkdocs = tool("mkdocs")
    clean = run([mkdocs, "build", "--strict", "-d", str(site)], project)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # A docstring naming a parameter the signature does not have: griffe warns, --strict fails.
    plant(
        project / "jaxlayerx" / "merge.py",
        "      TypeError: values the layer does not accept.\n",
        "      TypeError: values the layer does not accept.\n\n    Args:\n      no_such_argument: planted.\n",
    )
    planted = run([mkdocs, "build", "--strict", "-d", str(site)], project)
    assert planted.returncode != 0
    assert "no_such_argument" in planted.stdout + planted.stderr


def test_ruff_fails_on_one_unused_import(tmp_path):
    project = project_copy(tmp_path)
    ruff = tool("ruff")
    assert run([ruff, "check", "."], project).returncode == 0
    plant(project / "jaxlayerx" / "merge.py", "import numpy as np\n", "import numpy as np\nimport os\n")
    planted = run([ruff, "check", "."], project)
    assert planted.returncode != 0 and "F401" in planted.stdout


def test_pyright_fails_on_one_type_error(tmp_path):
    project = project_copy(tmp_path)
    pyright = tool("pyright")
    plant(
        project / "jaxlayerx" / "merge.py",
        "def scatter(like: Any, flat: Any, values: Any) -> Any:",
        "def planted() -> int:\n    return 'not an int'\n\n\ndef scatter(like: Any, flat: Any, values: Any) -> Any:",
    )
    planted = run([pyright, "-p", "."], project)
    assert planted.returncode != 0
    assert "merge.py" in planted.stdout and "reportReturnType" in planted.stdout
