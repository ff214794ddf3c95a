"""jaxlayerx: partial parameter exchange for federated learning over Flax parameter pytrees."""

from jaxlayerx.aggregation import FedAvgDynamicLayer, masked_fedavg
from jaxlayerx.errors import UnknownLayerError
from jaxlayerx.exchangers import (
    DynamicLayerExchanger,
    FixedLayerExchanger,
    FullParameterExchanger,
    LayerExchangerWithExclusions,
)
from jaxlayerx.packing import NDArrays, is_packed, pack_layers, payload_nbytes, to_numpy, unpack_layers
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
from jaxlayerx.tree import DEFAULT_NNX_FILTER, conform_layer, flatten, merge_layers, unflatten

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_NNX_FILTER",
    "DynamicLayerExchanger",
    "FedAvgDynamicLayer",
    "FixedLayerExchanger",
    "FullParameterExchanger",
    "LayerExchangerWithExclusions",
    "LayerSelectionFunction",
    "LayerSelectionFunctionConstructor",
    "NDArrays",
    "UnknownLayerError",
    "check_matching_layers",
    "conform_layer",
    "drift_norm",
    "drift_norms",
    "flatten",
    "is_packed",
    "masked_fedavg",
    "merge_layers",
    "num_layers_to_exchange",
    "pack_layers",
    "payload_nbytes",
    "percentage_mask",
    "select_layers_by_percentage",
    "select_layers_by_threshold",
    "threshold_mask",
    "to_numpy",
    "unflatten",
    "unpack_layers",
]
