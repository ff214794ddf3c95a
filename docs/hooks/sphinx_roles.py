"""MkDocs hook: renders the Sphinx roles of the docstrings (``:class:`X` ``) as links.

The docstrings name other objects with Sphinx roles (``:class:``, ``:func:``, ``:mod:``,
...), which the Google-style Markdown rendering would show literally. This hook turns each
into an optional cross-reference: a link when the object has a heading in the API
reference (full names, or short names that one heading on the page ends with), plain code
otherwise. It changes the rendered HTML only, never the docstrings.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>~?([\w.]+)</code>")
_HEADING_ID = re.compile(r'<h[1-6] id="(jaxlayerx[\w.]*)"')


def on_page_content(html, page, config, files):  # noqa: ARG001 - MkDocs hook signature
    if ":<code>" not in html:
        return html
    anchors = set(_HEADING_ID.findall(html))
    by_short_name: dict[str, set[str]] = {}
    for anchor in anchors:
        by_short_name.setdefault(anchor.rsplit(".", 1)[-1], set()).add(anchor)

    def link(match: re.Match) -> str:
        name = match.group(1)
        target = name if name in anchors else None
        if target is None and name.startswith("jaxlayerx."):
            # jaxlayerx.exchangers.X is rendered as jaxlayerx.X
            candidates = {a for a in by_short_name.get(name.rsplit(".", 1)[-1], set())}
            target = next(iter(candidates)) if len(candidates) == 1 else None
        if target is None and "." not in name:
            candidates = by_short_name.get(name, set())
            target = next(iter(candidates)) if len(candidates) == 1 else None
        code = f"<code>{name}</code>"
        if target is None:
            return code
        return f'<autoref identifier="{target}" optional>{code}</autoref>'

    return _ROLE.sub(link, html)
