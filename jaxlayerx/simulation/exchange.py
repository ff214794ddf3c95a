"""Which exchanger a simulation runs, chosen by name, with its parameters and its label."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax import nnx

from jaxlayerx.base import Exchanger, ScoreGenFunction
from jaxlayerx.errors import unknown_layer, unmatched_pattern
from jaxlayerx.exchangers import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    SparseCooParameterExchanger,
)
from jaxlayerx.quantize import check_quantize
from jaxlayerx.scores import SCORE_FUNCTIONS
from jaxlayerx.selection import (
    LayerSelectionFunctionConstructor,
    resolve_measure,
    validate_byte_fraction,
    validate_exchange_percentage,
    validate_norm_threshold,
)
from jaxlayerx.simulation.models import BODY_LAYERS
from jaxlayerx.simulation.spec_grammar import number_field, parse_fields
from jaxlayerx.sparse_selection import validate_sparsity_level
from jaxlayerx.tree import DEFAULT_NNX_FILTER, flatten

#: Sparse COO exchange, one kind per score function: ``sparse-largest-magnitude-change``...
SPARSE_KINDS = tuple(f"sparse-{score}" for score in SCORE_FUNCTIONS)
DYNAMIC_KINDS = ("dynamic-threshold", "dynamic-percentage", "dynamic-budget")
EXCHANGER_KINDS = ("full", "fixed", "exclude-bn", *DYNAMIC_KINDS, *SPARSE_KINDS)

#: For the default MLP: every layer but the classification head (FedPer-style).
DEFAULT_FIXED_LAYERS = BODY_LAYERS["mlp"]


@dataclasses.dataclass(frozen=True)
class ExchangerSpec:
    """An exchanger by name, with its parameters.

    Attributes:
      kind: one of ``full``, ``fixed``, ``exclude-bn``, ``dynamic-threshold``,
        ``dynamic-percentage``, ``dynamic-budget``, or ``sparse-<score>`` for a score of
        :data:`jaxlayerx.SCORE_FUNCTIONS` (``sparse-largest-magnitude-change``...).
      layers: for ``fixed``: layer names or ``fnmatch`` globs (``*/Dense_0/*``).
      norm_threshold, exchange_percentage, normalize, select_drift_more, measure: the drift
        rule of the dynamic kinds (see :class:`jaxlayerx.LayerSelectionFunctionConstructor`).
      byte_fraction: for ``dynamic-budget``, the share of the model's bytes a client may send.
      sparsity_level: for the sparse kinds, the fraction of all weights sent (see
        :class:`jaxlayerx.SparseCooParameterExchanger`).
      error_feedback: for the dynamic and sparse kinds, measure drift from the last values
        pulled (see :mod:`jaxlayerx.state`); with ``quantize``, for every kind, carry what
        quantization lost into the next round.
      quantize: ``None``, ``"bf16"`` or ``"int8"``: how uploads are coded (see
        :mod:`jaxlayerx.quantize`).
    """

    kind: str = "full"
    layers: tuple[str, ...] = DEFAULT_FIXED_LAYERS
    norm_threshold: float = 1e-4
    exchange_percentage: float = 0.5
    normalize: bool = True
    select_drift_more: bool = True
    sparsity_level: float = 0.1
    measure: str | None = None
    byte_fraction: float = 0.5
    error_feedback: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXCHANGER_KINDS:
            raise ValueError(f"unknown exchanger {self.kind!r}; choose from {', '.join(EXCHANGER_KINDS)}")
        validate_norm_threshold(self.norm_threshold)
        validate_exchange_percentage(self.exchange_percentage)
        validate_byte_fraction(self.byte_fraction)
        validate_sparsity_level(self.sparsity_level)
        resolve_measure(self.measure, self.normalize)
        if self.kind == "fixed" and not self.layers:
            raise ValueError("the fixed exchanger needs at least one layer name or glob")
        check_quantize(self.quantize)
        if self.error_feedback and not self.adaptive and self.quantize is None:
            raise ValueError(
                f"error feedback needs a dynamic or sparse exchanger, or quantization; {self.kind} always sends "
                "the same layers"
            )
        if self.kind == "dynamic-budget" and not self.select_drift_more:
            raise ValueError(
                "dynamic-budget sends the layers that moved most per byte; it has no select-drift-less form"
            )

    @classmethod
    def parse(cls, text: str, defaults: Mapping[str, Any] | None = None) -> ExchangerSpec:
        """The spec ``text`` names: a kind, or a label as tables print it
        (``dynamic-budget(0.25, ef, int8)``; grammar in :mod:`jaxlayerx.simulation.spec_grammar`).
        What the text leaves out takes its value from ``defaults`` (field name -> value; the
        command line's global options), else the class's default; ``error_feedback`` from
        ``defaults`` applies only where it means something (a dynamic or sparse kind, or
        quantization).

        Raises:
          ValueError: a malformed spec (one line: the grammar and the closest kind), or a
            value out of range.
        """
        parsed = parse_fields(text, EXCHANGER_KINDS)
        fields = {**(defaults or {}), "error_feedback": False, **parsed}
        if "error_feedback" not in parsed and (defaults or {}).get("error_feedback"):
            kind = str(parsed["kind"])
            adaptive = kind in DYNAMIC_KINDS or kind in SPARSE_KINDS
            fields["error_feedback"] = adaptive or fields.get("quantize") is not None
        return cls(**fields)  # pyright: ignore[reportArgumentType]

    @property
    def adaptive(self) -> bool:
        """Whether what is sent is chosen each round (the dynamic and sparse kinds)."""
        return self.kind in DYNAMIC_KINDS or self.kind in SPARSE_KINDS

    @property
    def swept_field(self) -> str | None:
        """The field of the kind's numeric parameter (``byte_fraction``...), which reaches the
        send mask as a traced argument; ``None`` for the kinds without one."""
        return number_field(self.kind)

    @property
    def program_key(self) -> ExchangerSpec:
        """This spec with its numeric parameter at the class default: specs of equal keys run
        one compiled round program (:func:`jaxlayerx.simulation.batch.run_together`)."""
        field = self.swept_field
        if field is None:
            return self
        return dataclasses.replace(self, **{field: _FIELD_DEFAULTS[field]})

    @property
    def score_function(self) -> ScoreGenFunction:
        """The score function of a sparse kind."""
        return SCORE_FUNCTIONS[self.kind.removeprefix("sparse-")]

    @property
    def label(self) -> str:
        """The kind with the parameters that matter for it: ``dynamic-budget(0.25, ef)``."""
        parameters = {
            "dynamic-threshold": [_number(self.norm_threshold), resolve_measure(self.measure, self.normalize)],
            "dynamic-percentage": [_number(self.exchange_percentage), resolve_measure(self.measure, self.normalize)],
            "dynamic-budget": [_number(self.byte_fraction)],
        }.get(self.kind, [_number(self.sparsity_level)] if self.kind in SPARSE_KINDS else [])
        if self.kind in ("dynamic-threshold", "dynamic-percentage") and not self.select_drift_more:
            parameters.append("less")
        if self.error_feedback:
            parameters.append("ef")
        if self.quantize is not None:
            parameters.append(self.quantize)
        return f"{self.kind}({', '.join(parameters)})" if parameters else self.kind

    def make_exchanger(
        self,
        module: nn.Module | nnx.Module,
        variables: Any,
        *example_args: Any,
        nnx_filter: nnx.filterlib.Filter = DEFAULT_NNX_FILTER,
    ) -> Exchanger:
        """The core exchanger this spec names, for ``module`` (Linen, traced on
        ``example_args``, or NNX) and its ``variables``, reading NNX variables through ``nnx_filter``."""
        options: dict[str, Any] = {"quantize": self.quantize, "nnx_filter": nnx_filter}
        if self.kind == "full":
            return FullParameterExchanger(error_feedback=self.error_feedback, **options)
        if self.kind == "fixed":
            layers = match_layers(self.layers, flatten(variables, nnx_filter=nnx_filter))
            return FixedLayerExchanger(layers, error_feedback=self.error_feedback, **options)
        if self.kind == "exclude-bn":
            excluded = {nnx.BatchNorm} if isinstance(module, nnx.Module) else {nn.BatchNorm}
            args = () if isinstance(module, nnx.Module) else example_args
            return LayerExchangerWithExclusions(module, excluded, *args, error_feedback=self.error_feedback, **options)
        if self.kind in SPARSE_KINDS:
            return SparseCooParameterExchanger(self.sparsity_level, self.score_function, self.error_feedback, **options)
        rules = LayerSelectionFunctionConstructor(
            self.norm_threshold, self.exchange_percentage, self.normalize, self.select_drift_more, measure=self.measure
        )
        select = {
            "dynamic-threshold": rules.select_by_threshold,
            "dynamic-percentage": rules.select_by_percentage,
            "dynamic-budget": lambda: rules.select_by_budget(self.byte_fraction),
        }[self.kind]()
        return DynamicLayerExchanger(select, self.error_feedback, **options)


_FIELD_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ExchangerSpec)}


def _number(value: float) -> str:
    """``value`` in a label: short (``%g``) where that reads back exactly, else in full."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def match_layers(patterns: tuple[str, ...] | list[str], names: Any) -> list[str]:
    """Layer names matching any of ``patterns`` (exact names or globs), in flatten order.

    Raises:
      KeyError: a glob matches no layer (lists the layers); a name is not a layer (lists
        the closest names).
    """
    names = list(names)
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            glob = any(char in pattern for char in "*?[")
            raise unmatched_pattern(pattern, names) if glob else unknown_layer(pattern, names)
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
