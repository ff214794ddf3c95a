"""The Python examples of the README and the docs pages run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (f"{page.relative_to(ROOT)}[python block {index}]", block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))
]
#: Pages whose blocks run whole simulations: in the slow tier.
SLOW_PAGES = ("docs/research.md",)


def test_readme_has_examples():
    assert sum(name.startswith("README.md") for name, _ in BLOCKS) >= 5


@pytest.mark.parametrize(
    "name, block",
    [pytest.param(*pair, marks=pytest.mark.slow) if pair[0].startswith(SLOW_PAGES) else pair for pair in BLOCKS],
    ids=[name for name, _ in BLOCKS],
)
def test_example_runs(name, block):
    exec(compile(block, name, "exec"), {"__name__": "readme"})
