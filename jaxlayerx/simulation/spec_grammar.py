"""Exchanger specs as text: the labels tables print, read back.

A spec is ``kind`` or ``kind(arg, ...)``: the kind's number first where it has one, then
words in any order::

    full | fixed | exclude-bn                 (ef, int8)
    dynamic-threshold(THRESHOLD, MEASURE, less, ef, bf16)
    dynamic-percentage(FRACTION, MEASURE, less, ef, int8)
    dynamic-budget(FRACTION, ef, int8)
    sparse-<score>(LEVEL, ef, int8)

``MEASURE`` is one of ``l2/size``, ``l2``, ``rms``, ``relative``; ``less`` sends the
layers that drifted least; ``ef`` is error feedback; ``bf16`` and ``int8`` quantize
uploads. What a spec leaves out keeps the value of ``defaults`` (the command line's global
options). Every :attr:`ExchangerSpec.label` reads back to the same spec.
"""

from __future__ import annotations

import re

from jaxlayerx.errors import closest_names
from jaxlayerx.quantize import QUANTIZE_MODES
from jaxlayerx.selection import MEASURES

#: The grammar, in one line, for error messages.
GRAMMAR = (
    "KIND or KIND(NUMBER, WORD, ...) with words among ef, less, a measure (l2/size, l2, rms, relative), bf16, int8"
)

#: The field each kind's number sets.
NUMBER_FIELDS = {
    "dynamic-threshold": "norm_threshold",
    "dynamic-percentage": "exchange_percentage",
    "dynamic-budget": "byte_fraction",
}

_SPEC = re.compile(r"^\s*([a-z0-9-]+)\s*(?:\((.*)\))?\s*$")


def split_specs(text: str) -> list[str]:
    """``text`` cut at the commas outside parentheses: ``"full,dynamic-budget(0.5, ef)"``
    gives ``["full", "dynamic-budget(0.5, ef)"]``.

    Raises:
      ValueError: unbalanced parentheses.
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in exchangers {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced parentheses in exchangers {text!r}")
    parts.append("".join(current).strip())
    return [part for part in parts if part]


def parse_fields(text: str, kinds: tuple[str, ...]) -> dict[str, object]:
    """The :class:`ExchangerSpec` fields a spec's text sets.

    Raises:
      ValueError: a malformed spec, in one line, with the grammar and the closest kind.
    """
    match = _SPEC.match(text)
    if match is None:
        raise _malformed(text, "it is not KIND or KIND(...)", kinds)
    kind, arguments = match.group(1), match.group(2)
    if kind not in kinds:
        raise _malformed(text, f"unknown kind {kind!r} (kinds: {', '.join(kinds)})", kinds)
    fields: dict[str, object] = {"kind": kind}
    words = [] if arguments is None else [word.strip() for word in arguments.split(",")]
    if arguments is not None and not any(words):
        raise _malformed(text, "empty parentheses", kinds)
    for position, word in enumerate(words):
        if not word:
            raise _malformed(text, "an empty argument", kinds)
        if _is_number(word):
            if position != 0:
                raise _malformed(text, f"the number {word} must come first", kinds)
            field = number_field(kind)
            if field is None:
                raise _malformed(text, f"{kind} takes no number", kinds)
            fields[field] = float(word)
        elif word == "ef":
            fields["error_feedback"] = True
        elif word == "less":
            fields["select_drift_more"] = False
        elif word in MEASURES:
            fields["measure"] = word
        elif word in QUANTIZE_MODES:
            fields["quantize"] = word
        else:
            raise _malformed(text, f"unknown word {word!r}", kinds)
    return fields


def number_field(kind: str) -> str | None:
    """The field a kind's number sets (``byte_fraction``...), ``None`` for a kind without one."""
    if kind.startswith("sparse-"):
        return "sparsity_level"
    return NUMBER_FIELDS.get(kind)


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _malformed(text: str, why: str, kinds: tuple[str, ...]) -> ValueError:
    kind = text.split("(", 1)[0].strip()
    closest = closest_names(kind, kinds, n=1)
    hint = f"; closest kind: {closest[0]}" if closest else ""
    return ValueError(f"bad exchanger {text!r}: {why}; expected {GRAMMAR}{hint}")
