"""Models and independent reference helpers shared by the tests (no jaxlayerx code).

Test files import them by name (``from conftest import LinenNet, ref_flat``); pytest puts
this folder on the path.
"""

from __future__ import annotations

import functools
import io
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import settings

#: The test tiers, by file: every file not listed here is in the fast tier, the default run
#: (`python -m pytest -q`), except the tests marked one by one (``@pytest.mark.slow``, or a
#: parametrized case wrapped in :func:`slow`: whole simulations beyond one per behaviour).
#: The others run with `-m slow`, `-m deploy`, `-m quality` (or all with `-m ""`); .ci/run
#: runs them all.
TIERS = {
    "test_quality.py": "quality",
    "test_flower_deploy.py": "deploy",
    "test_flower_e2e.py": "deploy",
    "test_cli_runs.py": "slow",
    "test_cli_scenarios.py": "slow",
    "test_twin.py": "slow",
    "test_sim_cache.py": "slow",
    "test_benchmarks.py": "slow",
    "test_examples.py": "slow",
    "test_checks.py": "slow",
    "test_versus_flower.py": "slow",
    "test_sharding.py": "slow",
}


#: Hypothesis profiles: the property tests (marked ``hypothesis``) draw ``fast``'s examples in
#: a plain run; ``--hypothesis-profile=thorough`` draws more, as .ci/run does. Many examples
#: compile a new program each (their shapes differ), so the count is the tests' main cost.
settings.register_profile("fast", max_examples=5, deadline=None)
settings.register_profile("thorough", max_examples=100, deadline=None)
settings.load_profile("fast")


def pytest_configure(config: Any) -> None:
    """JAX's persistent compilation cache in a folder of this session, so that a program
    compiled by one test (the same shapes, the same computation) loads in the next. The
    command-line tests' own runs keep it off (:func:`no_compile_cache`)."""
    import tempfile

    import jax

    if not jax.config.jax_compilation_cache_dir:
        folder = tempfile.mkdtemp(prefix="jaxlayerx-tests-xla-")
        config.add_cleanup(functools.partial(shutil.rmtree, folder, ignore_errors=True))
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def slow(*values: Any) -> Any:
    """One case of a parametrized test, in the slow tier: the fast tier keeps one case per
    behaviour, and the others run with ``-m slow``."""
    return pytest.param(*values, marks=pytest.mark.slow)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Marks each test with the tier of its file (:data:`TIERS`)."""
    for item in items:
        tier = TIERS.get(item.path.name)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


def ref_name(path: tuple[Any, ...], sep: str = "/") -> str:
    """A ``jax.tree_util`` key path joined by ``sep``: the expected layer name."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            raise AssertionError(f"unexpected key type in a test tree: {key!r}")
    return sep.join(parts)


def ref_flat(model: Any) -> dict[str, np.ndarray]:
    """``name -> numpy copy`` of every array leaf, in JAX tree order (NNX: of ``nnx.state``)."""
    tree = nnx.state(model) if isinstance(model, nnx.Module) else model
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        name = ref_name(path)
        assert name not in out
        out[name] = np.array(leaf, copy=True)
    return out


def bits(array: Any) -> np.ndarray:
    """The raw bytes of ``array`` as uint8, for bit-exact comparisons (NaN-safe, -0.0-aware)."""
    return np.ascontiguousarray(np.asarray(array)).view(np.uint8)


