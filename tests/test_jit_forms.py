"""The pure forms (masks, the masked average, quantization) give the same answers with and
without ``jax.jit``, each checked against a small numpy reference (``chex.variants``)."""

from __future__ import annotations

import collections

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jaxlayerx as jlx
from jaxlayerx.quantize import dequantize, quantize_update


def flat(seed: int, scale: float = 1.0) -> collections.OrderedDict:
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        a=(rng.standard_normal((4, 3)) * scale).astype(np.float32),
        b=(rng.standard_normal(5) * scale).astype(np.float32),
        c=(rng.standard_normal((2, 2, 2)) * scale).astype(np.float32),
    )


class JitForms(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_percentage_mask_is_the_largest_l2_over_size_drifts(self):
        start, moved = flat(0), flat(1)
        mask = self.variant(lambda c, s: jlx.percentage_mask(jlx.drift_norms(c, s, normalize=True), 0.5))(moved, start)
        norms = {n: np.linalg.norm((moved[n] - start[n]).ravel()) / moved[n].size for n in moved}
        top = sorted(norms, key=lambda n: -norms[n])[:2]  # ceil(3 * 0.5) = 2
        self.assertEqual({n for n, m in mask.items() if bool(m)}, set(top))

    @chex.variants(with_jit=True, without_jit=True)
    def test_sparse_masks_keep_the_top_fraction_of_all_weights(self):
        layers, start = flat(2), flat(3)
        scores = collections.OrderedDict((n, jnp.abs(layers[n] - start[n])) for n in layers)
        masks = self.variant(lambda s, values: jlx.sparse_masks(s, values, 0.25))(scores, layers)
        every = np.concatenate([np.abs(layers[n] - start[n]).ravel() for n in layers])
        k = int(np.ceil(every.size * 0.25))
        threshold = np.sort(every)[::-1][k - 1]
        for name in layers:
            np.testing.assert_array_equal(np.asarray(masks[name]), np.abs(layers[name] - start[name]) >= threshold)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_fedavg_is_the_weighted_mean_over_the_senders(self):
        clients = [flat(10 + c) for c in range(3)]
        stacked = collections.OrderedDict((n, np.stack([c[n] for c in clients])) for n in clients[0])
        masks = collections.OrderedDict(a=np.array([True, False, True]), b=np.array([False, False, True]))
        masks["c"] = np.array([False, False, False])
        counts = np.array([10.0, 20.0, 30.0], np.float32)
        fallback = flat(99)
        averages, sent = self.variant(lambda *args: jlx.masked_fedavg(*args, fallback=fallback))(stacked, masks, counts)
        expected_a = (10 * clients[0]["a"] + 30 * clients[2]["a"]) / 40
        chex.assert_trees_all_close(
            {"a": averages["a"], "b": averages["b"], "c": averages["c"]},
            {"a": expected_a, "b": clients[2]["b"], "c": fallback["c"]},
            rtol=1e-6,
        )
        self.assertEqual([bool(sent[n]) for n in "abc"], [True, True, False])

    @chex.variants(with_jit=True, without_jit=True)
    def test_int8_quantization_is_round_half_even_of_the_update_over_its_scale(self):
        update = np.array([0.9, -0.45, 0.0, 0.3, 5.0], np.float32)
        mask = np.array([True, True, True, True, False])  # 5.0 is not sent: it does not enter the scale
        q, scale = self.variant(lambda u, m: quantize_update(u, m, "int8"))(update, mask)
        expected_scale = np.float32(0.9) * np.float32(1 / 127)
        expected = np.clip(np.rint(np.where(mask, update, 0) * (np.float32(1) / expected_scale)), -127, 127)
        chex.assert_trees_all_equal((np.asarray(q), np.asarray(scale)), (expected.astype(np.int8), expected_scale))
        restored = np.asarray(self.variant(dequantize)(q, scale))
        np.testing.assert_allclose(restored[:4], update[:4], atol=float(expected_scale) / 2 + 1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_quantization_rounds_to_nearest_even(self):
        update = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(2.0**-20)], np.float32)  # ties, and a tiny value
        q, scale = self.variant(lambda u: quantize_update(u, True, "bf16"))(update)
        self.assertEqual(np.asarray(q).astype(np.float32).tolist(), [1.0, 1.0 + 2**-6, -(2.0**-20)])
        self.assertEqual(float(scale), 1.0)
