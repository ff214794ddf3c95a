"""jaxlayerx: partial parameter exchange for federated learning over Flax parameter pytrees."""

from jaxlayerx.aggregation import FedAvgDynamicLayer, masked_fedavg
from jaxlayerx.coo import SparseLayer, merge_sparse_layers, pack_coo, read_coo, unpack_coo, write_coo
from jaxlayerx.errors import UnknownLayerError
from jaxlayerx.exchangers import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
    SparseCooParameterExchanger,
)
from jaxlayerx.packing import NDArrays, is_packed, pack_layers, payload_nbytes, to_numpy, unpack_layers
from jaxlayerx.scores import (
    SCORE_FUNCTIONS,
    ScoreGenFunction,
    largest_final_magnitude_scores,
    largest_increase_in_magnitude_scores,
    largest_magnitude_change_scores,
    smallest_final_magnitude_scores,
    smallest_increase_in_magnitude_scores,
    smallest_magnitude_change_scores,
)
from jaxlayerx.selection import (
    LayerSelectionFunction,
    LayerSelectionFunctionConstructor,
    check_matching_layers,
    drift_norm,
    drift_norms,
    num_layers_to_exchange,
    percentage_mask,
    select_layers_by_percentage,
    select_layers_by_threshold,
    threshold_mask,
)
from jaxlayerx.sparse_aggregation import FedAvgSparseCooTensor
from jaxlayerx.sparse_selection import num_weights_to_exchange, score_threshold, sparse_masks
from jaxlayerx.tree import DEFAULT_NNX_FILTER, conform_layer, flatten, merge_layers, unflatten

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_NNX_FILTER",
    "DynamicLayerExchanger",
    "FedAvgDynamicLayer",
    "FedAvgSparseCooTensor",
    "FixedLayerExchanger",
    "FullParameterExchanger",
    "LayerExchangerWithExclusions",
    "LayerSelectionFunction",
    "LayerSelectionFunctionConstructor",
    "NDArrays",
    "SCORE_FUNCTIONS",
    "ScoreGenFunction",
    "SparseCooParameterExchanger",
    "SparseLayer",
    "UnknownLayerError",
    "check_matching_layers",
    "conform_layer",
    "drift_norm",
    "drift_norms",
    "flatten",
    "is_packed",
    "largest_final_magnitude_scores",
    "largest_increase_in_magnitude_scores",
    "largest_magnitude_change_scores",
    "masked_fedavg",
    "merge_layers",
    "merge_sparse_layers",
    "num_layers_to_exchange",
    "num_weights_to_exchange",
    "pack_coo",
    "pack_layers",
    "payload_nbytes",
    "percentage_mask",
    "read_coo",
    "score_threshold",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "smallest_final_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
    "smallest_magnitude_change_scores",
    "sparse_masks",
    "threshold_mask",
    "to_numpy",
    "unflatten",
    "unpack_coo",
    "unpack_layers",
    "write_coo",
]
