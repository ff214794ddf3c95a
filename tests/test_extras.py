"""The core and the simulation import without the demo extras; using them says what to install."""

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys

    class BlockExtras:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("sklearn", "matplotlib", "tqdm"):
                raise ImportError(f"{name} is not installed")

    sys.meta_path.insert(0, BlockExtras())
    import jaxlayerx, jaxlayerx.simulation
    from jaxlayerx.simulation.cli import main
    sys.exit(main(["simulate", "--rounds", "1", "--clients", "2", "--no-progress"]))
    """
)


def test_core_imports_without_demo_extras_and_the_cli_says_what_to_install():
    completed = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "pip install 'jaxlayerx[demo]'" in completed.stderr


FLOWER_SCRIPT = textwrap.dedent(
    """
    import sys

    class BlockFlower:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "flwr":
                raise ImportError(f"{name} is not installed")

    sys.meta_path.insert(0, BlockFlower())
    import jaxlayerx, jaxlayerx.simulation
    assert not any(name.split(".")[0] == "flwr" for name in sys.modules), "the core imported Flower"
    try:
        import jaxlayerx.flower
    except ImportError as error:
        print(error)
        sys.exit(3)
    """
)


def test_core_never_imports_flower_and_the_adapters_say_what_to_install():
    completed = subprocess.run(
        [sys.executable, "-c", FLOWER_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 3, completed.stderr
    assert "pip install 'jaxlayerx[flower]'" in completed.stdout
