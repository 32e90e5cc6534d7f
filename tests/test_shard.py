"""Model parallelism: traces, hidden state and traced weight rows split along
neurons over 4 virtual CPU devices (in a subprocess: the device count is fixed
when JAX starts; the checks run in `model_parallel_check.py`)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).parent.parent
CASES = ["gru_d_rtrl", "lif_d_rtrl", "lif_es_d_rtrl"]
MESHES = ["2x2", "1x4"]


def _run_check(*args):
    devices = "--xla_force_host_platform_device_count=4"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "model_parallel_check.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return _run_check()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES)
def test_split_along_neurons_equals_one_device(report, case, mesh):
    assert report["devices"] == 4
    if case.startswith("lif"):  # a network that never or always spikes proves nothing
        assert 0 < report[case]["firing_rate"] < 1
    r = report[case][mesh]
    # `online_grad`'s gradient, the traces after it, the parameters after an optax
    # (adam) update, and the gradient of one batched `learner.step`.
    for key in ("grad_error", "traces_error", "params_error", "step_grad_error"):
        assert r[key] < 1e-10, (key, r[key])


@pytest.mark.parametrize("case", ["gru_d_rtrl", "lif_d_rtrl"])
def test_split_along_neurons_in_chunks(report, case):
    # `online_grad(..., chunk=3)` on the 2x2 mesh: the step-by-step gradient of
    # one device.
    assert report[case]["2x2"]["chunk_error"] < 1e-10


def test_neurons_only_split_of_an_unbatched_trace_state(report):
    assert report["unbatched_error"] < 1e-10
    assert report["unbatched_quarter"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES)
def test_every_device_holds_a_quarter_of_every_trace(report, case, mesh):
    r = report[case][mesh]
    # Before the step (as placed) and after it (as XLA left them).
    assert r["quarter_in"] and r["quarter_out"]
    rows = {"2x2": 8 // 2, "1x4": 8 // 4}[mesh]
    if case.startswith("gru"):  # 3H = 24 rows of `weight_hh`
        rows *= 3
    assert r["weight_rows"] == [rows, 8]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh", MESHES)
def test_no_trace_sized_collective(report, case, mesh):
    # No all-gather, all-to-all or collective permute in the compiled step moves
    # as many entries as a device's share of a trace.
    assert report[case][mesh]["trace_collectives"] == []


@pytest.mark.parametrize("case", CASES)
def test_the_collective_check_sees_a_gathered_trace(report, case):
    # Negative control: the same step with one trace gathered onto every device
    # first (`with_sharding_constraint` to replicated) is caught.
    found = report[case]["1x4"]["control_collectives"]
    assert found and all("all-gather" in line for line in found)


def test_sharded_step_lowers_for_a_gpu(report):
    # Exported for CUDA on the 2x2 mesh (lowering needs no GPU): four devices,
    # the batched traces split over `data` and along neurons over `model`, and no
    # CPU-only rewrite. Control: exported for the CPU, the step has them.
    cuda, cpu = report["export"]["cuda"], report["export"]["cpu"]
    assert cuda["devices"] == 4 and cuda["trace_split"]
    assert cuda["barriers"] == 0 and cpu["barriers"] > 0


@pytest.mark.parametrize(
    "case, match",
    [
        ("indivisible", r"Hidden group `lif.z\+lif.v` has 6 neurons, not a multiple"),
        ("indivisible_params", r"has 6 neurons, not a multiple of the 4 devices"),
        ("axis_name", r"`neuron_axis='x'` is not an axis of the mesh"),
        ("batch_axis_name", r"`batch_axis='batch'` is not an axis of the mesh"),
        ("params_axis_name", r"`neuron_axis='neurons'` is not an axis of the mesh"),
        ("mismatch", r"does not have the structure of this learner's \(D_RTRL\)"),
        ("mismatch_shape", r"state leaf `lif.z` has shape \(6,\), where this"),
        ("params_mismatch", r"`model` does not have the structure and shapes"),
        ("joint", r"RTRL keeps whole-state traces .* cannot be split along neurons"),
        ("joint_params", r"RTRL keeps whole-state traces"),
        ("unbatched", r"`batch_axis='data'` was given, but the trace state has no"),
        ("same_axis", r"`batch_axis` and `neuron_axis` are both 'model'"),
        ("batch", r"batch size 3, not a multiple of the 2 devices of mesh axis 'data'"),
        ("not_a_mesh", r"`mesh` must be a `jax.sharding.Mesh`"),
    ],
)
def test_shard_traces_errors(report, case, match):
    message = report["errors"][case]
    assert message is not None and re.search(match, message), message


@pytest.fixture(scope="module")
def slow_report():
    return _run_check("--slow")


@pytest.mark.slow
def test_the_diagonal_family_splits_along_neurons(slow_report):
    # The other algorithms whose traces are per neuron, on the LIF network: the
    # same gradient on 1x4 and 2x2 meshes as on one device. OTTT keeps only
    # presynaptic traces, which have no neuron axis; OTPE's approximation keeps
    # one per weight; D-RTRL keeps a masked weight's trace at the mask's
    # non-zeros, whole on every device.
    report = slow_report["algorithms"]
    assert len(report) == 22
    for name, r in report.items():
        assert r["error"] < 1e-10, (name, r)
        if name.startswith("OTTT"):
            assert r["split"] == 0, (name, r)
        elif name.startswith(("OTPE(approx)", "D_RTRL(masked)")):
            assert 0 < r["split"] < r["traces"], (name, r)
        else:
            assert r["split"] == r["traces"], (name, r)


@pytest.mark.slow
def test_model_parallel_example_on_four_devices(slow_report):
    # `examples/model_parallel.py` at tiny sizes: the four meshes, then training
    # on 2x2 (its smoke test in `test_examples.py` has the devices of the test
    # process).
    example = slow_report["example"]
    assert example["meshes"] == ["1x1", "1x4", "4x1", "2x2"]
    assert example["mesh"] == "2x2" and len(example["losses"]) == 2


# --------------------------------------------------------------------------------
# Errors that one device can show, raised in this process.


@pytest.fixture(scope="module")
def lif():
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from jax.sharding import AxisType, Mesh

    import etrace

    class RecurrentLIF(eqx.Module):
        w_in: eqx.nn.Linear
        w_rec: eqx.nn.Linear
        lif: etrace.nn.LIF

        def __init__(self, key):
            k1, k2 = jr.split(key)
            self.w_in = eqx.nn.Linear(2, 4, key=k1)
            self.w_rec = eqx.nn.Linear(4, 4, use_bias=False, key=k2)
            self.lif = etrace.nn.LIF(4)

        def __call__(self, x, state):
            current = self.w_in(x) + self.w_rec(state.get(self.lif.z))
            return self.lif(current, state)

    model, state = eqx.nn.make_with_state(RecurrentLIF)(jr.key(0))
    mesh = Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1),
        ("data", "model"),
        axis_types=(AxisType.Auto,) * 2,
    )
    compiled = {
        name: etrace.compile(model, jnp.zeros(2), state=state, algorithm=algorithm)
        for name, algorithm in [
            ("d_rtrl", etrace.D_RTRL()),
            ("es", etrace.ES_D_RTRL(decay=0.5)),
            ("rtrl", etrace.RTRL()),
        ]
    }
    return model, mesh, compiled


def test_shard_traces_errors_in_process(lif):
    from jax.sharding import PartitionSpec

    import etrace

    model, mesh, compiled = lif
    learner, ts = compiled["d_rtrl"]
    batched = learner.init(batch_size=2)
    with pytest.raises(etrace.EtraceError, match=r"`neuron_axis='x'` is not an axis"):
        etrace.shard_traces(ts, learner, mesh, neuron_axis="x")
    with pytest.raises(etrace.EtraceError, match=r"`batch_axis='b'` is not an axis"):
        etrace.shard_traces(batched, learner, mesh, neuron_axis="model", batch_axis="b")
    with pytest.raises(etrace.EtraceError, match=r"are both 'model'"):
        etrace.shard_traces(
            batched, learner, mesh, neuron_axis="model", batch_axis="model"
        )
    with pytest.raises(etrace.EtraceError, match=r"the trace state has no batch"):
        etrace.shard_traces(ts, learner, mesh, neuron_axis="model", batch_axis="data")
    es_ts = compiled["es"][1]
    with pytest.raises(etrace.EtraceError, match=r"structure of this learner's"):
        etrace.shard_traces(es_ts, learner, mesh, neuron_axis="model")
    rtrl, rtrl_ts = compiled["rtrl"]
    with pytest.raises(etrace.EtraceError, match=r"RTRL keeps whole-state traces"):
        etrace.shard_traces(rtrl_ts, rtrl, mesh, neuron_axis="model")
    # (A `mesh` that is not a `Mesh` meets the type checker of this session first;
    # the subprocess, without it, sees the `EtraceError`.)
    # Control: the same calls with the right arguments place the trace state.
    placed = etrace.shard_traces(
        batched, learner, mesh, neuron_axis="model", batch_axis="data"
    )
    (_, spec), *_ = [
        (k, v[-1].sharding.spec) for k, v in placed.traces.items() if "w_rec" in k
    ]
    assert spec == PartitionSpec("data", None, "model", None, None)


def test_shard_params_errors_in_process(lif):
    import equinox as eqx
    from jax.sharding import PartitionSpec

    import etrace

    model, mesh, compiled = lif
    learner, _ = compiled["d_rtrl"]
    with pytest.raises(etrace.EtraceError, match=r"`neuron_axis='n'` is not an axis"):
        etrace.shard_params(model, learner, mesh, neuron_axis="n")
    smaller = eqx.tree_at(lambda m: m.w_in.bias, model, model.w_in.bias[:3])
    with pytest.raises(etrace.EtraceError, match=r"`model` does not have the struc"):
        etrace.shard_params(smaller, learner, mesh, neuron_axis="model")
    with pytest.raises(etrace.EtraceError, match=r"RTRL keeps whole-state traces"):
        etrace.shard_params(model, compiled["rtrl"][0], mesh, neuron_axis="model")
    # Control: on a one-device mesh both place everything, the traced rows split
    # (over one device) and the rest whole.
    placed = etrace.shard_params(model, learner, mesh, neuron_axis="model")
    assert placed.w_rec.weight.sharding.spec == PartitionSpec("model", None)
    assert placed.w_in.bias.sharding.spec == PartitionSpec("model")


@pytest.mark.parametrize(
    "w_shape, w_perm, b, fw, devices, axis",
    [
        ((8, 3), (0, 1), 1, 8, 4, 0),  # eqx.nn.Linear: rows are the outputs
        ((3, 8), (1, 0), 1, 8, 4, 1),  # `x @ W`: the outputs are the columns
        ((2, 8, 3), (0, 1, 2), 2, 8, 4, 1),  # grouped: after the group axis
        ((4, 8, 3, 3), (0, 1, 2, 3), 1, 4, 4, 0),  # a convolution's kernel
        ((8,), (0,), 1, 8, 4, 0),  # a bias, a learnable decay
        ((1, 8), (0, 1), 1, 1, 4, None),  # one output: never the inputs
        ((6, 3), (0, 1), 1, 6, 4, None),  # rows that do not split evenly
    ],
)
def test_weight_row_axis(w_shape, w_perm, b, fw, devices, axis):
    import types

    from etrace._shard import _weight_row_axis

    site = types.SimpleNamespace(w_shape=w_shape, w_perm=w_perm, b=b, fw=fw)
    assert _weight_row_axis(site, w_shape, devices) == axis
    # A parameter shaped otherwise than the weight (used reshaped) stays whole.
    assert _weight_row_axis(site, (*w_shape, 1), devices) is None
