"""A federated character-level language model (NNX) on token data.

The text is the opening of Lewis Carroll's *Alice's Adventures in Wonderland* (1865,
public domain), shipped in ``examples/data/alice.txt``. It is cut into windows of
``length + 1`` characters; each window's paragraph is its grouping key, and the clients
split the paragraphs by a Dirichlet draw over that key, so that each client holds mostly
its own paragraphs. The model reads each character with the two before it and predicts
the next one; the loss is the next-character cross-entropy at every position, and the
metric the share of characters guessed right. Every layer is exchanged, in bfloat16.

    python examples/char_lm.py --rounds 20
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlayerx.simulation import ExchangerSpec, Simulation, SimulationConfig, make_client_data

TEXT = pathlib.Path(__file__).resolve().parent / "data" / "alice.txt"


class CharModel(nnx.Module):
    """Embeds each character, joins it with the two before it, and predicts the next."""

    def __init__(self, vocabulary: int, rngs: nnx.Rngs, width: int = 16, hidden: int = 64) -> None:
        self.embed = nnx.Embed(vocabulary, width, rngs=rngs)
        self.hidden = nnx.Linear(3 * width, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, vocabulary, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        here = self.embed(tokens)  # (batch, length, width)
        one_back = jnp.pad(here, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        two_back = jnp.pad(here, ((0, 0), (2, 0), (0, 0)))[:, :-2]
        return self.out(nnx.relu(self.hidden(jnp.concatenate([here, one_back, two_back], axis=-1))))


def inputs(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["tokens"][:, :-1]


def next_character_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """One loss per position, ``(batch, length)``: the simulation averages each example's."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])


def next_character_accuracy(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"accuracy": jnp.argmax(logits, axis=-1) == batch["tokens"][:, 1:]}


def windows(text: str, length: int, stride: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every ``length + 1``-character window (every ``stride`` characters) as token ids, each
    window's paragraph, and the vocabulary."""
    vocabulary = sorted(set(text))
    ids = np.array([vocabulary.index(c) for c in text], np.int32)
    paragraph = np.cumsum([c == "\n" for c in text])
    starts = np.arange(0, len(text) - length - 1, stride)
    tokens = np.stack([ids[s : s + length + 1] for s in starts])
    return tokens, paragraph[starts], vocabulary


def main(rounds: int = 20, clients: int = 4, length: int = 16, seed: int = 0, verbose: bool = True) -> list[dict]:
    """Runs the federation; returns the round records."""
    tokens, paragraph, vocabulary = windows(TEXT.read_text(), length, stride=4)
    data = make_client_data({"tokens": tokens}, num_clients=clients, groups=paragraph, beta=0.5, seed=seed)
    simulation = Simulation(
        ExchangerSpec("full", quantize="bf16"),
        SimulationConfig(rounds=rounds, local_steps=20, batch_size=32, seed=seed),
        data,
        CharModel(len(vocabulary), nnx.Rngs(seed)),
        loss_fn=next_character_loss,
        metrics_fn=next_character_accuracy,
        input_fn=inputs,
        client_optimizer=optax.adam(1e-2),
    )
    records = simulation.run()
    if verbose:
        print(f"{len(tokens)} windows of {length + 1} characters, {len(vocabulary)} characters, {clients} clients")
        for record in records:
            print(
                f"round {record['round']:2d}: next-character loss {record['global_loss']:.3f}  "
                f"accuracy {record['global_accuracy']:.3f}  upload {record['upload_bytes'] / 1e3:.1f} kB"
            )
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.rounds, args.clients, seed=args.seed)