class LinenNet(nn.Module):
    """Dense(3) -> BatchNorm -> Dense(2): ``params`` and ``batch_stats``."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dense(3)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


#: ``LinenNet``'s layers and their shapes, written by hand in JAX's sorted-dict-key order.
LINEN_SHAPES = {
    "batch_stats/BatchNorm_0/mean": (3,),
    "batch_stats/BatchNorm_0/var": (3,),
    "params/BatchNorm_0/bias": (3,),
    "params/BatchNorm_0/scale": (3,),
    "params/Dense_0/bias": (3,),
    "params/Dense_0/kernel": (4, 3),
    "params/Dense_1/bias": (2,),
    "params/Dense_1/kernel": (3, 2),
}


class NnxDigitsNet(nnx.Module):
    """An NNX MLP for 64 digit features: Linear, BatchNorm, Linear (the simulation tests' NNX model)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear1 = nnx.Linear(64, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.linear2(nnx.relu(self.bn(self.linear1(x))))


#: NnxDigitsNet's layers in flatten order, written by hand: all of them, and its Params.
NNX_DIGITS_LAYERS = [
    "bn/bias",
    "bn/mean",
    "bn/scale",
    "bn/var",
    "linear1/bias",
    "linear1/kernel",
    "linear2/bias",
    "linear2/kernel",
]
NNX_DIGITS_PARAMS = ["bn/bias", "bn/scale", "linear1/bias", "linear1/kernel", "linear2/bias", "linear2/kernel"]


def fake_proxy_class() -> type:
    """A Flower ``ClientProxy`` that is never called: tests drive a strategy directly."""
    from flwr.server.client_proxy import ClientProxy

    class FakeProxy(ClientProxy):
        def get_properties(self, ins, timeout, group_id):
            raise NotImplementedError

        def get_parameters(self, ins, timeout, group_id):
            raise NotImplementedError

        def fit(self, ins, timeout, group_id):
            raise NotImplementedError

        def evaluate(self, ins, timeout, group_id):
            raise NotImplementedError

        def reconnect(self, ins, timeout, group_id):
            raise NotImplementedError

    return FakeProxy


def fake_proxy(cid: str) -> Any:
    return fake_proxy_class()(cid)


@functools.cache
def fake_grid_class() -> type:
    """A Flower Message-API ``Grid`` whose nodes are functions ``(message) -> RecordDict``.

    ``FakeGrid(nodes)``: ``nodes`` maps node ids to the functions; ``available`` is what
    ``get_node_ids`` reports; ``sent`` keeps every message. ``send_and_receive`` calls the
    nodes in id order and turns an exception into an error reply, as Flower does.
    ``push_messages`` gives each message an id, as Flower's grids do, and runs
    ``send_and_receive`` (so that a test overriding it sees every message);
    ``pull_messages`` hands over the replies to the ids asked for.
    """
    from flwr.app import Error, Message
    from flwr.serverapp import Grid

    class FakeGrid(Grid):
        def __init__(self, nodes):
            self.nodes = nodes
            self.available = list(nodes)
            self.sent = []

        def set_run(self, run):
            pass

        @property
        def run(self):
            raise NotImplementedError

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            raise NotImplementedError

        def get_node_ids(self):
            return list(self.available)

        def push_messages(self, messages):
            messages = list(messages)
            for message in messages:
                if not message.metadata.message_id:
                    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.replies = [*getattr(self, "replies", []), *self.send_and_receive(messages)]
            return [message.metadata.message_id for message in messages]

        def pull_messages(self, message_ids):
            wanted = set(message_ids)
            pulled = [reply for reply in self.replies if reply.metadata.reply_to_message_id in wanted]
            self.replies = [reply for reply in self.replies if reply.metadata.reply_to_message_id not in wanted]
            return pulled

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
                self.sent.append(message)
                try:
                    content = self.nodes[message.metadata.dst_node_id](message)
                except Exception as error:  # noqa: BLE001 - a ClientApp exception becomes an error reply
                    replies.append(Message(Error(code=1, reason=str(error)), reply_to=message))
                else:
                    replies.append(Message(content, reply_to=message))
            return replies

    return FakeGrid


def flower_metadata(message_type: str = "train", src_node_id: int = 0, dst_node_id: int = 7) -> Any:
    """The ``Metadata`` of a hand-built Flower ``Message`` (run 1, group "1", an hour's ttl)."""
    from flwr.app import Metadata

    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )


