"""The static options of one step's evaluation, passed down explicitly."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple


class Chunk(enum.Enum):
    """A step's part in `online_grad(..., chunk=S)`: every step of a chunk but the
    last `COLLECT`s its Jacobians and learning signals and leaves the traces as
    they are; the last, `FLUSH`, advances the traces over the whole chunk and reads
    out its gradient."""

    COLLECT = "collect"
    FLUSH = "flush"


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """**Attributes:**

    - `summed`: the step runs under the batch `vmap` of a batched step, with the
        parameters shared by every example: the read-out forms the parameters'
        gradient summed over the batch itself (`AbstractAlgorithm.summed_gradients`).
    - `chunk`: the step's part in a chunk, or `None`.
    """

    summed: bool = False
    chunk: Chunk | None = None


class ChunkIO(NamedTuple):
    """What a step of a chunk takes besides the trace state.

    - `probes`: `COLLECT`: per group, one zero array per state, whose cotangent
        is the group's learning signal.
    - `records`: `FLUSH`: what the chunk's earlier steps recorded (per group, the
        algorithm's `chunk_record`), stacked with the steps first (batched: the
        batch first).
    - `signals`: `FLUSH`: the earlier steps' learning signals, stacked likewise.
    """

    probes: Any = None
    records: Any = None
    signals: Any = None
