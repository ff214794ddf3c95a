"""Which exchanger a simulation runs, chosen by name, and the layers it exchanges."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import flax.linen as nn

from jaxlayerx.errors import unknown_layer
from jaxlayerx.exchangers import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    SparseCooParameterExchanger,
)
from jaxlayerx.scores import SCORE_FUNCTIONS, ScoreGenFunction
from jaxlayerx.selection import LayerSelectionFunctionConstructor, validate_exchange_percentage, validate_norm_threshold
from jaxlayerx.sparse_selection import validate_sparsity_level
from jaxlayerx.tree import flatten

#: Sparse COO exchange, one kind per score function: ``sparse-largest-magnitude-change``...
SPARSE_KINDS = tuple(f"sparse-{score}" for score in SCORE_FUNCTIONS)
EXCHANGER_KINDS = ("full", "fixed", "exclude-bn", "dynamic-threshold", "dynamic-percentage", *SPARSE_KINDS)

#: For the default MLP: every layer but the classification head (FedPer-style).
DEFAULT_FIXED_LAYERS = ("*/Dense_0/*", "*/BatchNorm_0/*", "*/Dense_1/*")


@dataclasses.dataclass(frozen=True)
class ExchangerSpec:
    """An exchanger by name, with its parameters.

    Attributes:
      kind: one of ``full``, ``fixed``, ``exclude-bn``, ``dynamic-threshold``,
        ``dynamic-percentage``, or ``sparse-<score>`` for a score of
        :data:`jaxlayerx.SCORE_FUNCTIONS` (``sparse-largest-magnitude-change``...).
      layers: for ``fixed``: layer names or ``fnmatch`` globs (``*/Dense_0/*``).
      norm_threshold, exchange_percentage, normalize, select_drift_more: the drift rule of
        the dynamic kinds (see :class:`jaxlayerx.LayerSelectionFunctionConstructor`).
      sparsity_level: for the sparse kinds, the fraction of all weights sent (see
        :class:`jaxlayerx.SparseCooParameterExchanger`).
    """

    kind: str = "full"
    layers: tuple[str, ...] = DEFAULT_FIXED_LAYERS
    norm_threshold: float = 1e-4
    exchange_percentage: float = 0.5
    normalize: bool = True
    select_drift_more: bool = True
    sparsity_level: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in EXCHANGER_KINDS:
            raise ValueError(f"unknown exchanger {self.kind!r}; choose from {', '.join(EXCHANGER_KINDS)}")
        validate_norm_threshold(self.norm_threshold)
        validate_exchange_percentage(self.exchange_percentage)
        validate_sparsity_level(self.sparsity_level)
        if self.kind == "fixed" and not self.layers:
            raise ValueError("the fixed exchanger needs at least one layer name or glob")

    @property
    def dynamic(self) -> bool:
        """Whether the layers sent are chosen each round (packed with their names)."""
        return self.kind.startswith("dynamic")

    @property
    def sparse(self) -> bool:
        """Whether single weights are sent, in COO form."""
        return self.kind in SPARSE_KINDS

    @property
    def score_function(self) -> ScoreGenFunction:
        """The score function of a sparse kind."""
        return SCORE_FUNCTIONS[self.kind.removeprefix("sparse-")]

    def make_exchanger(self, module: nn.Module, variables: Any, *example_args: Any) -> Any:
        """The core exchanger this spec names, for ``module`` and its ``variables``."""
        if self.kind == "full":
            return FullParameterExchanger()
        if self.kind == "fixed":
            return FixedLayerExchanger(match_layers(self.layers, flatten(variables)))
        if self.kind == "exclude-bn":
            return LayerExchangerWithExclusions(module, {nn.BatchNorm}, *example_args)
        if self.sparse:
            return SparseCooParameterExchanger(self.sparsity_level, self.score_function)
        rules = LayerSelectionFunctionConstructor(
            self.norm_threshold, self.exchange_percentage, self.normalize, self.select_drift_more
        )
        select = rules.select_by_threshold() if self.kind == "dynamic-threshold" else rules.select_by_percentage()
        return DynamicLayerExchanger(select)

    def static_layers(self, exchanger: Any, variables: Any) -> list[str] | None:
        """The layers every client exchanges every round, or ``None`` for dynamic and sparse kinds."""
        if isinstance(exchanger, FullParameterExchanger):
            return list(flatten(variables))
        if isinstance(exchanger, FixedLayerExchanger):
            return list(exchanger.layers_to_transfer)
        if isinstance(exchanger, LayerExchangerWithExclusions):
            return exchanger.get_layers_to_transfer(variables)
        return None


def match_layers(patterns: tuple[str, ...] | list[str], names: Any) -> list[str]:
    """Layer names matching any of ``patterns`` (exact names or globs), in flatten order.

    Raises:
      KeyError: a pattern matches no layer (lists the closest names).
    """
    names = list(names)
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise unknown_layer(pattern, names)
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
