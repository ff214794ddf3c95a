"""Exchanger specs as text: every label reads back to the spec it came from, what a label
leaves out comes from the defaults, and a malformed spec is one line naming the grammar
and the closest kind."""

from __future__ import annotations

import itertools

import pytest

from jaxlayerx.simulation import EXCHANGER_KINDS, ExchangerSpec
from jaxlayerx.simulation.spec_grammar import split_specs

#: The fields that decide what an exchanger does, by kind (layers: the fixed kind's, which
#: labels do not carry).
NUMBER = {
    "dynamic-threshold": "norm_threshold",
    "dynamic-percentage": "exchange_percentage",
    "dynamic-budget": "byte_fraction",
}
MEASURES = ["l2/size", "l2", "rms", "relative"]


def all_specs():
    """Every kind with every option its label can carry."""
    for kind in EXCHANGER_KINDS:
        quantizes = [None, "bf16", "int8"]
        adaptive = kind.startswith(("dynamic-", "sparse-"))
        for quantize, feedback in itertools.product(quantizes, [False, True]):
            if feedback and not adaptive and quantize is None:
                continue  # refused: error feedback means nothing there
            base = {"kind": kind, "quantize": quantize, "error_feedback": feedback}
            if kind in ("dynamic-threshold", "dynamic-percentage"):
                for value, measure, more in itertools.product([0.3, 1e-4, 0.123456789], MEASURES, [True, False]):
                    if kind == "dynamic-percentage" and value > 1:
                        continue
                    yield ExchangerSpec(**base, **{NUMBER[kind]: value}, measure=measure, select_drift_more=more)
            elif kind == "dynamic-budget":
                for value in [0.25, 1.0, 0.123456789]:
                    yield ExchangerSpec(**base, byte_fraction=value)
            elif kind.startswith("sparse-"):
                for value in [0.05, 1e-9, 1.0, 1 / 3]:
                    yield ExchangerSpec(**base, sparsity_level=value)
            else:
                yield ExchangerSpec(**base)


def behaviour(spec):
    """What the exchanger a spec builds depends on, written out by kind."""
    fields = {"kind": spec.kind, "quantize": spec.quantize, "error_feedback": spec.error_feedback}
    if spec.kind in NUMBER:
        fields[NUMBER[spec.kind]] = getattr(spec, NUMBER[spec.kind])
    if spec.kind in ("dynamic-threshold", "dynamic-percentage"):
        measure = spec.measure or ("l2/size" if spec.normalize else "l2")
        fields.update(measure=measure, more=spec.select_drift_more)
    if spec.kind.startswith("sparse-"):
        fields["sparsity_level"] = spec.sparsity_level
    return fields


SPECS = list(all_specs())


def test_the_grid_covers_every_kind_and_option():
    assert {spec.kind for spec in SPECS} == set(EXCHANGER_KINDS)
    assert {spec.quantize for spec in SPECS} == {None, "bf16", "int8"}
    assert len(SPECS) > 300


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.label)
def test_every_label_reads_back_to_its_spec(spec):
    parsed = ExchangerSpec.parse(spec.label)
    assert parsed.label == spec.label
    assert behaviour(parsed) == behaviour(spec)


@pytest.mark.parametrize(
    "text, fields",
    [
        ("full", {"kind": "full"}),
        ("dynamic-budget(0.25, ef)", {"kind": "dynamic-budget", "byte_fraction": 0.25, "error_feedback": True}),
        (
            "dynamic-percentage(0.5, rms, ef)",
            {"kind": "dynamic-percentage", "exchange_percentage": 0.5, "measure": "rms", "error_feedback": True},
        ),
        (
            "sparse-largest-magnitude-change(0.05, ef, int8)",
            {
                "kind": "sparse-largest-magnitude-change",
                "sparsity_level": 0.05,
                "error_feedback": True,
                "quantize": "int8",
            },
        ),
        (
            "dynamic-threshold(0.0001, l2/size)",
            {"kind": "dynamic-threshold", "norm_threshold": 1e-4, "measure": "l2/size"},
        ),
        (" dynamic-percentage ( 0.3 , less , l2 ) ", {"exchange_percentage": 0.3, "select_drift_more": False}),
        ("full(int8, ef)", {"kind": "full", "quantize": "int8", "error_feedback": True}),
    ],
)
def test_written_specs(text, fields):
    spec = ExchangerSpec.parse(text)
    for name, value in fields.items():
        assert getattr(spec, name) == value, name


