"""Clients sharded across devices give the numbers one device gives (slow tier: each case
runs two processes with 1 and 4 host devices)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, load_digits_data, make_client_data
    x, y = load_digits_data()
    data = make_client_data(x[:600], y[:600], num_clients=8, beta=0.5, seed=3)
    spec = ExchangerSpec(sys.argv[1], exchange_percentage=0.5)
    simulation = Simulation(spec, SimulationConfig(rounds=2, local_steps=3, batch_size=8, seed=1), data)
    records, outputs = zip(*simulation.iterate())
    last = outputs[-1]
    name = simulation.layer_names[0]
    print(json.dumps({
        "devices": jax.device_count(),
        "client_axis_devices": len(last.trained_layers[name].sharding.device_set),
        "records": [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records],
        "global": {n: np.asarray(v).tolist() for n, v in last.state.global_layers.items()},
    }))
    """
)


def run_simulation_process(kind, devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    completed = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, kind], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["full", "dynamic-percentage", "sparse-largest-magnitude-change"])
def test_sharded_clients_give_the_same_numbers(kind):
    one = run_simulation_process(kind, devices=1)
    four = run_simulation_process(kind, devices=4)
    assert one["devices"] == 1 and one["client_axis_devices"] == 1
    assert four["devices"] == 4 and four["client_axis_devices"] == 4  # clients really are sharded
    # Integer results (bytes, layers sent) are identical; float results agree to float32
    # rounding: a device's dot products and sums may split their work differently.
    for sharded, single in zip(four["records"], one["records"], strict=True):
        assert sharded.keys() == single.keys()
        for key, value in single.items():
            if isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float)):
                np.testing.assert_allclose(sharded[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
            else:
                assert sharded[key] == value, key
    for name, value in one["global"].items():
        np.testing.assert_allclose(
            np.asarray(four["global"][name]), np.asarray(value), rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_uneven_client_count_uses_a_dividing_mesh():
    from jaxlayerx.simulation.round import _shardings

    sharding, replicated = _shardings(6)
    expected_devices = np.gcd(6, jax.device_count())
    if expected_devices <= 1:
        assert sharding is None and replicated is None
    else:
        assert len(sharding.device_set) == expected_devices
