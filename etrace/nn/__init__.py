"""Equinox layers for spiking and recurrent networks that Equinox does not ship.

Surrogate spike functions, spiking neurons and a leaky readout that keep their state
in an `eqx.nn.State`, and simple recurrent cells in the convention of
`eqx.nn.GRUCell`. Stock Equinox layers need none of these to work with etrace.
"""

from ._cells import DiagonalLinearCell as DiagonalLinearCell, ElmanCell as ElmanCell
from ._elementwise import (
    Block as Block,
    ELSTM as ELSTM,
    MinGRU as MinGRU,
    MinLSTM as MinLSTM,
    RGLRU as RGLRU,
)
from ._lru import LRU as LRU
from ._neurons import (
    AbstractSpikingNeuron as AbstractSpikingNeuron,
    ALIF as ALIF,
    IF as IF,
    LeakyRateReadout as LeakyRateReadout,
    LIF as LIF,
)
from ._surrogate import (
    AbstractSurrogate as AbstractSurrogate,
    Arctan as Arctan,
    FastSigmoid as FastSigmoid,
    Gaussian as Gaussian,
    Sigmoid as Sigmoid,
    Triangle as Triangle,
)
