"""etrace: online learning of recurrent and spiking networks with eligibility traces."""

from . import nn as nn
from ._algorithm.base import (
    AbstractAlgorithm as AbstractAlgorithm,
    AbstractUnitAlgorithm as AbstractUnitAlgorithm,
)
from ._algorithm.d_rtrl import D_RTRL as D_RTRL
from ._algorithm.dni import DNI as DNI, dni_grad as dni_grad
from ._algorithm.eprop import EProp as EProp
from ._algorithm.es_d_rtrl import ES_D_RTRL as ES_D_RTRL, pp_prop as pp_prop
from ._algorithm.helpers import (
    FixedRandomFeedback as FixedRandomFeedback,
    KappaFilter as KappaFilter,
    PresynapticTrace as PresynapticTrace,
)
from ._algorithm.kf_rtrl import KF_RTRL as KF_RTRL
from ._algorithm.ostl import (
    OSTLFeedforward as OSTLFeedforward,
    OSTLRecurrent as OSTLRecurrent,
)
from ._algorithm.osttp import OSTTP as OSTTP
from ._algorithm.otpe import OTPE as OTPE
from ._algorithm.ottt import OTTT as OTTT
from ._algorithm.precision import ReducedPrecision as ReducedPrecision
from ._algorithm.rflo import RFLO as RFLO
from ._algorithm.rtrl import RTRL as RTRL
from ._algorithm.snap import SnAp as SnAp
from ._algorithm.three_factor import ThreeFactor as ThreeFactor
from ._algorithm.uoro import UORO as UORO
from ._algorithm.wrapped import AbstractWrappedAlgorithm as AbstractWrappedAlgorithm
from ._errors import EtraceError as EtraceError, EtraceWarning as EtraceWarning
from ._graph import Graph as Graph, Group as Group, Site as Site, Unit as Unit
from ._kernels import batch_sum as batch_sum
from ._learner import compile as compile, Learner as Learner, TraceState as TraceState
from ._sequence import (
    bptt_grad as bptt_grad,
    compare as compare,
    Comparison as Comparison,
    online_grad as online_grad,
)
from ._shard import (
    shard_batch as shard_batch,
    shard_params as shard_params,
    shard_traces as shard_traces,
)
from ._step import Jacobians as Jacobians


__version__ = "0.1.0"
