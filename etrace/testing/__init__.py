"""Tools to verify online gradients against BPTT in your own test suite.

```python
import etrace.testing as et

with et.float64():
    learner, ts = etrace.compile(model, x0, state=h0)
    et.assert_matches_bptt(learner, loss_fn, model, ts, xs, targets)
```

Importing this module does not need hypothesis; only the strategies do.
"""

from ._checks import (
    assert_differs_from_bptt as assert_differs_from_bptt,
    assert_matches_bptt as assert_matches_bptt,
)
from ._families import build as build, f64 as f64, FAMILIES as FAMILIES
from ._liveness import Liveness as Liveness, liveness as liveness
from ._precision import float64 as float64, x64 as x64
from ._regime import (
    exact_regime as exact_regime,
    Regime as Regime,
    register_exact_regime as register_exact_regime,
)
from ._strategies import (
    algorithms as algorithms,
    Case as Case,
    model_families as model_families,
    sequences as sequences,
)
