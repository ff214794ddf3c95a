"""The package's layout holds: the core imports neither Flower nor the simulation, the
Message-API modules never import the legacy route, and no Flower class reuses a name of
the core for something else."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import pkgutil

import pytest

import jaxlayerx

PACKAGE = pathlib.Path(jaxlayerx.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a source file imports, read off its syntax tree (lazy imports included)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    if "importlib" in found:  # names given to importlib.import_module as string constants
        found.update(
            node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
        )
    return found


def module_files(subpackage: str | None = None) -> dict[str, pathlib.Path]:
    root = PACKAGE if subpackage is None else PACKAGE / subpackage
    files: dict[str, pathlib.Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def within(name: str, *packages: str) -> bool:
    """Whether module ``name`` is one of ``packages`` or inside one of them."""
    return any(name == package or name.startswith(package + ".") for package in packages)


#: The recipes are methods built on the simulation's hooks, not core.
CORE = {
    name: path
    for name, path in module_files().items()
    if not within(name, "jaxlayerx.flower", "jaxlayerx.simulation", "jaxlayerx.recipes")
}


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_never_imports_flower_or_the_simulation(module):
    imports = imported_modules(CORE[module])
    offending = sorted(name for name in imports if within(name, "jaxlayerx.flower", "jaxlayerx.simulation", "flwr"))
    assert offending == [], f"{module} imports {offending}"


MESSAGE_API = {
    name: path for name, path in module_files("flower").items() if not within(name, "jaxlayerx.flower.legacy")
}


@pytest.mark.parametrize("module", sorted(MESSAGE_API))
def test_the_message_api_modules_never_import_the_legacy_route(module):
    imports = imported_modules(MESSAGE_API[module])
    legacy = sorted(
        name
        for name in imports
        if within(
            name,
            "jaxlayerx.flower.legacy",
            "flwr.client",
            "flwr.server",
            "flwr.common",
            "flwr.compat",
            "flwr.simulation",
        )
    )
    if module == "jaxlayerx.flower":  # the package names the legacy modules, loaded only on first use
        legacy = [name for name in legacy if within(name, "jaxlayerx.flower.legacy")]
        assert all(
            within(name, "jaxlayerx.flower.legacy.client", "jaxlayerx.flower.legacy.strategy") for name in legacy
        )
        return
    assert legacy == [], f"{module} imports {legacy}"


def test_the_check_sees_an_import_it_is_given():
    """The reader above must be able to fail: it finds a planted import, lazy or not."""
    source = "def f():\n    from jaxlayerx.flower.legacy import client\n    import importlib\n"
    source += "    importlib.import_module('jaxlayerx.simulation.engine')\n"
    planted = PACKAGE.parent / "tests" / "_planted_module_for_test_layout.py"
    planted.write_text(source)
    try:
        found = imported_modules(planted)
    finally:
        planted.unlink()
    assert "jaxlayerx.flower.legacy" in found and "jaxlayerx.simulation.engine" in found


def flower_classes() -> dict[str, list[tuple[str, type]]]:
    pytest.importorskip("flwr")
    import jaxlayerx.flower

    by_name: dict[str, list[tuple[str, type]]] = {}
    modules = [jaxlayerx.flower] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(jaxlayerx.flower.__path__, prefix="jaxlayerx.flower.")
    ]
    for module in modules:
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__.startswith("jaxlayerx"):
                by_name.setdefault(name, []).append((module.__name__, value))
    for name in jaxlayerx.flower.__all__:
        value = getattr(jaxlayerx.flower, name)
        if inspect.isclass(value):
            by_name.setdefault(name, []).append(("jaxlayerx.flower", value))
    return by_name


def test_no_flower_class_reuses_a_core_name_for_something_else():
    classes = flower_classes()
    clashes = [
        (name, module)
        for name, found in classes.items()
        if name in jaxlayerx.__all__
        for module, value in found
        if value is not getattr(jaxlayerx, name)
    ]
    assert clashes == []


def test_the_renamed_strategies_are_not_the_core_aggregators():
    from jaxlayerx.flower import serverapp

    with pytest.warns(DeprecationWarning, match="is now FedAvgLayers"):
        old = serverapp.FedAvgDynamicLayer
    assert old is serverapp.FedAvgLayers and old is not jaxlayerx.FedAvgDynamicLayer


def test_the_message_api_names_come_first():
    import jaxlayerx.flower

    names = jaxlayerx.flower.__all__
    legacy = ("ExchangerClient", "FedAvgDynamicLayerStrategy", "FedAvgSparseCooTensorStrategy")
    assert max(names.index(n) for n in ("FedAvgLayers", "FedAvgSparse", "exchanger_client_app")) < min(
        names.index(n) for n in legacy
    )


def test_score_functions_and_their_keys_are_spelled_alike():
    for key, function in jaxlayerx.SCORE_FUNCTIONS.items():
        assert function.__name__ == key.replace("-", "_") + "_scores"
