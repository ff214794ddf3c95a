"""jaxlayerx: partial parameter exchange for federated learning over Flax parameter pytrees."""

from jaxlayerx.aggregation import FedAvgDynamicLayer, masked_fedavg
from jaxlayerx.base import (
    Config,
    Exchanger,
    FlatView,
    LayerSelectionFunction,
    MaskedSelectionFunction,
    NDArrays,
    PayloadKind,
    ScoreGenFunction,
    check_exchanger,
)
from jaxlayerx.coo import SparseLayer, merge_sparse_layers, pack_coo, read_coo, unpack_coo, write_coo
from jaxlayerx.errors import UnknownLayerError
from jaxlayerx.exchangers import (
    DynamicLayerExchanger,
    ExchangerBase,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    SparseCooParameterExchanger,
)
from jaxlayerx.merge import merge_payload
from jaxlayerx.packing import is_packed, pack_layers, payload_nbytes, to_numpy, unpack_layers
from jaxlayerx.payload import Entries, Payload
from jaxlayerx.quantize import QUANTIZE_MODES, Quantize
from jaxlayerx.scores import (
    SCORE_FUNCTIONS,
    largest_final_magnitude_scores,
    largest_increase_in_magnitude_scores,
    largest_magnitude_change_scores,
    smallest_final_magnitude_scores,
    smallest_increase_in_magnitude_scores,
    smallest_magnitude_change_scores,
)
from jaxlayerx.selection import (
    MEASURES,
    BudgetRule,
    LayerSelectionFunctionConstructor,
    PercentageRule,
    ThresholdRule,
    budget_mask,
    drift_norm,
    drift_norms,
    layer_nbytes,
    num_layers_to_exchange,
    percentage_mask,
    select_layers_by_percentage,
    select_layers_by_threshold,
    threshold_mask,
)
from jaxlayerx.sparse_aggregation import FedAvgSparseCooTensor
from jaxlayerx.sparse_selection import num_weights_to_exchange, score_threshold, sparse_masks
from jaxlayerx.state import ExchangeState
from jaxlayerx.tree import (
    DEFAULT_NNX_FILTER,
    as_flat_view,
    check_matching_layers,
    conform_layer,
    flatten,
    merge_layers,
    unflatten,
)

__version__ = "0.1.0"

__all__ = [
    "as_flat_view",
    "budget_mask",
    "BudgetRule",
    "check_exchanger",
    "check_matching_layers",
    "Config",
    "conform_layer",
    "DEFAULT_NNX_FILTER",
    "drift_norm",
    "drift_norms",
    "DynamicLayerExchanger",
    "Entries",
    "Exchanger",
    "ExchangerBase",
    "ExchangeState",
    "FedAvgDynamicLayer",
    "FedAvgSparseCooTensor",
    "FixedLayerExchanger",
    "flatten",
    "FlatView",
    "FullParameterExchanger",
    "is_packed",
    "largest_final_magnitude_scores",
    "largest_increase_in_magnitude_scores",
    "largest_magnitude_change_scores",
    "layer_nbytes",
    "LayerExchangerWithExclusions",
    "LayerSelectionFunction",
    "LayerSelectionFunctionConstructor",
    "masked_fedavg",
    "MaskedSelectionFunction",
    "MEASURES",
    "merge_layers",
    "merge_payload",
    "merge_sparse_layers",
    "NDArrays",
    "num_layers_to_exchange",
    "num_weights_to_exchange",
    "pack_coo",
    "pack_layers",
    "Payload",
    "payload_nbytes",
    "PayloadKind",
    "percentage_mask",
    "PercentageRule",
    "Quantize",
    "QUANTIZE_MODES",
    "read_coo",
    "SCORE_FUNCTIONS",
    "score_threshold",
    "ScoreGenFunction",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "smallest_final_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
    "smallest_magnitude_change_scores",
    "sparse_masks",
    "SparseCooParameterExchanger",
    "SparseLayer",
    "threshold_mask",
    "ThresholdRule",
    "to_numpy",
    "unflatten",
    "UnknownLayerError",
    "unpack_coo",
    "unpack_layers",
    "write_coo",
]