def test_what_a_spec_leaves_out_comes_from_the_defaults():
    defaults = {"sparsity_level": 0.02, "exchange_percentage": 0.7, "measure": "rms", "quantize": "bf16"}
    assert ExchangerSpec.parse("sparse-largest-magnitude-change", defaults).label == (
        "sparse-largest-magnitude-change(0.02, bf16)"
    )
    assert ExchangerSpec.parse("dynamic-percentage(0.4)", defaults).label == "dynamic-percentage(0.4, rms, bf16)"
    assert (
        ExchangerSpec.parse("dynamic-percentage(0.4, l2, int8)", defaults).label == "dynamic-percentage(0.4, l2, int8)"
    )
    # error feedback from the defaults applies where it means something, and nowhere else
    feedback = {"error_feedback": True}
    assert ExchangerSpec.parse("dynamic-budget(0.5)", feedback).error_feedback
    assert not ExchangerSpec.parse("full", feedback).error_feedback
    assert ExchangerSpec.parse("full", {**feedback, "quantize": "int8"}).label == "full(ef, int8)"


@pytest.mark.parametrize(
    "text, why, closest",
    [
        ("dynamc-budget(0.5)", "unknown kind 'dynamc-budget'", "dynamic-budget"),
        ("dynamic-budget(ef, 0.5)", "the number 0.5 must come first", "dynamic-budget"),
        ("full(0.5)", "full takes no number", "full"),
        ("dynamic-budget(0.5, efx)", "unknown word 'efx'", "dynamic-budget"),
        ("dynamic-budget()", "empty parentheses", "dynamic-budget"),
        ("dynamic-budget(0.5,, ef)", "an empty argument", "dynamic-budget"),
        ("sparse-largest-magnitude-change(0.05", "it is not KIND or KIND(...)", "sparse-largest-magnitude-change"),
    ],
)
def test_a_malformed_spec_is_one_line_with_the_grammar_and_the_closest_kind(text, why, closest):
    with pytest.raises(ValueError) as caught:
        ExchangerSpec.parse(text)
    message = str(caught.value)
    assert "\n" not in message
    assert why in message and "expected KIND or KIND(NUMBER, WORD, ...)" in message
    assert message.endswith(f"closest kind: {closest}")


def test_values_out_of_range_are_refused_by_the_spec():
    with pytest.raises(ValueError, match=r"byte_fraction must be in \(0, 1\]"):
        ExchangerSpec.parse("dynamic-budget(2)")
    with pytest.raises(ValueError, match="error feedback needs a dynamic or sparse exchanger"):
        ExchangerSpec.parse("full(ef)")


@pytest.mark.parametrize(
    "text, parts",
    [
        ("full", ["full"]),
        (
            "full,dynamic-budget(0.25, ef),dynamic-budget(0.5, ef)",
            ["full", "dynamic-budget(0.25, ef)", "dynamic-budget(0.5, ef)"],
        ),
        (
            " full , ,sparse-largest-magnitude-change(0.05, ef, int8) ",
            ["full", "sparse-largest-magnitude-change(0.05, ef, int8)"],
        ),
    ],
)
def test_split_specs_cuts_outside_parentheses(text, parts):
    assert split_specs(text) == parts


@pytest.mark.parametrize("text", ["full)", "dynamic-budget((0.5)", "a(b,c"])
def test_split_specs_refuses_unbalanced_parentheses(text):
    with pytest.raises(ValueError, match="unbalanced parentheses"):
        split_specs(text)
