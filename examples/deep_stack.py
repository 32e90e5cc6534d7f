"""Deep stacks of element-wise recurrent layers trained online with D-RTRL, against
BPTT, on scikit-learn's 8x8 digits read row by row.

Each image is a sequence of 8 steps of 8 pixels (scaled to [0, 1]), and the model
names the digit at the last step (a per-step `mask` puts the loss there). The model
is an embedding (`eqx.nn.Linear`), `--depth` residual `etrace.nn.Block`s around a
recurrent layer (`--cell`: `RGLRU`, `MinGRU`, `MinLSTM` or `ELSTM`) and a layer norm
and a linear readout, all in one `eqx.nn.Sequential`. For each depth in `--depths`
the same initial network is trained with Adam on D-RTRL's online gradient and on
BPTT's, from the same batches.

D-RTRL is exact for the top block's parameters and for the readout. The embedding
and the MLPs below the top block reach a state only through another layer's
weights and are learned one-step, and the recurrent layers below the top one learn
with a signal that misses the memory of the layers above (`docs/nn.md` explains
this classification, which `learner.summary()` prints): the deeper the stack, the
more of it is learned approximately. The script prints test accuracy, final train
loss, time per step and memory per example (D-RTRL's traces; for BPTT the states of
every step) for each method and depth.

```
python examples/deep_stack.py                                   # about 1 min, 2 CPUs
python examples/deep_stack.py --cell minlstm --depths 1 2 3
python examples/deep_stack.py --steps 3 --batch 8 --width 8     # smoke test
```
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import _common  # shared with the other examples
import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax

import etrace
import etrace.nn as enn


ROWS = 8  # time steps: one image row per step
N_CLASSES = 10
CELLS = {
    "rglru": enn.RGLRU,
    "mingru": enn.MinGRU,
    "minlstm": enn.MinLSTM,
    "elstm": enn.ELSTM,
}
LABELS = {"d_rtrl": "D-RTRL", "bptt": "BPTT"}


def deep_model(cell: str, width: int, depth: int, *, key) -> eqx.nn.Sequential:
    keys = jr.split(key, 2 * depth + 2)
    blocks = [
        enn.Block(CELLS[cell](width, width, key=keys[2 * i]), key=keys[2 * i + 1])
        for i in range(depth)
    ]
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(ROWS, width, key=keys[-2]),
            *blocks,
            eqx.nn.LayerNorm(width, use_weight=False, use_bias=False),
            eqx.nn.Linear(width, N_CLASSES, key=keys[-1]),
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--cell", choices=list(CELLS), default="rglru")
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[1, 2], help="blocks per model"
    )
    parser.add_argument("--width", type=int, default=32, help="width of the blocks")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--train-size", type=int, default=1500, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.depths) < 1 or args.width < 1:
        parser.error("--steps, --depths and --width must be at least 1")
    if not args.batch <= args.train_size < 1797:
        parser.error("need --batch <= --train-size <= 1796")
    return args


def run(args, depth: int, data: tuple[jax.Array, ...]) -> dict[str, dict[str, Any]]:
    """Both methods on one depth, from the same initial network and batches."""
    train_x, train_y, test_x, test_y = data
    model_key, data_key = jr.split(jr.fold_in(jr.key(args.seed), depth))
    model, state = eqx.nn.make_with_state(deep_model)(
        args.cell, args.width, depth, key=model_key
    )
    optim = optax.adam(args.lr)
    results = {}
    for name in LABELS:
        if name == "bptt":
            gradient = eqx.Partial(_common.bptt_gradient, state)
            memory = _common.memory_bytes(None, state, ROWS)
        else:
            with warnings.catch_warnings():  # the one-step* parameters, as above
                warnings.simplefilter("ignore", etrace.EtraceWarning)
                learner, _ = etrace.compile(model, train_x[0, :ROWS], state=state)
            gradient = eqx.Partial(_common.online_gradient, learner)
            memory = _common.memory_bytes(learner, state, ROWS)
        fixed = (gradient, optim, train_x, train_y, args.batch, ROWS)

        def step(model, opt_state, key, fixed=fixed):
            return _common.digits_train_step(fixed, model, opt_state, key)

        label = f"{LABELS[name]} x{depth}"
        trained, losses, _, per_step = _common.train(
            label, step, optim, model, data_key, args.steps, every=20
        )
        window = min(20, len(losses))
        results[name] = dict(
            losses=losses,
            loss=float(np.mean(losses[-window:])),
            accuracy=float(
                _common.digits_accuracy(trained, state, test_x, test_y, ROWS)
            ),
            seconds_per_step=per_step,
            memory_bytes=memory,
        )
    return results


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, dict[str, Any]]]:
    """Runs the comparison; returns, per depth and method, the final numbers."""
    args = parse_args(argv)
    data = _common.load_digits_split(args.seed, args.train_size)
    print(
        f"digits row by row: {args.train_size} train / {1797 - args.train_size} test "
        f"images, {ROWS} steps of {ROWS} pixels; {args.cell} blocks of width "
        f"{args.width}, batch {args.batch}, {args.steps} steps; chance accuracy "
        f"{1 / N_CLASSES:.2f}, loss {math.log(N_CLASSES):.3f}",
        flush=True,
    )
    wall = time.perf_counter()
    results = {depth: run(args, depth, data) for depth in args.depths}
    head = ("depth", "method", "test acc.", "train loss", "s/step", "memory/example")
    rows = [
        (
            str(depth),
            LABELS[name],
            f"{r['accuracy']:.3f}",
            f"{r['loss']:.3f}",
            f"{r['seconds_per_step']:.4f}",
            f"{r['memory_bytes']} B",
        )
        for depth, by_method in results.items()
        for name, r in by_method.items()
    ]
    _common.print_table(head, rows)
    print("train loss: mean of the last 20 steps' loss at the last row")
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    return results


if __name__ == "__main__":
    main()
