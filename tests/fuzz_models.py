"""Random model architectures for fuzzing the compiler and the runtime.

An architecture is described by a small frozen dataclass of strings, ints and bools
(`Architecture`, with one `LayerSpec` per temporal layer), so that a drawn case can be
written to JSON, stored in `tests/fuzz_corpus/` and rebuilt exactly. `build` turns a
description into an Equinox model called as `model(x, state) -> (y, state)`, with its
initial state and one sample input step.

What the descriptions cover:

* inputs: one vector, a dict of two vectors, a dict with a leaf the model ignores, a
  tuple of a vector and an integer token, a single integer token (read through an
  embedding), or a `(channels, positions)` signal read through `eqx.nn.Conv1d`;
* an optional feed-forward encoder (`eqx.nn.Linear` or `eqx.nn.MLP`) with a relu,
  tanh or gelu activation;
* one to three stacked temporal layers, each `eqx.nn.GRUCell`, `eqx.nn.LSTMCell`, a
  tanh RNN built from `eqx.nn.Linear`, an `etrace.nn.LIF` (optionally refractory) or
  `etrace.nn.ALIF` layer (optionally reading its own previous spikes),
  `etrace.nn.ElmanCell`, `etrace.nn.DiagonalLinearCell`, a leaky layer with one
  learnable scalar decay, or a hand-written LIF layer with a `jax.custom_vjp` spike
  that returns the spike computed before its reset (a value of the update that is
  not stored as state), or a tanh RNN that applies one weight matrix to both its
  input and its state, or a leaky layer of `eqx.nn.Conv1d` over the input seen as a
  one-channel signal, whose state is a `(channels, positions)` array;
* for the layers whose input current is a separate weight (all but the cells), the
  weight operator: dense, a multi-head `einsum`, a fixed boolean mask, a low-rank
  `A @ (B @ x)` product, or no weight at all (the input is the current);
* optional connections: top-down feedback (the first layer also reads the last
  layer's output of the previous step), a skip connection (the last layer also reads
  the encoder's output), and a leaky filter of the encoder's output kept in the state
  and read by the first layer (a state leaf that parameters reach only through the
  encoder, or not at all);
* readouts: `eqx.nn.Linear`, `eqx.nn.MLP`, `eqx.nn.Linear` into
  `etrace.nn.LeakyRateReadout`, a `eqx.nn.LayerNorm` before `eqx.nn.Linear`, the sum
  of the hidden values, or the hidden values themselves; reading the last layer or
  every layer; optionally scaled by an integer step counter kept in the state; the
  output is an array or a dict of two arrays;
* the state: an `eqx.nn.State`, or a plain pytree (`DictState`, a dict of arrays
  with the same `get`/`set` methods);
* refusals: a `eqx.nn.LayerNorm` or a mean across neurons inside the recurrent
  update, or `lax.cond` over the state with a weight inside. The compiler must refuse
  these with `etrace.EtraceError` (see `Architecture.must_refuse`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import etrace
from etrace._algorithm import registry


LAYER_KINDS = (
    "gru",
    "lstm",
    "rnn",
    "lif",
    "alif",
    "elman",
    "diagonal",
    "leaky",
    "rawlif",
    "tied",
    "conv",
)
# Layers whose input current is computed by a separately drawn weight operator.
CURRENT_KINDS = ("rnn", "lif", "alif", "leaky", "rawlif")
SPIKING_KINDS = ("lif", "alif")
WEIGHTS = ("dense", "einsum", "masked", "lowrank", "direct")
INPUTS = ("vector", "dict", "ignored", "tuple", "tokens", "conv")
ENCODERS = ("none", "linear", "mlp")
ACTIVATIONS = ("relu", "tanh", "gelu")
READOUTS = ("linear", "mlp", "leaky", "norm", "sum", "identity")
RESETS = ("soft", "hard", "detached")
REFUSALS = ("layernorm", "mean", "cond")
# Layers that store one explicit hidden vector, where a refusal can be inserted.
REFUSABLE = ("gru", "rnn", "elman", "diagonal", "leaky")
# The algorithms by class name, as the cases store them: the registry's.
ALGORITHMS = tuple(registry.BY_NAME)

VOCAB = 5  # rows of every embedding table
TUPLE_EMBEDDING = 3  # row size of the token embedding of a tuple input
DICT_EXTRA = 2  # size of the second vector of a dict input
CHANNELS = 2  # channels of a convolutional input, before and after the convolution
MAX_DIRECT = 12  # the widest input a layer may take as its current without a weight
_ACTIVATIONS: dict[str, Callable[..., Any]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
}


# --------------------------------------------------------------------------------
# Descriptions.


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One temporal layer.

    - `kind`: one of `LAYER_KINDS`.
    - `width`: number of neurons.
    - `weight`: the input weight operator of a layer in `CURRENT_KINDS`, one of
        `WEIGHTS`; `"dense"` for the other kinds, whose cells own their weights.
    - `recurrent`: for `lif` and `alif`, whether the layer reads its own previous
        spikes (through the input weight when it is dense, as in `docs/nn.md`, else
        through a second weight).
    - `reset`, `learn`: for `lif` and `alif`, the reset mode and whether `tau` and
        the threshold are trainable.
    - `refractory`: for `lif`, the refractory period in steps (0 for none).
    - `refusal`: `None`, or one of `REFUSALS` applied to the new hidden vector before
        it is stored (only for kinds in `REFUSABLE`).
    """

    kind: str
    width: int
    weight: str = "dense"
    recurrent: bool = False
    reset: str = "soft"
    learn: bool = False
    refractory: int = 0
    refusal: str | None = None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model: input, encoder, temporal layers and readout, and a parameter seed.

    - `input`: one of `INPUTS`; `n_in` sizes it (the vector size, the embedding row
        size of a token input, or the number of positions of a convolutional input).
    - `encoder`: one of `ENCODERS`, of output size `encoder_width`, with
        `activation` (one of `ACTIVATIONS`).
    - `layers`: one `LayerSpec` per temporal layer, applied in order.
    - `readout`: one of `READOUTS`, of output size `n_out` (`"sum"` gives size 1 and
        `"identity"` the size of what it reads).
    - `seed`: the seed of the parameters.
    - `readout_all`: the readout reads the concatenated outputs of every layer
        instead of the last layer's.
    - `top_down`: the first layer also reads the last layer's previous output.
    - `counter`: the state holds an integer step counter, and the output is scaled
        by `1 + (step mod 2)`.
    - `skip`: the last layer also reads the encoder's output (with two layers or
        more).
    - `filtered`: the state holds a leaky filter of the encoder's output, which the
        first layer also reads.
    - `tree_output`: the model returns `{"y": y, "mean": mean}`, with `mean` the
        mean of the values the readout reads, instead of `y`.
    - `plain_state`: the state is a `DictState` instead of an `eqx.nn.State`;
        only without `etrace.nn` neurons or readout, which take an `eqx.nn.State`.
    """

    input: str
    n_in: int
    encoder: str
    encoder_width: int
    activation: str
    layers: tuple[LayerSpec, ...]
    readout: str
    n_out: int
    seed: int
    readout_all: bool = False
    top_down: bool = False
    counter: bool = False
    skip: bool = False
    filtered: bool = False
    tree_output: bool = False
    plain_state: bool = False

    @property
    def must_refuse(self) -> bool:
        """Whether `etrace.compile` must raise `EtraceError` on this model.

        Control flow in the recurrent update is always refused. A mean or a
        LayerNorm mixes neurons only when there are at least two of them; over one
        neuron it is neuron-local, and the compiler may accept it.
        """
        return any(
            layer.refusal == "cond" or (layer.refusal is not None and layer.width > 1)
            for layer in self.layers
        )

    @property
    def may_refuse(self) -> bool:
        """Whether `etrace.compile` may raise `EtraceError` on a model that it need
        not refuse.

        A layer that takes its input as its current, without a weight, joins the
        neurons of whatever it reads into its own update element-wise. When that
        input is a concatenation that holds a hidden state (top-down feedback, the
        input filter, or a skip connection next to the previous layer's output),
        neurons at different positions, or leaves of different sizes, end up in one
        hidden group, which the compiler refuses.
        """
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if layer.weight != "direct":
                continue
            if i == 0 and (self.top_down or self.filtered):
                return True
            if i == last and i > 0 and self.skip:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = [dataclasses.asdict(layer) for layer in self.layers]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Architecture:
        data = dict(data)
        data["layers"] = tuple(LayerSpec(**layer) for layer in data["layers"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm by the name of its class and its constructor arguments as
    storable values (JSON only), which its registry entry turns into the arguments
    (`OSTTP`'s `feedback` is given as `feedback_seed`, the seed of its
    `etrace.FixedRandomFeedback`).
    """

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> etrace.AbstractAlgorithm:
        return registry.BY_NAME[self.name].build(dict(self.kwargs))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlgorithmSpec:
        return cls(data["name"], tuple(sorted(data.get("kwargs", {}).items())))


@dataclasses.dataclass(frozen=True)
class FuzzCase:
    """Everything needed to rerun one fuzzing example: the architecture, the
    algorithm, and the seed and (even) length of the data."""

    architecture: Architecture
    algorithm: AlgorithmSpec
    data_seed: int
    length: int

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture.to_json(),
            "algorithm": self.algorithm.to_json(),
            "data_seed": self.data_seed,
            "length": self.length,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FuzzCase:
        return cls(
            Architecture.from_json(data["architecture"]),
            AlgorithmSpec.from_json(data["algorithm"]),
            int(data["data_seed"]),
            int(data["length"]),
        )

    def dumps(self, **extra: Any) -> str:
        """The case as indented JSON, with `extra` keys (such as `note`) first."""
        return json.dumps({**extra, **self.to_json()}, indent=2) + "\n"


# --------------------------------------------------------------------------------
# Sizes.


def input_size(arch: Architecture) -> int:
    """The size of the vector the input becomes before the encoder."""
    if arch.input == "dict":
        return arch.n_in + DICT_EXTRA
    if arch.input == "tuple":
        return arch.n_in + TUPLE_EMBEDDING
    if arch.input == "conv":
        return CHANNELS * arch.n_in
    return arch.n_in  # "vector", "ignored", "tokens"


def front_size(arch: Architecture) -> int:
    """The size of the vector the encoder passes on (its input if there is none)."""
    return input_size(arch) if arch.encoder == "none" else arch.encoder_width


def layer_inputs(arch: Architecture) -> list[int]:
    """The size of each temporal layer's input."""
    front = front_size(arch)
    sizes = [front] + [layer.width for layer in arch.layers[:-1]]
    if arch.top_down:
        sizes[0] += arch.layers[-1].width
    if arch.filtered:
        sizes[0] += front
    if arch.skip and len(sizes) > 1:
        sizes[-1] += front
    return sizes


def readout_size(arch: Architecture) -> int:
    """The size of the vector the readout reads."""
    if arch.readout_all:
        return sum(layer.width for layer in arch.layers)
    return arch.layers[-1].width


def output_size(arch: Architecture) -> int:
    if arch.readout == "sum":
        return 1
    if arch.readout == "identity":
        return readout_size(arch)
    return arch.n_out


def _uses_etrace_state(layers: Any, readout: str) -> bool:
    """Whether a layer or the readout is an `etrace.nn` layer, which needs an
    `eqx.nn.State` (its annotation is checked in the test session)."""
    return readout == "leaky" or any(layer.kind in SPIKING_KINDS for layer in layers)


def _heads(width: int) -> int:
    return 2 if width % 2 == 0 else 1


# --------------------------------------------------------------------------------
# Strategies.


@st.composite
def layer_specs(draw: Any, size_in: int | None, *, allow_refusal: bool) -> LayerSpec:
    """A strategy of one `LayerSpec` reading a vector of size `size_in` (`None`
    when the size is not known yet: then the layer takes no `"direct"` input)."""
    kind = draw(st.sampled_from(LAYER_KINDS))
    width = draw(st.integers(1, 6))
    if kind == "tied":  # its one square weight reads both input and state
        if size_in is None or size_in > MAX_DIRECT:
            kind = "rnn"
        else:
            width = size_in
    if kind == "conv":  # one or two channels at every input position
        if size_in is None or size_in > MAX_DIRECT:
            kind = "leaky"
        else:
            width = size_in * (1 + (size_in <= MAX_DIRECT // 2))
    weight = "dense"
    if kind in CURRENT_KINDS:
        direct = size_in is not None and size_in <= MAX_DIRECT
        weight = draw(st.sampled_from([w for w in WEIGHTS if w != "direct" or direct]))
        if weight == "direct":
            assert size_in is not None
            width = size_in
    spiking = kind in SPIKING_KINDS
    recurrent = spiking and draw(st.booleans())
    reset = draw(st.sampled_from(RESETS)) if spiking else "soft"
    learn = spiking and draw(st.booleans())
    refractory = draw(st.sampled_from([0, 2])) if kind == "lif" else 0
    refusal = None
    if allow_refusal and kind in REFUSABLE:
        refusal = draw(st.none() | st.sampled_from(REFUSALS))
    return LayerSpec(kind, width, weight, recurrent, reset, learn, refractory, refusal)


@st.composite
def architectures(
    draw: Any, *, depth: tuple[int, int] = (1, 3), refusals: float = 0.2
) -> Architecture:
    """A strategy of `Architecture`s.

    **Arguments:**

    - `depth`: the range of the number of temporal layers.
    - `refusals`: the probability that the layers may carry a refusal (each layer
        that can carry one then does so with probability about 1/2).
    """
    encoder = draw(st.sampled_from(ENCODERS))
    arch = Architecture(
        input=draw(st.sampled_from(INPUTS)),
        n_in=draw(st.integers(1, 4)),
        encoder=encoder,
        encoder_width=draw(st.integers(1, 6)) if encoder != "none" else 0,
        activation=draw(st.sampled_from(ACTIVATIONS)) if encoder != "none" else "tanh",
        layers=(),
        readout=draw(st.sampled_from(READOUTS)),
        n_out=1,
        seed=draw(st.integers(0, 2**16)),
        top_down=draw(st.booleans()),
        counter=draw(st.booleans()),
        skip=draw(st.booleans()),
        filtered=draw(st.booleans()),
        tree_output=draw(st.booleans()),
        plain_state=draw(st.booleans()),
    )
    allow_refusal = draw(st.integers(0, 99)) < 100 * refusals
    front = front_size(arch)
    # With top-down feedback the first layer's input size depends on the last
    # layer's width, which is drawn later.
    size = None if arch.top_down else front * (1 + arch.filtered)
    layers = []
    count = draw(st.integers(*depth))
    for i in range(count):
        if arch.skip and i == count - 1 and i > 0:
            assert size is not None
            size += front
        layer = draw(layer_specs(size, allow_refusal=allow_refusal))
        layers.append(layer)
        size = layer.width
    return dataclasses.replace(
        arch,
        layers=tuple(layers),
        readout_all=len(layers) > 1 and draw(st.booleans()),
        skip=arch.skip and len(layers) > 1,
        plain_state=arch.plain_state and not _uses_etrace_state(layers, arch.readout),
        n_out=draw(st.integers(1, 3)) if arch.readout not in ("sum", "identity") else 1,
    )


def _spec(name: str, kwargs: dict[str, Any]) -> AlgorithmSpec:
    return AlgorithmSpec(name, tuple(sorted(kwargs.items())))


def algorithm_specs(names: tuple[str, ...] = ALGORITHMS) -> Any:
    """A strategy of `AlgorithmSpec`s over the algorithms etrace ships, with the
    hyper-parameter ranges of their registry entries (as `etrace.testing.algorithms`
    draws them), as storable values."""
    # Built before any draw: the test session type-checks etrace's functions, and
    # the check of a container samples it with Python's `random`, which hypothesis
    # forbids inside a draw.
    return st.one_of(
        *[
            registry.BY_NAME[name].values(st).map(functools.partial(_spec, name))
            for name in names
        ]
    )


def fuzz_cases(
    *, algorithms: tuple[str, ...] = ALGORITHMS, refusals: float = 0.2
) -> Any:
    """A strategy of whole `FuzzCase`s."""
    return st.builds(
        FuzzCase,
        architecture=architectures(refusals=refusals),
        algorithm=algorithm_specs(algorithms),
        data_seed=st.integers(0, 2**16),
        length=st.sampled_from([2, 4, 6]),
    )


# --------------------------------------------------------------------------------
# Layers. Their initial values do not matter: `build` replaces them.


@jax.custom_vjp
def _spike(x):
    return (x > 0).astype(x.dtype)


def _spike_fwd(x):
    return _spike(x), x


def _spike_bwd(x, g):
    return (g / (1.0 + 4.0 * jnp.abs(x)) ** 2,)


_spike.defvjp(_spike_fwd, _spike_bwd)


class Front(eqx.Module):
    """Turns one input step (any of `INPUTS`) into a vector."""

    kind: str = eqx.field(static=True)
    embedding: eqx.nn.Embedding | None
    conv: eqx.nn.Conv1d | None

    def __init__(self, arch: Architecture, key: jax.Array):
        k1, k2 = jr.split(key)
        self.kind = arch.input
        self.embedding = None
        self.conv = None
        if arch.input == "tokens":
            self.embedding = eqx.nn.Embedding(VOCAB, arch.n_in, key=k1)
        elif arch.input == "tuple":
            self.embedding = eqx.nn.Embedding(VOCAB, TUPLE_EMBEDDING, key=k1)
        elif arch.input == "conv":
            self.conv = eqx.nn.Conv1d(CHANNELS, CHANNELS, 3, padding=1, key=k2)

    def __call__(self, x: Any) -> jax.Array:
        if self.kind == "dict":
            return jnp.concatenate([x["a"], x["b"]])
        if self.kind == "ignored":
            return x["used"]
        if self.kind == "tuple":
            assert self.embedding is not None
            vector, token = x
            return jnp.concatenate([vector, self.embedding(token)])
        if self.kind == "tokens":
            assert self.embedding is not None
            return 2.0 * self.embedding(x)
        if self.kind == "conv":
            assert self.conv is not None
            return self.conv(x).reshape(-1)
        return x


class Encoder(eqx.Module):
    """A feed-forward encoder: `eqx.nn.Linear` then an activation, or `eqx.nn.MLP`."""

    layer: eqx.nn.Linear | eqx.nn.MLP
    activation: str = eqx.field(static=True)

    def __init__(self, kind: str, size_in: int, width: int, activation: str, key):
        self.activation = activation
        if kind == "linear":
            self.layer = eqx.nn.Linear(size_in, width, key=key)
        else:
            self.layer = eqx.nn.MLP(
                size_in, width, 4, 1, activation=_ACTIVATIONS[activation], key=key
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.layer(x)
        if isinstance(self.layer, eqx.nn.Linear):
            y = _ACTIVATIONS[self.activation](y)
        return y


class Current(eqx.Module):
    """The input weight operator of a layer in `CURRENT_KINDS`: `x -> W x`."""

    kind: str = eqx.field(static=True)
    width: int = eqx.field(static=True)
    linear: eqx.nn.Linear | None
    weight: jax.Array | None
    mask: jax.Array | None
    factor: jax.Array | None

    def __init__(self, kind: str, size_in: int, width: int, key: jax.Array):
        k1, k2 = jr.split(key)
        self.kind = kind
        self.width = width
        self.linear = self.weight = self.mask = self.factor = None
        if kind == "dense":
            self.linear = eqx.nn.Linear(size_in, width, key=k1)
        elif kind == "einsum":
            heads = _heads(width)
            self.weight = jr.normal(k1, (heads, width // heads, size_in))
        elif kind == "masked":
            self.weight = jr.normal(k1, (width, size_in))
            self.mask = jr.bernoulli(k2, 0.6, (width, size_in))
        elif kind == "lowrank":
            rank = 1 + width % 2
            self.weight = jr.normal(k1, (width, rank))
            self.factor = jr.normal(k2, (rank, size_in))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.linear is not None:
            return self.linear(x)
        if self.kind == "einsum":
            assert self.weight is not None
            heads = self.weight.shape[0]
            xs = jnp.broadcast_to(x, (heads,) + x.shape)
            return jnp.einsum("hij,hj->hi", self.weight, xs).reshape(self.width)
        if self.kind == "masked":
            return jnp.where(self.mask, self.weight, 0.0) @ x
        if self.kind == "lowrank":
            assert self.weight is not None and self.factor is not None
            return self.weight @ (self.factor @ x)
        return 1.5 * x  # "direct"


class Refusal(eqx.Module):
    """A transformation of the new hidden vector that the compiler must refuse."""

    kind: str = eqx.field(static=True)
    norm: eqx.nn.LayerNorm | None
    weight: jax.Array | None

    def __init__(self, kind: str, width: int, key: jax.Array):
        self.kind = kind
        self.norm = eqx.nn.LayerNorm(width) if kind == "layernorm" else None
        self.weight = jr.normal(key, (width, width)) if kind == "cond" else None

    def __call__(self, h: jax.Array) -> jax.Array:
        if self.norm is not None:
            return self.norm(h)
        if self.kind == "mean":
            return h - jnp.mean(h)
        w = self.weight
        return jax.lax.cond(h[0] > 0, lambda: jnp.tanh(w @ h), lambda: h)


class Layer(eqx.Module):
    """One temporal layer, called as `layer(x, state) -> (output, state)`."""

    spec: LayerSpec = eqx.field(static=True)
    current: Current | None
    recurrent: eqx.nn.Linear | None
    cell: Any
    neuron: etrace.nn.LIF | etrace.nn.ALIF | None
    decay: jax.Array | None
    refusal: Refusal | None
    h: eqx.nn.StateIndex | None
    c: eqx.nn.StateIndex | None
    conv: eqx.nn.Conv1d | None

    def __init__(self, spec: LayerSpec, size_in: int, key: jax.Array):
        k1, k2, k3, k4 = jr.split(key, 4)
        n, kind = spec.width, spec.kind
        self.spec = spec
        self.current = self.recurrent = self.cell = self.neuron = None
        self.decay = self.refusal = self.h = self.c = self.conv = None
        if kind in CURRENT_KINDS:
            # A dense recurrent spiking layer reads [x, own spikes] through one map.
            joint = spec.recurrent and spec.weight == "dense"
            self.current = Current(spec.weight, size_in + n * joint, n, k1)
            if kind == "rnn" or (spec.recurrent and not joint):
                self.recurrent = eqx.nn.Linear(n, n, use_bias=False, key=k2)
        if kind == "tied":
            self.recurrent = eqx.nn.Linear(n, n, key=k2)
        if kind == "conv":
            self.conv = eqx.nn.Conv1d(1, n // size_in, 3, padding=1, key=k2)
            self.decay = jnp.array(0.5)
        if kind == "gru":
            self.cell = eqx.nn.GRUCell(size_in, n, key=k3)
        elif kind == "lstm":
            self.cell = eqx.nn.LSTMCell(size_in, n, key=k3)
            self.c = eqx.nn.StateIndex(jnp.zeros(n))
        elif kind == "elman":
            self.cell = etrace.nn.ElmanCell(size_in, n, key=k3)
        elif kind == "diagonal":
            self.cell = etrace.nn.DiagonalLinearCell(size_in, n, key=k3)
        elif kind == "lif":
            self.neuron = etrace.nn.LIF(
                n, tau=4.0, threshold=0.4, reset=spec.reset,
                refractory=spec.refractory, learn_tau=spec.learn,
                learn_threshold=spec.learn,
            )  # fmt: skip
        elif kind == "alif":
            self.neuron = etrace.nn.ALIF(
                n, tau=4.0, tau_adapt=8.0, beta=0.5, threshold=0.4, reset=spec.reset,
                learn_tau=spec.learn, learn_threshold=spec.learn,
            )  # fmt: skip
        elif kind == "leaky":
            self.decay = jnp.array(0.5)
        if self.conv is not None:
            self.h = eqx.nn.StateIndex(jnp.zeros((n // size_in, size_in)))
        elif self.neuron is None:
            self.h = eqx.nn.StateIndex(jnp.zeros(n))
        if spec.refusal is not None:
            self.refusal = Refusal(spec.refusal, n, k4)

    def previous(self, state: Any) -> jax.Array:
        """The layer's output of the previous step as stored in the state (the
        membrane potential for `rawlif`, whose spikes are not stored)."""
        if self.neuron is not None:
            return self.neuron.spikes(state)
        assert self.h is not None
        return state.get(self.h).reshape(-1)

    def __call__(self, x: jax.Array, state: Any) -> tuple[Any, Any]:
        kind = self.spec.kind
        if self.neuron is not None:
            assert self.current is not None
            previous = self.neuron.spikes(state)
            if self.spec.recurrent and self.recurrent is None:
                current = self.current(jnp.concatenate([x, previous]))
            else:
                current = self.current(x)
                if self.recurrent is not None:
                    current = current + self.recurrent(previous)
            return self.neuron(current, state)
        assert self.h is not None
        h = state.get(self.h)
        if kind == "lstm":
            assert self.c is not None
            h, c = self.cell(x, (h, state.get(self.c)))
            return h, state.set(self.h, h).set(self.c, c)
        if kind == "conv":
            assert self.conv is not None
            h = jax.nn.sigmoid(self.decay) * h + jnp.tanh(self.conv(x[None]))
            return h.reshape(-1), state.set(self.h, h)
        if kind == "rawlif":
            assert self.current is not None
            v = 0.6 * h + self.current(x)
            z = _spike(v - 0.4)
            return z, state.set(self.h, v - 0.4 * z)
        if kind in ("gru", "elman", "diagonal"):
            h = self.cell(x, h)
        elif kind == "rnn":
            assert self.current is not None and self.recurrent is not None
            h = jnp.tanh(self.current(x) + self.recurrent(h))
        elif kind == "tied":
            assert self.recurrent is not None
            h = jnp.tanh(self.recurrent(x) + self.recurrent.weight @ h)
        else:  # "leaky"
            assert self.current is not None
            h = jax.nn.sigmoid(self.decay) * h + jnp.tanh(self.current(x))
        if self.refusal is not None:
            h = self.refusal(h)
        return h, state.set(self.h, h)


class Readout(eqx.Module):
    """Maps the hidden values read out to the model's output."""

    kind: str = eqx.field(static=True)
    linear: eqx.nn.Linear | eqx.nn.MLP | None
    norm: eqx.nn.LayerNorm | None
    leaky: etrace.nn.LeakyRateReadout | None

    def __init__(self, kind: str, size_in: int, n_out: int, key: jax.Array):
        self.kind = kind
        self.linear = self.norm = self.leaky = None
        if kind == "mlp":
            self.linear = eqx.nn.MLP(size_in, n_out, 4, 1, activation=jnp.tanh, key=key)
        elif kind in ("linear", "leaky", "norm"):
            self.linear = eqx.nn.Linear(size_in, n_out, key=key)
        if kind == "norm":
            self.norm = eqx.nn.LayerNorm(size_in)
        if kind == "leaky":
            self.leaky = etrace.nn.LeakyRateReadout(n_out, tau=3.0)

    def __call__(self, h: jax.Array, state: Any) -> tuple[Any, Any]:
        if self.kind == "sum":
            return jnp.sum(h, keepdims=True), state
        if self.kind == "identity":
            return h, state
        assert self.linear is not None
        if self.norm is not None:
            h = self.norm(h)
        y = self.linear(h)
        if self.leaky is not None:
            return self.leaky(y, state)
        return y, state


class FuzzNet(eqx.Module):
    """A model built from an `Architecture`: front, encoder, layers and readout."""

    front: Front
    encoder: Encoder | None
    layers: tuple[Layer, ...]
    readout: Readout
    steps: eqx.nn.StateIndex | None
    filter: eqx.nn.StateIndex | None
    arch: Architecture = eqx.field(static=True)

    def __init__(self, arch: Architecture):
        keys = jr.split(jr.key(arch.seed), len(arch.layers) + 3)
        self.front = Front(arch, keys[0])
        self.encoder = None
        if arch.encoder != "none":
            self.encoder = Encoder(
                arch.encoder,
                input_size(arch),
                arch.encoder_width,
                arch.activation,
                keys[1],
            )
        self.layers = tuple(
            Layer(spec, size, key)
            for spec, size, key in zip(arch.layers, layer_inputs(arch), keys[3:])
        )
        self.readout = Readout(arch.readout, readout_size(arch), arch.n_out, keys[2])
        self.steps = None
        if arch.counter:
            self.steps = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))
        self.filter = None
        if arch.filtered:
            self.filter = eqx.nn.StateIndex(jnp.zeros(front_size(arch)))
        self.arch = arch

    def __call__(self, x: Any, state: Any) -> tuple[Any, Any]:
        arch = self.arch
        front = self.front(x)
        if self.encoder is not None:
            front = self.encoder(front)
        h = front
        if arch.top_down:
            h = jnp.concatenate([h, self.layers[-1].previous(state)])
        if self.filter is not None:
            filtered = 0.5 * state.get(self.filter) + front
            state = state.set(self.filter, filtered)
            h = jnp.concatenate([h, filtered])
        outputs = []
        for i, layer in enumerate(self.layers):
            if arch.skip and i == len(self.layers) - 1:
                h = jnp.concatenate([h, front])
            h, state = layer(h, state)
            outputs.append(h)
        if arch.readout_all:
            h = jnp.concatenate(outputs)
        y, state = self.readout(h, state)
        if self.steps is not None:
            step = state.get(self.steps)
            y = y * (1 + step % 2).astype(y.dtype)
            state = state.set(self.steps, step + 1)
        if arch.tree_output:
            y = {"y": y, "mean": jnp.mean(h)}
        return y, state


class DictState(eqx.Module):
    """A plain pytree state: a dict of arrays keyed by the path of each
    `eqx.nn.StateIndex` in the model, read and written like an `eqx.nn.State`."""

    values: dict[str, Any]
    names: tuple[tuple[Any, str], ...] = eqx.field(static=True)

    def _name(self, index: eqx.nn.StateIndex) -> str:
        return dict(self.names)[index.marker]

    def get(self, index: eqx.nn.StateIndex) -> Any:
        return self.values[self._name(index)]

    def set(self, index: eqx.nn.StateIndex, value: Any) -> DictState:
        return DictState({**self.values, self._name(index): value}, self.names)


def to_dict_state(model: Any, state: eqx.nn.State) -> DictState:
    """The values of `state`, for every `eqx.nn.StateIndex` of `model`."""
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_index)[0]
    names, values = [], {}
    for path, index in leaves:
        if is_index(index):
            name = jax.tree_util.keystr(path).lstrip(".")
            names.append((index.marker, name))
            values[name] = state.get(index)
    return DictState(values, tuple(names))


# --------------------------------------------------------------------------------
# Building a case.


def _fill(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct, rng) -> np.ndarray:
    """A value for one leaf of a model traced by `eqx.filter_eval_shape`."""
    names = [getattr(key, "name", None) for key in path]
    last = names[-1]
    shape, dtype = leaf.shape, leaf.dtype
    if last == "init":  # the initial value of a `StateIndex`
        return np.zeros(shape, dtype)
    if dtype == np.bool_:  # a fixed mask
        return rng.random(shape) < 0.6
    if "norm" in names:  # `eqx.nn.LayerNorm`
        return np.full(shape, 1.0 if last == "weight" else 0.0, dtype)
    if last == "nu":  # `etrace.nn.DiagonalLinearCell`: decays in [0.4, 0.99]
        return np.log(-np.log(rng.uniform(0.4, 0.99, shape))).astype(dtype)
    constants = {"tau": 4.0, "threshold": 0.4, "decay": 0.5}
    if last in constants:
        return np.full(shape, constants[last], dtype)
    if "embedding" in names:
        return rng.standard_normal(shape).astype(dtype)
    fan_in = shape[-1] if len(shape) > 1 else 4
    limit = 1.5 / np.sqrt(fan_in)
    return rng.uniform(-limit, limit, shape).astype(dtype)


def build(arch: Architecture) -> tuple[FuzzNet, Any, Any]:
    """`(model, state, sample_input)` for an architecture, in float64 (call it with
    `jax_enable_x64` on).

    The state is an `eqx.nn.State`, or a `DictState` if `arch.plain_state`.

    The layers are the stock ones, but their values are drawn with NumPy from
    `arch.seed` (uniform in `±1.5 / sqrt(f)` for weights and biases, with `f` the
    size of a weight's last axis and 4 for a bias; fixed values for time constants,
    thresholds, decays and `eqx.nn.LayerNorm`): the model's structure comes from
    `eqx.filter_eval_shape`, so that building it compiles no JAX random-number
    programs, which would dominate the run time.
    """
    shapes = eqx.filter_eval_shape(FuzzNet, arch)
    rng = np.random.default_rng(arch.seed)
    is_shape = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    model = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            jnp.asarray(_fill(path, leaf, rng)) if is_shape(leaf) else leaf
        ),
        shapes,
        is_leaf=is_shape,
    )
    state = eqx.nn.State(model)
    model = eqx.nn.delete_init_state(model)
    if arch.plain_state:
        state = to_dict_state(model, state)
    return model, state, jax.tree.map(jnp.asarray, sample_input(arch))


def sample_input(arch: Architecture) -> Any:
    """One unbatched input step of zeros (float64 vectors, int32 tokens), in NumPy."""
    vector = np.zeros(arch.n_in)
    token = np.zeros((), np.int32)
    if arch.input == "dict":
        return {"a": vector, "b": np.zeros(DICT_EXTRA)}
    if arch.input == "ignored":
        return {"used": vector, "ignored": np.zeros(DICT_EXTRA)}
    if arch.input == "tuple":
        return (vector, token)
    if arch.input == "tokens":
        return token
    if arch.input == "conv":
        return np.zeros((CHANNELS, arch.n_in))
    return vector


def data(case: FuzzCase, batch: int) -> tuple[Any, Any]:
    """`(xs, targets)` for `case`, in NumPy: time on axis 0, the batch on axis 1.

    Vectors are normal with standard deviation 1.5; tokens are uniform over the
    `VOCAB` rows; targets are standard normal.
    """
    arch = case.architecture
    rng = np.random.default_rng(case.data_seed)
    leaves, treedef = jax.tree.flatten(sample_input(arch))
    drawn = []
    for leaf in leaves:
        shape = (case.length, batch) + leaf.shape
        if np.issubdtype(leaf.dtype, np.integer):
            drawn.append(rng.integers(0, VOCAB, shape).astype(leaf.dtype))
        else:
            drawn.append(1.5 * rng.standard_normal(shape))
    targets = rng.standard_normal((case.length, batch, output_size(arch)))
    if arch.tree_output:
        targets = {"y": targets, "mean": rng.standard_normal((case.length, batch))}
    return jax.tree.unflatten(treedef, drawn), targets


def loss(y: Any, target: Any) -> jax.Array:
    """Half the squared error, summed over the leaves of an output pytree."""
    errors = jax.tree.map(lambda a, b: 0.5 * jnp.sum((a - b) ** 2), y, target)
    return sum(jax.tree.leaves(errors), jnp.zeros(()))
