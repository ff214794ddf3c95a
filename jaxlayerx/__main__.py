"""``python -m jaxlayerx``: the same as the ``jaxlayerx`` command."""

import sys

from jaxlayerx.simulation.cli import main

sys.exit(main())
