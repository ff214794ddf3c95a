"""jaxlayerx's Message-API modules import no deprecated Flower path, and warn nothing.

Flower 1.42 deprecates imports from ``flwr.client``, ``flwr.server``, ``flwr.common`` (and
the legacy ``flwr.compat``/``flwr.simulation`` components) in favour of ``flwr.app``,
``flwr.clientapp`` and ``flwr.serverapp``. ``import flwr`` itself loads those legacy
modules, so "is it in ``sys.modules``" cannot tell; instead, in a fresh interpreter, Flower
and the third-party packages are imported first, then ``builtins.__import__`` records every
import statement executed by a ``jaxlayerx`` module while ``jaxlayerx.flower`` and its
Message-API modules load. Flower's deprecations are logged (``flwr`` logger, "DEPRECATED
FEATURE") rather than warned; both are captured. ``python -W error::DeprecationWarning``
cannot be used as such: with it ``import flwr`` fails on its own (typer imports a deprecated
``click.utils`` name), so the warning filter turns errors on after the baseline imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr")

FLOWER = Path(__file__).resolve().parents[1] / "jaxlayerx" / "flower"
LEGACY_MODULES = ["jaxlayerx.flower.client", "jaxlayerx.flower.strategy", "jaxlayerx.flower.sparse_strategy"]

SCRIPT = textwrap.dedent(
    """
    import builtins, json, logging, sys, warnings

    import flwr, flwr.app, flwr.clientapp, flwr.serverapp, flwr.serverapp.strategy  # the baseline
    import jax, flax, numpy, ml_dtypes

    messages = []
    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logging.getLogger("flwr").addHandler(Collect())

    LEGACY = ("flwr.client", "flwr.server", "flwr.common", "flwr.compat", "flwr.simulation")
    legacy_imports = []
    original = builtins.__import__
    def recording(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        if importer.startswith("jaxlayerx") and level == 0:
            targets = [name] + [name + "." + item for item in (fromlist or ())]
            if any(t == p or t.startswith(p + ".") for t in targets for p in LEGACY):
                legacy_imports.append([importer, name, list(fromlist or ())])
        return original(name, globals, locals, fromlist, level)
    builtins.__import__ = recording

    warnings.simplefilter("error", DeprecationWarning)
    warnings.simplefilter("error", PendingDeprecationWarning)
    error = None
    try:
        for module in sys.argv[1:]:
            __import__(module)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    builtins.__import__ = original
    print(json.dumps({
        "error": error,
        "legacy_imports": legacy_imports,
        "deprecated_logs": [m for m in messages if "DEPRECATED" in m],
        "loaded": sorted(m for m in sys.modules if m.startswith("jaxlayerx.flower")),
    }))
    """
)


def run_imports(*modules: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


MESSAGE_API = ["jaxlayerx.flower", "jaxlayerx.flower.clientapp", "jaxlayerx.flower.records"]
if (FLOWER / "serverapp.py").exists():  # written by another change; checked as soon as it exists
    MESSAGE_API.append("jaxlayerx.flower.serverapp")


def test_message_api_modules_import_no_deprecated_flower_path():
    outcome = run_imports(*MESSAGE_API)
    assert outcome["error"] is None, outcome["error"]
    assert outcome["legacy_imports"] == []
    assert outcome["deprecated_logs"] == []
    for module in LEGACY_MODULES:
        assert module not in outcome["loaded"], f"{module} was imported eagerly"


def test_the_check_sees_a_legacy_import():
    """The recorder is not blind: the legacy route does import the deprecated paths."""
    outcome = run_imports("jaxlayerx.flower.client")
    importers = {importer for importer, _, _ in outcome["legacy_imports"]}
    assert "jaxlayerx.flower.client" in importers
    assert any(name == "flwr.client" for _, name, _ in outcome["legacy_imports"])


def test_legacy_names_stay_importable_from_the_package():
    import jaxlayerx.flower as flower
    from jaxlayerx.flower import (  # noqa: F401
        ClientRecord,
        ExchangerClient,
        FedAvgDynamicLayerStrategy,
        FedAvgSparseCooTensorStrategy,
        RoundRecord,
        client_app,
        exchanger_client_app,
        stateful_client_fn,
    )

    assert set(flower.__all__) <= set(dir(flower))
    for name in flower.__all__:
        assert getattr(flower, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        flower.Nope  # noqa: B018
