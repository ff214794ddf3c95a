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

The legacy route lives in ``jaxlayerx.flower.legacy``; the Message-API strategies' names of
the previous release still import from ``jaxlayerx.flower.serverapp``, with a warning.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("flwr")

LEGACY_MODULES = ["jaxlayerx.flower.legacy", "jaxlayerx.flower.legacy.client", "jaxlayerx.flower.legacy.strategy"]

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


MESSAGE_API = [
    "jaxlayerx.protocol",
    "jaxlayerx.flower",
    "jaxlayerx.flower.clientapp",
    "jaxlayerx.flower.records",
    "jaxlayerx.flower.serverapp",
    "jaxlayerx.flower.history",
    "jaxlayerx.flower.checkpoint",
    "jaxlayerx.flower.user_functions",
]


def test_message_api_modules_import_no_deprecated_flower_path():
    outcome = run_imports(*MESSAGE_API)
    assert outcome["error"] is None, outcome["error"]
    assert outcome["legacy_imports"] == []
    assert outcome["deprecated_logs"] == []
    assert set(MESSAGE_API[1:]) <= set(outcome["loaded"])
    for module in LEGACY_MODULES:
        assert module not in outcome["loaded"], f"{module} was imported eagerly"


def test_the_check_sees_a_legacy_import():
    """The recorder is not blind: the legacy route does import the deprecated paths."""
    outcome = run_imports("jaxlayerx.flower.legacy.client", "jaxlayerx.flower.legacy.strategy")
    importers = {importer for importer, _, _ in outcome["legacy_imports"]}
    assert {"jaxlayerx.flower.legacy.client", "jaxlayerx.flower.legacy.strategy"} <= importers
    assert any(name == "flwr.client" for _, name, _ in outcome["legacy_imports"])
    assert any(name.startswith("flwr.server") for _, name, _ in outcome["legacy_imports"])


def test_legacy_names_stay_importable_from_the_package():
    import jaxlayerx.flower as flower
    from jaxlayerx.flower import (  # noqa: F401
        ExchangerClient,
        FedAvgDynamicLayerStrategy,
        FedAvgSparseCooTensorStrategy,
        NodeReply,
        RoundRecord,
        client_app,
        exchanger_client_app,
        legacy,
        stateful_client_fn,
    )
    from jaxlayerx.flower.history import RoundRecord as HistoryRoundRecord
    from jaxlayerx.flower.legacy.strategy import FedAvgDynamicLayerStrategy as Moved

    # the lazy names are the classes of the modules they moved to
    assert FedAvgDynamicLayerStrategy is Moved and RoundRecord is HistoryRoundRecord
    assert ExchangerClient is legacy.ExchangerClient and client_app is legacy.client_app

    assert set(flower.__all__) <= set(dir(flower))
    for name in flower.__all__:
        assert getattr(flower, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        flower.Nope  # noqa: B018


@pytest.mark.parametrize(
    ("old", "new"), [("FedAvgDynamicLayer", "FedAvgLayers"), ("FedAvgSparseCooTensor", "FedAvgSparse")]
)
def test_the_previous_strategy_names_import_with_a_deprecation_warning(old, new):
    import jaxlayerx.flower.serverapp as serverapp

    with pytest.warns(DeprecationWarning, match=re.escape(f"jaxlayerx.flower.serverapp.{old} is now {new}")):
        renamed = getattr(serverapp, old)
    assert renamed is getattr(serverapp, new)
    with pytest.warns(DeprecationWarning, match=old):
        exec(f"from jaxlayerx.flower.serverapp import {old}", {})  # the import statement warns too
    with pytest.raises(AttributeError, match="has no attribute 'FedAvgNope'"):
        serverapp.FedAvgNope  # noqa: B018


def test_the_new_names_import_without_a_warning():
    import warnings

    import jaxlayerx.flower as flower
    import jaxlayerx.flower.serverapp as serverapp

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flower.FedAvgLayers is serverapp.FedAvgLayers
        assert flower.FedAvgSparse is serverapp.FedAvgSparse
        assert issubclass(serverapp.FedAvgLayers, serverapp.ExchangeStrategy)
        assert issubclass(serverapp.FedAvgSparse, serverapp.ExchangeStrategy)


def test_version_mismatch_error_lives_in_the_protocol():
    import jaxlayerx.protocol
    from jaxlayerx.protocol import VersionMismatchError

    assert issubclass(VersionMismatchError, ValueError)
    assert "VersionMismatchError" in jaxlayerx.protocol.__all__