def nest(flat: Mapping[str, Any], array: Callable[[Any], Any] = jnp.asarray) -> dict[str, Any]:
    """The nested dict whose layers are ``flat`` (``a/b/c -> {"a": {"b": {"c": ...}}}``),
    each value passed through ``array`` (JAX arrays by default; ``np.array`` for copies)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array(value)
    return tree


# --- the compact wire, read and written independently (docs/wire-formats.md) -------------


class RefLayer(NamedTuple):
    """One layer of a compact payload, as the tests write and read it.

    ``flat``: the sent entries' row-major flat indices, in the order they travel (``None``:
    every entry, dense); ``encoding``: 0 dense, 1 indices, 2 complement, 3 bitmask
    (``None`` when writing: the cheapest, ties to the lowest number); ``form``: 0 plain
    values, 1 bfloat16 update, 2 int8 update; ``scale``: the int8 scale.
    """

    values: np.ndarray
    flat: np.ndarray | None
    shape: tuple[int, ...]
    encoding: int | None = None
    form: int = 0
    scale: float = 1.0


def ref_index_width(size: int) -> int:
    """Bytes of the smallest unsigned integer addressing ``size`` entries (1, 2, 4, then 8)."""
    for width in (1, 2, 4):
        if size <= 2 ** (8 * width):
            return width
    return 8


def ref_cheapest_encoding(size: int, count: int) -> int:
    """The encoding the table of docs/wire-formats.md picks: least index bytes, ties to the first."""
    width = ref_index_width(size)
    costs = {1: count * width, 2: (size - count) * width, 3: (size + 7) // 8}
    if count == size:
        costs[0] = 0
    return min(sorted(costs), key=lambda encoding: costs[encoding])


def _ref_varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def ref_compact_encode(layers: Mapping[str, RefLayer]) -> dict[str, np.ndarray]:
    """The compact arrays of ``layers`` (``header``, ``values0``..., ``index``, ``scales``),
    written from the format's description: indices are written as given, never sorted."""
    header = bytearray([1]) + _ref_varint(len(layers))
    groups: dict[np.dtype, list[np.ndarray]] = {}
    index = bytearray()
    scales: list[float] = []
    for name, layer in layers.items():
        values = np.asarray(layer.values).reshape(-1)
        size = int(np.prod(layer.shape, dtype=np.int64))
        encoding = layer.encoding
        if encoding is None:
            encoding = 0 if layer.flat is None else ref_cheapest_encoding(size, values.size)
        if values.dtype not in groups:
            groups[values.dtype] = []
        group = list(groups).index(values.dtype)
        groups[values.dtype].append(values)
        raw = name.encode("utf-8")
        header += _ref_varint(len(raw)) + raw + bytes([encoding, layer.form])
        for number in (group, values.size, len(layer.shape), *layer.shape):
            header += _ref_varint(int(number))
        if encoding:
            flat = np.arange(size) if layer.flat is None else np.asarray(layer.flat)
            width = ref_index_width(size)
            little = np.dtype(f"<u{width}")
            if encoding == 1:
                index += flat.astype(little).tobytes()
            elif encoding == 2:
                index += np.setdiff1d(np.arange(size), flat).astype(little).tobytes()
            else:
                mask = np.zeros(-(-size // 8) * 8, np.uint8)
                mask[flat] = 1
                index += bytes(int(sum(int(bit) << k for k, bit in enumerate(byte))) for byte in mask.reshape(-1, 8))
        if layer.form == 2:
            scales.append(layer.scale)
    arrays = {"header": np.frombuffer(bytes(header), np.uint8).copy()}
    for number, parts in enumerate(groups.values()):
        arrays[f"values{number}"] = np.concatenate(parts)
    if index:
        arrays["index"] = np.frombuffer(bytes(index), np.uint8).copy()
    if scales:
        arrays["scales"] = np.asarray(scales, np.float32)
    return arrays


class _RefReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1]

    def varint(self) -> int:
        number = shift = 0
        while True:
            byte = self.byte()
            number |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return number


def ref_compact_decode(arrays: Mapping[str, np.ndarray]) -> dict[str, RefLayer]:
    """``name -> RefLayer`` of compact ``arrays`` (dense layers with ``flat=None``), read
    from the format's description; asserts the arrays are exactly those the header needs."""
    reader = _RefReader(np.asarray(arrays["header"], np.uint8).tobytes())
    assert reader.byte() == 1, "format version"
    described = []
    for _ in range(reader.varint()):
        name = bytes(reader.byte() for _ in range(reader.varint())).decode("utf-8")
        encoding, form = reader.byte(), reader.byte()
        group, count, ndim = reader.varint(), reader.varint(), reader.varint()
        shape = tuple(reader.varint() for _ in range(ndim))
        described.append((name, encoding, form, group, count, shape))
    assert reader.at == len(reader.data), "bytes after the last layer"
    groups = {group for _, _, _, group, _, _ in described}
    expected = {"header", *(f"values{g}" for g in groups)}
    expected |= {"index"} if any(encoding for _, encoding, *_ in described) else set()
    expected |= {"scales"} if any(form == 2 for _, _, form, *_ in described) else set()
    assert set(arrays) == expected, (sorted(arrays), sorted(expected))
    value_at = dict.fromkeys(groups, 0)
    index = np.asarray(arrays.get("index", np.zeros(0, np.uint8))).tobytes()
    index_at = 0
    scales = iter(np.asarray(arrays.get("scales", np.zeros(0, np.float32))).tolist())
    decoded: dict[str, RefLayer] = {}
    for name, encoding, form, group, count, shape in described:
        values = np.asarray(arrays[f"values{group}"])[value_at[group] : value_at[group] + count]
        value_at[group] += count
        size = int(np.prod(shape, dtype=np.int64))
        width = ref_index_width(size)
        flat = None
        if encoding in (1, 2):
            listed = count if encoding == 1 else size - count
            chunk = index[index_at : index_at + listed * width]
            index_at += listed * width
            indices = np.frombuffer(chunk, f"<u{width}").astype(np.int64)
            flat = indices if encoding == 1 else np.setdiff1d(np.arange(size), indices)
        elif encoding == 3:
            chunk = index[index_at : index_at + (size + 7) // 8]
            index_at += (size + 7) // 8
            flat = np.asarray([i for i in range(size) if chunk[i // 8] >> (i % 8) & 1], np.int64)
        if flat is not None:
            assert flat.size == count, name
        decoded[name] = RefLayer(values, flat, shape, encoding, form, next(scales) if form == 2 else 1.0)
    for group in groups:
        assert value_at[group] == np.asarray(arrays[f"values{group}"]).size, f"values{group}"
    assert index_at == len(index), "index bytes left over"
    return decoded


def ref_record_arrays(record: Any) -> dict[str, np.ndarray]:
    """A Flower ``ArrayRecord``'s arrays read with Flower's ``Array.numpy()``, raw ``|V``
    data viewed as the dtype ``Array.dtype`` names (bfloat16)."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

    out = {}
    for key, array in record.items():
        value = array.numpy()
        out[key] = value.view(np.dtype(array.dtype)) if value.dtype.kind == "V" else value
    return out


def ref_apply(layers: Mapping[str, np.ndarray], decoded: Mapping[str, RefLayer]) -> dict[str, np.ndarray]:
    """Copies of ``layers`` with ``decoded``'s plain values written in (whole layers or
    entries; a layer ``layers`` lacks must come whole)."""
    out = {name: np.array(value, copy=True) for name, value in layers.items()}
    for name, layer in decoded.items():
        assert layer.form == 0, f"{name}: a quantized update"
        if layer.flat is None:
            out[name] = np.asarray(layer.values).reshape(layer.shape).copy()
        else:
            out[name].reshape(-1)[layer.flat] = layer.values
    return out


def npy_size(array: Any) -> int:
    """Bytes of ``numpy.save(array)``: what Flower serializes an array to."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return len(buffer.getvalue())


def ref_record_nbytes(arrays: Mapping[str, Any]) -> int:
    """Flower's own ``ArrayRecord.count_bytes`` of ``key -> numpy array``: what a Message-API
    message carrying them counts (each ``numpy.save`` blob plus its key)."""
    from flwr.common import Array, ArrayRecord

    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()}).count_bytes()


def ref_message_nbytes(layers: Mapping[str, RefLayer]) -> int:
    """Bytes of the Message-API message whose payload is ``layers``: written compact by
    :func:`ref_compact_encode`, counted by Flower (:func:`ref_record_nbytes`)."""
    return ref_record_nbytes(ref_compact_encode(layers))


@pytest.fixture
def task_identity():
    """Flower's server-side ``Message()`` needs a run id (a SuperLink sets it): give messages
    built outside a run the identity a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module", autouse=True)
def no_compile_cache(request: Any) -> Any:
    """JAX's persistent compilation cache off for the command-line tests' runs (in process
    and in subprocesses; the modules test_cli*.py); tests/test_sim_cache.py covers the cache
    itself. Autouse and module-scoped, so that it comes before the modules' runs."""
    if not request.module.__name__.startswith("test_cli"):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAXLAYERX_CACHE", "off")
        yield


@pytest.fixture(scope="module")
def simulate_run(tmp_path_factory):
    """One tiny ``jaxlayerx simulate`` run in process: ``(folder, code, stdout, stderr)``."""
    from cli_support import SEED, TINY, run_in_process

    folder = tmp_path_factory.mktemp("cli") / "run"
    # Full exchange alone: the default pair (with the recommended rule) runs in the slow tier
    # (test_cli_runs.py::test_python_dash_m_simulate); test_cli.py checks the defaults' labels.
    code, out, err = run_in_process(
        ["simulate", "--exchangers", "full", "--out", str(folder), "--seed", str(SEED), *TINY]
    )
    return folder, code, out, err
