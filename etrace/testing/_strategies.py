"""hypothesis strategies over model families, sequences and algorithms.

Every strategy draws sizes and seeds, never raw arrays, so a shrunk failing example
reads like `Case(family='lif', n_in=1, hidden=2, n_out=1, seed=0)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from .._algorithm import registry
from ._families import build, FAMILIES


_NEEDS_HYPOTHESIS = (
    "etrace.testing's strategies need hypothesis: `pip install hypothesis` (or "
    "`pip install etrace[tests]`)."
)


def _st() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError:
        raise ImportError(_NEEDS_HYPOTHESIS) from None
    return st


@dataclasses.dataclass(frozen=True)
class Case:
    """A drawn model: family name, sizes and seed, as drawn by `model_families`.

    **Attributes:**

    - `family`: a name in `etrace.testing.FAMILIES`.
    - `n_in`, `hidden`, `n_out`: input, hidden and output sizes.
    - `seed`: the seed of the parameters.

    `build()` makes the model and its state; `sample_input` is one step of input.
    """

    family: str
    n_in: int
    hidden: int
    n_out: int
    seed: int

    def build(self) -> tuple[Any, Any]:
        """`(model, state)` in float64."""
        return build(self.family, self.n_in, self.hidden, self.n_out, self.seed)

    @property
    def sample_input(self) -> Any:
        """One unbatched float64 time step of input, shape `(n_in,)`."""
        return jnp.zeros(self.n_in, jnp.float64)


@dataclasses.dataclass(frozen=True)
class Sequence_:
    """A drawn sequence: its length, seed and input scale; `xs`/`targets` hold it."""

    length: int
    seed: int
    scale: float
    xs: Any = dataclasses.field(repr=False, compare=False)
    targets: Any = dataclasses.field(repr=False, compare=False)


def model_families(
    families: Sequence[str] = tuple(FAMILIES),
    *,
    inputs: tuple[int, int] = (1, 4),
    hidden: tuple[int, int] = (1, 6),
    outputs: tuple[int, int] = (1, 3),
) -> Any:
    """A strategy of `Case`s: random models from etrace's families.

    Families: `leaky` (leaky linear, learnable decay), `lif` (surrogate spikes, soft
    reset), `alif` (two states per neuron), `stack` (two LIF layers), `rnn` (tanh RNN
    with a recurrent weight), `gru` and `lstm` (stock Equinox cells).

    **Arguments:**

    - `families`: the family names to draw from; all by default.
    - `inputs`, `hidden`, `outputs`: inclusive ranges of the input, hidden and output
        sizes.

    **Returns:**

    A hypothesis strategy of `Case`s (needs hypothesis installed).
    """
    st = _st()
    return st.builds(
        Case,
        family=st.sampled_from(list(families)),
        n_in=st.integers(*inputs),
        hidden=st.integers(*hidden),
        n_out=st.integers(*outputs),
        seed=st.integers(0, 2**16),
    )


def sequences(
    case_or_sample: Any,
    *,
    length: tuple[int, int] = (2, 8),
    targets: Any = None,
    scale: tuple[float, float] = (1.0, 3.0),
) -> Any:
    """A strategy of sequences for a `Case`, or for any sample input.

    **Arguments:**

    - `case_or_sample`: a `Case` (targets get its output size), or one unbatched time
        step (any pytree of arrays) to draw inputs shaped like.
    - `length`: the range of sequence lengths.
    - `targets`: for a sample input, one step of targets to shape them like.
    - `scale`: the range of the inputs' standard deviation.
    """
    st = _st()
    if isinstance(case_or_sample, Case):
        sample = case_or_sample.sample_input
        target = jnp.zeros(case_or_sample.n_out, jnp.float64)
    else:
        sample = case_or_sample
        target = jnp.zeros(()) if targets is None else targets

    def Sequence(length, seed, scale):  # named for readable shrunk examples
        k1, k2 = jr.split(jr.key(seed))

        def draw(tree, key, s):
            leaves, treedef = jtu.tree_flatten(tree)
            keys = jr.split(key, max(len(leaves), 1))
            return jtu.tree_unflatten(
                treedef,
                [
                    s * jr.normal(k, (length,) + jnp.shape(a), jnp.result_type(a))
                    for k, a in zip(keys, leaves)
                ],
            )

        return Sequence_(
            length, seed, scale, draw(sample, k1, scale), draw(target, k2, 1.0)
        )

    return st.builds(
        Sequence,
        length=st.integers(*length),
        seed=st.integers(0, 2**16),
        scale=st.floats(*scale),
    )


def algorithms(*, dense: bool = True, modulated: bool = False) -> Any:
    """A strategy of the algorithms etrace ships, with drawn hyper-parameters.

    **Arguments:**

    - `dense`: include the whole-state algorithms (`RTRL`, `SnAp`, `UORO`,
        `OSTLRecurrent`, and `OSTTP` with `recurrent=True`), whose cost grows with
        the square of the hidden size; leave them out for large models.
    - `modulated`: include the algorithms that learn from a modulator instead of
        the loss (`ThreeFactor`); a test drawing them passes `modulators=` to
        `etrace.online_grad` or `modulator=` to `learner.step`.
    """
    return _algorithms(registry.ALGORITHMS, dense=dense, modulated=modulated)


def _algorithms(
    entries: Sequence[registry.Entry], *, dense: bool, modulated: bool = False
) -> Any:
    """`algorithms` over the registry `entries`."""
    st = _st()
    return st.one_of(
        *[
            e.strategy(st, dense=dense)
            for e in entries
            if (dense or not e.dense)
            and (modulated or e.cls.learning_signal != "modulator")
        ]
    )
