"""JAX's persistent compilation cache in the ``jaxlayerx`` command: where it goes, how it
turns off, and that a run served from it gives the same metrics."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from jaxlayerx.compile_cache import CACHE_VARIABLE, cache_dir

TINY = ["--clients", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "8", "--no-progress"]


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, pathlib.Path.home() / ".cache" / "jaxlayerx" / "xla"),
        ({"XDG_CACHE_HOME": "/somewhere"}, pathlib.Path("/somewhere/jaxlayerx/xla")),
        ({CACHE_VARIABLE: "/elsewhere/cache"}, pathlib.Path("/elsewhere/cache")),
        ({CACHE_VARIABLE: "/elsewhere/cache", "XDG_CACHE_HOME": "/somewhere"}, pathlib.Path("/elsewhere/cache")),
        ({CACHE_VARIABLE: "off"}, None),
        ({CACHE_VARIABLE: "0"}, None),
        ({CACHE_VARIABLE: "False"}, None),
        ({CACHE_VARIABLE: "  "}, pathlib.Path.home() / ".cache" / "jaxlayerx" / "xla"),
    ],
)
def test_cache_dir_from_the_environment(environ, expected):
    assert cache_dir(environ) == expected


def simulate(folder: pathlib.Path, env: dict[str, str], *extra: str) -> dict:
    command = [sys.executable, "-m", "jaxlayerx", "simulate", "--out", str(folder), *TINY, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    return {name: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in h] for name, h in metrics.items()}


def entries(folder: pathlib.Path) -> list[pathlib.Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_runs_fill_the_cache_reuse_it_and_give_the_same_metrics(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_VARIABLE, str(cache))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    import os

    env = dict(os.environ)
    first = simulate(tmp_path / "first", env)
    written = entries(cache)
    assert written, "the first run wrote nothing into the cache"
    second = simulate(tmp_path / "second", env)
    assert second == first
    assert {path.name for path in entries(cache)} >= {path.name for path in written}
    # Nothing is written beside the run folders (the repository stays clean).
    assert {path.name for path in tmp_path.iterdir()} == {"cache", "first", "second"}


@pytest.mark.parametrize("how", ["default", "option", "environment"])
def test_the_default_folder_and_turning_it_off(how, tmp_path, monkeypatch):
    import os

    home = tmp_path / "home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    if how == "default":
        monkeypatch.delenv(CACHE_VARIABLE, raising=False)
        simulate(tmp_path / "run", dict(os.environ))
        assert entries(home / "jaxlayerx" / "xla")
        return
    if how == "option":
        monkeypatch.delenv(CACHE_VARIABLE, raising=False)
        simulate(tmp_path / "run", dict(os.environ), "--no-compile-cache")
    else:
        monkeypatch.setenv(CACHE_VARIABLE, "off")
        simulate(tmp_path / "run", dict(os.environ))
    assert entries(home / "jaxlayerx") == []
